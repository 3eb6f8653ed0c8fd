"""Small float64 models and independent oracles for the scoring tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import mftx

POS = ["good", "great", "fine", "lovely", "superb", "warm", "funny"]
NEG = ["bad", "awful", "dull", "boring", "weak", "cold", "flat"]
FILL = ["the", "film", "is", "a", "movie", "and", "story", "very", "it", "was"]
TOY_WORDS = POS + NEG + FILL


def _sentences(n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [*rng.sample(FILL, 4), rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words) + " ", label))
    return rows


def toy_sst2(data: Path, n_train: int = 48, n_dev: int = 24) -> Path:
    """SST-2-format TSVs of seeded toy sentences (one sentiment word each) in `data`."""
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", _sentences(n_train, 0)), ("dev.tsv", _sentences(n_dev, 1))):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in rows]
        (data / name).write_text("\n".join(lines) + "\n")
    return data


def mlp_problem(seed: int = 0, n_batches: int = 3):
    """A tanh MLP on 5 features, 3 classes; batches of sizes 4, 3, 5 (unequal on purpose)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    sizes = [4, 3, 5, 2][:n_batches]

    def mk(n):
        return {"x": torch.randn(n, 5, dtype=torch.float64), "labels": torch.randint(0, 3, (n,))}

    train = [mk(n) for n in sizes]
    val = [mk(6), mk(3)]
    objective = mftx.Objective(
        lambda m, b: m(b["x"]), lambda z, b: F.cross_entropy(z, b["labels"]), requires=("labels",)
    )
    return model, train, val, objective


def tiny_bert_problem(seed: int = 0):
    """A random-init 2-layer BERT (hidden 16, eager attention), float64, a few batches."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, initializer_range=0.3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    model = BertForSequenceClassification(cfg).double().eval()

    def mk(n, length):
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, length - 2 :] = 0  # some padding
        return {
            "input_ids": torch.randint(1, 40, (n, length)),
            "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,)),
        }

    train = [mk(4, 6), mk(3, 5)]
    val = [mk(5, 6)]
    space = mftx.select_params(
        model, include=[r"layer\.1\.attention\.output\.dense", r"layer\.1\.output\.dense\.bias"]
    )
    return model, train, val, space


def mean_loss_fn(model, space: mftx.ParamSpace, batches: List[dict], objective):
    """flat θ -> batch-size-weighted mean loss, written independently of mftx.curvature.hvp."""
    names = space.names

    def f(flat):
        ps = space.unflatten(flat)
        state = dict(zip(names, ps))
        total, n_all = 0.0, 0
        for b in batches:
            n = b["labels"].shape[0]
            if objective is None:
                loss = functional_call(model, state, (), b).loss
            else:
                z = functional_call(model, state, (b["x"],))
                loss = objective.loss(z, b)
            total = total + n * loss
            n_all += n
        return total / n_all

    return f


def dense_ggn(model, space, batches, outputs, loss_on_outputs, weight=None):
    """Σ_b w_b J_bᵀ H_b J_b / Σ_b w_b, dense, with jacrev and hessian (w_b: rows by default)."""
    theta = space.flatten(space.detached())
    total, n_all = 0.0, 0
    for b in batches:

        def out(flat, b=b):
            return outputs(dict(zip(space.names, space.unflatten(flat))), b)

        z = out(theta)
        J = jacrev(out)(theta).reshape(z.numel(), -1)
        Hz = hessian(lambda zz, b=b, s=z.shape: loss_on_outputs(zz.reshape(s), b))(z.reshape(-1))
        n = b["labels"].shape[0] if weight is None else weight(b)
        total = total + n * (J.T @ Hz @ J)
        n_all += n
    return (total / n_all).detach()
