"""Ecosystem inputs: DataLoaders and other iterables, batch weights, placement on a device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _toys import mlp_problem, tiny_bert_problem
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader

import mftx
from mftx.backends import to_device


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def flat(scores, space):
    return space.flatten([scores.scores[n] for n in space.names])


# ---------------------------------------------------------------- token-level losses


@pytest.fixture(scope="module")
def tokens():
    """A tiny float64 BERT token classifier; batches whose rows hold very unequal numbers
    of labelled tokens (-100: ignored, as in transformers)."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, initializer_range=0.3, num_labels=3,
        attn_implementation="eager",
    )  # fmt: skip
    model = BertForTokenClassification(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)

    def mk(n, length, labelled):
        labels = torch.full((n, length), -100)
        labels[:, :labelled] = torch.randint(0, 3, (n, labelled), generator=gen)
        return {"input_ids": torch.randint(1, 30, (n, length), generator=gen),
                "attention_mask": torch.ones(n, length, dtype=torch.long), "labels": labels}  # fmt: skip

    train = [mk(2, 6, 6), mk(4, 6, 1), mk(3, 5, 2)]  # 12, 4 and 6 labelled tokens
    val = [mk(3, 6, 5), mk(2, 6, 1)]
    space = mftx.select_params(
        model, include=[r"layer\.1\.attention\.output\.dense", r"layer\.1\.output\.dense\.bias"]
    )
    return model, train, val, space


def token_mean_loss(model, space, batches):
    """flat θ -> cross-entropy averaged over every labelled token of every batch."""

    def f(theta):
        state = dict(zip(space.names, space.unflatten(theta)))
        total, count = 0.0, 0
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            logits = functional_call(model, state, (), inputs).logits
            keep = b["labels"] != -100
            total = total + F.cross_entropy(logits[keep], b["labels"][keep], reduction="sum")
            count += int(keep.sum())
        return total / count

    return f


def test_token_level_loss_is_weighted_by_labelled_tokens(tokens):
    model, train, val, space = tokens
    theta = space.flatten(space.detached())
    f = token_mean_loss(model, space, train)
    g_want = torch.func.grad(f)(theta).detach()
    H = hessian(f)(theta).detach()
    op = mftx.Curvature(model, space, train, mftx.HFClassification())
    assert op.weights == [12.0, 4.0, 6.0]
    g, loss = op.gradient(train)
    assert rel(g, g_want) < 1e-12 and loss == pytest.approx(float(f(theta).detach()), rel=1e-12)
    v = torch.randn(space.numel, dtype=torch.float64)
    assert rel(op.matvec(v), H @ v) < 1e-10
    # Weighting by rows (the old guess) gives another, wrong, gradient.
    rows = mftx.Curvature(
        model, space, train, mftx.HFClassification(), batch_size_fn=mftx.batch_size
    )
    assert rows.weights == [2.0, 4.0, 3.0] and rel(rows.gradient(train)[0], g_want) > 1e-2


def test_token_level_taylor_scores(tokens):
    model, train, val, space = tokens
    theta = space.flatten(space.detached())
    g_val = torch.func.grad(token_mean_loss(model, space, val))(theta).detach()
    s = mftx.score(model, None, val, method="taylor", params=space, progress=False)
    assert rel(flat(s, space), -g_val * theta) < 1e-12


# ---------------------------------------------------------------- batch_size_fn, num_examples


def _summed_objective():
    return mftx.Objective(
        lambda m, b: m(b["x"]),
        lambda z, b: F.cross_entropy(z, b["labels"], reduction="sum"),
        requires=("labels",),
    )


@pytest.mark.parametrize("method", ["gradient", "influence", "taylor"])
def test_summed_losses_with_num_examples_equal_mean_losses(method):
    model, train, val, obj = mlp_problem(n_batches=3)  # unequal batch sizes 4, 3, 5
    space = mftx.select_params(model)
    n_train = sum(b["labels"].shape[0] for b in train)
    n_val = sum(b["labels"].shape[0] for b in val)
    kw = dict(method=method, params=space, solver="explicit", curvature="ggn", damping=0.3,
              lr=0.1, progress=False)  # fmt: skip
    want = mftx.score(model, train, val, loss_fn=obj, **kw)
    got = mftx.score(model, train, val, loss_fn=_summed_objective(),
                     batch_size_fn=lambda b: 1, num_examples={"train": n_train, "val": n_val},
                     **kw)  # fmt: skip
    assert rel(flat(got, space), flat(want, space)) < 1e-12
    assert got.config["batch_size_fn"].endswith("<lambda>")  # recorded by name
    # Without num_examples the summed loss is a different (wrongly scaled) problem.
    off = mftx.score(model, train, val, loss_fn=_summed_objective(), batch_size_fn=lambda b: 1,
                     **kw)  # fmt: skip
    assert rel(flat(off, space), flat(want, space)) > 1e-2


def test_num_examples_of_an_hvp_subsample_is_its_share():
    model, _, val, obj = mlp_problem()
    gen = torch.Generator().manual_seed(3)
    train = [{"x": torch.randn(4, 5, generator=gen).double(),
              "labels": torch.randint(0, 3, (4,), generator=gen)} for _ in range(4)]  # fmt: skip
    space = mftx.select_params(model)
    kw = dict(method="influence", params=space, solver="explicit", curvature="ggn",
              damping=0.3, hvp_batches=2, progress=False)  # fmt: skip
    want = mftx.score(model, train, val, loss_fn=obj, **kw)
    got = mftx.score(model, train, val, loss_fn=_summed_objective(), batch_size_fn=lambda b: 1,
                     num_examples={"train": 16, "val": 9}, **kw)  # fmt: skip
    assert rel(flat(got, space), flat(want, space)) < 1e-12


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"num_examples": {"test": 3}}, ValueError, "keys 'train' and/or 'val'"),
        ({"num_examples": {"train": 0}}, ValueError, "positive number"),
        ({"num_examples": 5}, ValueError, "must be a dict"),
        ({"batch_size_fn": 3}, TypeError, "must be callable"),
        ({"batch_size_fn": lambda b: -1.0}, ValueError, "train batch 0 is -1.0"),
        ({"batch_size_fn": lambda b: "four"}, ValueError, "finite number"),
    ],
)
def test_bad_batch_weights_are_refused(options, error, message):
    model, train, val, obj = mlp_problem()
    with pytest.raises(error, match=message):
        mftx.score(model, train, val, method="gradient", loss_fn=obj, progress=False, **options)


# ---------------------------------------------------------------- iterables and DataLoaders


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_problem()


def _rows(batches):
    """The batches split back into rows (what a Dataset holds)."""
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]


def test_a_dataloader_scores_like_its_batches(bert):
    model, train, val, space = bert
    rows = _rows([train[0], train[0]])  # equal lengths, so default_collate can stack
    loader = DataLoader(rows, batch_size=3)
    listed = list(loader)
    kw = dict(method="influence", params=space, solver="minres", curvature="ggn", damping=0.1,
              max_iter=20, progress=False)  # fmt: skip
    a = mftx.score(model, loader, val, **kw)
    b = mftx.score(model, listed, val, **kw)
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in space.names)
    assert a.config["n_train_batches"] == 3
    # A shuffling loader is read once: one order for the whole solve, the same mean.
    shuffled = DataLoader(
        rows, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    c = mftx.score(model, shuffled, val, **kw)
    assert rel(flat(c, space), flat(b, space)) < 1e-8


def test_generators_and_mapping_batches_are_accepted(bert):
    from transformers import BatchEncoding

    model, train, val, space = bert
    want = mftx.score(model, train, None, method="gradient", params=space, progress=False)
    got = mftx.score(model, (BatchEncoding(b) for b in train), None, method="gradient",
                     params=space, progress=False)  # fmt: skip
    assert all(torch.equal(want.scores[n], got.scores[n]) for n in space.names)


def test_single_batches_and_non_iterables_are_refused(bert):
    model, train, val, space = bert
    with pytest.raises(TypeError, match="single dict"):
        mftx.score(model, train[0], None, method="gradient", params=space, progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        mftx.score(model, 3, None, method="gradient", params=space, progress=False)


def test_batches_are_placed_on_the_model_device():
    cpu = {"input_ids": torch.ones(2, 3, dtype=torch.long), "note": "kept", "n": 2}
    (moved,) = to_device([cpu], torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["note"] == "kept"
    (same,) = to_device([cpu], torch.device("cpu"))
    assert same["input_ids"] is cpu["input_ids"]  # already there: not copied
