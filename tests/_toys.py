"""Small float64 models and independent oracles for the scoring tests."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import mftx


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
    """flat θ -> batch-size-weighted mean loss, written independently of mftx.hvp."""
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
