"""Held-out evaluation pieces: row splits, per-row logits, recalibration, locations, groups."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mftx.ops import Candidates
from mftx.study import groups
from mftx.study.heldout import DevRows, RowSplit, best_offset, row_metrics, two_fold
from mftx.study.location import kind_of, layer_of, locate, location_table

# ------------------------------------------------------------------ splits


@given(st.lists(st.integers(0, 2), min_size=2, max_size=60), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_two_fold_is_a_disjoint_stratified_cover(labels, seed):
    s = two_fold(labels, seed)
    assert not set(s.a) & set(s.b)
    assert sorted(s.a + s.b) == list(range(len(labels)))
    for c in set(labels):
        in_a = sum(labels[i] == c for i in s.a)
        in_b = sum(labels[i] == c for i in s.b)
        assert abs(in_a - in_b) <= 1
    assert abs(len(s.a) - len(s.b)) <= 1
    assert two_fold(labels, seed) == s  # deterministic


def test_split_round_trips_and_detects_tampering():
    s = two_fold([0, 1] * 20, seed=3)
    assert two_fold([0, 1] * 20, seed=4) != s
    d = s.to_json()
    assert RowSplit.from_json(d) == s
    d["a"], d["b"] = d["a"][1:], [d["a"][0], *d["b"]]
    with pytest.raises(ValueError, match="hash"):
        RowSplit.from_json(d)
    with pytest.raises(ValueError, match="overlap"):
        RowSplit((0, 1), (1, 2), 0, 3)
    with pytest.raises(ValueError, match="cover"):
        RowSplit((0,), (2,), 0, 3)
    assert [f[0] for f in s.folds()] == ["A->B", "B->A"]
    assert s.folds()[0][1] == s.a and s.folds()[1][2] == s.a


# ------------------------------------------------------------------ metrics and offsets


def _brute_best_accuracy(z, y):
    d = z[:, 1] - z[:, 0]
    grid = torch.cat([d.unique(), torch.tensor([-1e9, 1e9], dtype=d.dtype)])
    best = 0.0
    for t in grid.tolist():
        for eps in (-1e-9, 1e-9):
            best = max(best, float(((d > t + eps).long() == y).double().mean()))
    return best


@given(st.integers(2, 40), st.integers(0, 10_000))
@settings(max_examples=50, deadline=None)
def test_binary_offset_is_optimal(n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    off = best_offset(z, y)
    assert off[0] == 0
    acc = row_metrics(z, y, offset=off)["accuracy"]
    assert acc == pytest.approx(_brute_best_accuracy(z, y))
    assert acc >= row_metrics(z, y)["accuracy"]


def test_offset_prefers_the_smallest_shift_and_three_classes_improve():
    z = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([1, 1, 0])
    assert best_offset(z, y).tolist() == [0.0, 0.0]  # already perfect: no shift
    g = torch.Generator().manual_seed(0)
    z3 = torch.randn(200, 3, generator=g, dtype=torch.float64)
    z3[:, 2] -= 2.0  # class 2 under-predicted
    y3 = torch.randint(0, 3, (200,), generator=g)
    off = best_offset(z3, y3)
    acc = row_metrics(z3, y3, offset=off)["accuracy"]
    assert acc > row_metrics(z3, y3)["accuracy"]
    for j, d in itertools.product((1, 2), torch.linspace(-3, 3, 61).tolist()):
        shift = torch.zeros(3, dtype=torch.float64)
        shift[j] = d
        assert acc >= row_metrics(z3, y3, offset=shift)["accuracy"] - 1e-12


def test_row_metrics_on_subsets_and_bad_input():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    m = row_metrics(z, y)
    assert m["accuracy"] == 0.5 and m["predicted_share"] == [0.5, 0.5] and m["n"] == 4
    assert m["loss"] == pytest.approx(float(F.cross_entropy(z, y)))
    sub = row_metrics(z, y, rows=[0, 2])
    assert sub["accuracy"] == 1.0 and sub["n"] == 2
    with pytest.raises(ValueError, match="empty"):
        row_metrics(z, y, rows=[])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        row_metrics(z, y, rows=[4])
    with pytest.raises(ValueError, match="classes"):
        row_metrics(z[:, 0], y)


def test_dev_rows_logits_are_in_file_order(tmp_path):
    from mftx.models import load_classifier, make_tiny_bert

    words = ["good", "bad", "film", "very", "a", "the", "plot", "dull"]
    path = make_tiny_bert(tmp_path / "m", words, hidden_size=16, intermediate=32)
    model, tok = load_classifier(str(path))
    rows = [("good film", 1), ("a very very dull plot the film", 0), ("bad", 0),
            ("the plot", 1), ("very good a film", 1)]  # fmt: skip
    dev = DevRows(rows, tok, batch_size=2)
    logits = dev.logits(model)
    model.eval()
    with torch.no_grad():
        for i, (s, _) in enumerate(rows):
            one = model(**tok([s], return_tensors="pt")).logits[0].double()
            assert torch.allclose(logits[i], one, atol=1e-5)
    assert dev.labels.tolist() == [1, 0, 0, 1, 1]
    half = dev.batches_for([1, 3])
    assert sorted(torch.cat([b["labels"] for b in half]).tolist()) == [0, 1]


# ------------------------------------------------------------------ locations


@pytest.mark.parametrize(
    "name,kind,layer",
    [
        ("bert.encoder.layer.3.attention.self.query.weight", "query", 3),
        ("bert.encoder.layer.3.attention.self.key.bias", "key", 3),
        ("roberta.encoder.layer.0.attention.self.value.weight", "value", 0),
        ("bert.encoder.layer.11.attention.output.dense.weight", "attn_out", 11),
        ("bert.encoder.layer.2.intermediate.dense.weight", "ffn_in", 2),
        ("bert.encoder.layer.2.output.dense.bias", "ffn_out", 2),
        ("vit.encoder.layer.1.attention.attention.query.weight", "query", 1),
        ("distilbert.transformer.layer.4.attention.q_lin.weight", "query", 4),
        ("distilbert.transformer.layer.4.attention.out_lin.weight", "attn_out", 4),
        ("distilbert.transformer.layer.4.ffn.lin1.weight", "ffn_in", 4),
        ("distilbert.transformer.layer.4.ffn.lin2.bias", "ffn_out", 4),
        ("transformer.h.5.attn.c_attn.weight", "qkv", 5),
        ("transformer.h.5.attn.c_proj.weight", "attn_out", 5),
        ("transformer.h.5.mlp.c_fc.weight", "ffn_in", 5),
        ("transformer.h.5.mlp.c_proj.bias", "ffn_out", 5),
        ("model.layers.7.self_attn.k_proj.weight", "key", 7),
        ("model.layers.7.self_attn.o_proj.weight", "attn_out", 7),
        ("model.layers.7.mlp.gate_proj.weight", "ffn_in", 7),
        ("model.layers.7.mlp.up_proj.weight", "ffn_in", 7),
        ("model.layers.7.mlp.down_proj.weight", "ffn_out", 7),
        ("bert.pooler.dense.weight", "other", None),
    ],
)
def test_kinds_and_layers_across_families(name, kind, layer):
    assert kind_of(name) == kind
    assert layer_of(name) == layer


def test_locate_counts_and_splits_fused_qkv():
    names = ["bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.1.output.dense.bias", "transformer.h.0.attn.c_attn.weight"]  # fmt: skip
    shapes = [torch.Size([4, 4]), torch.Size([4]), torch.Size([2, 12])]  # c_attn: [in, 3·4]
    # c_attn entries: flat 0..23, column = flat % 12; 0-3 query, 4-7 key, 8-11 value.
    c = Candidates(torch.tensor([0, 0, 1, 2, 2, 2, 2]), torch.tensor([0, 5, 3, 1, 4, 13, 23]),
                   torch.zeros(7))  # fmt: skip
    counts = locate(names, shapes, c)
    # BERT query: flat 0 and 5; c_attn columns 1, 4, 1, 11 -> query, key, query, value.
    assert counts == {
        (0, "query", "weight"): 4, (1, "ffn_out", "bias"): 1, (0, "key", "weight"): 1,
        (0, "value", "weight"): 1,
    }  # fmt: skip
    table = location_table(names, shapes, c)
    assert table["layer"] == {"0": 6, "1": 1}
    assert table["leaf"] == {"weight": 6, "bias": 1}
    assert sum(table["kind"].values()) == 7
    with pytest.raises(ValueError, match="tensor"):
        locate(names[:2], shapes[:2], c)


# ------------------------------------------------------------------ group fidelity


def test_to_candidates_matches_brute_force():
    numels = [3, 0, 5, 2]
    idx = torch.tensor([0, 2, 3, 7, 8, 9])
    c = groups.to_candidates(idx, numels)
    starts = [0, 3, 3, 8]
    want = []
    for g in idx.tolist():
        t = max(
            i for i in range(4) if starts[i] <= g and numels[i] > 0 and g < starts[i] + numels[i]
        )
        want.append((t, g - starts[t]))
    assert list(zip(c.tensor_index.tolist(), c.flat_index.tolist())) == want
    with pytest.raises(ValueError, match="global indices"):
        groups.to_candidates(torch.tensor([10]), numels)


def test_draw_is_deterministic_and_well_formed():
    ranked = {"m": torch.arange(99, -1, -1)}
    flagged = {"m": torch.arange(0, 100, 2)}
    subs = groups.draw(100, [10, 60], n_random=5, seed=1, ranked=ranked, flagged=flagged,
                       n_flagged=3)  # fmt: skip
    again = groups.draw(100, [60, 10], n_random=5, seed=1, ranked=ranked, flagged=flagged,
                        n_flagged=3)  # fmt: skip
    assert [s.key() for s in subs] == [s.key() for s in again]
    for s in subs:
        assert len(s.index) == s.k == len(torch.unique(s.index))
        assert bool((s.index[1:] > s.index[:-1]).all())
    origins = [(s.origin, s.k) for s in subs]
    assert origins.count(("random", 10)) == 5 and origins.count(("top-m", 60)) == 1
    assert origins.count(("flagged-m", 10)) == 3
    assert origins.count(("flagged-m", 60)) == 0  # only 50 flagged entries
    top = next(s for s in subs if s.origin == "top-m" and s.k == 10)
    assert top.index.tolist() == list(range(90, 100))
    assert all(int(i) % 2 == 0 for s in subs if s.origin == "flagged-m" for i in s.index)
    with pytest.raises(ValueError, match="k must be"):
        groups.draw(100, [101], 1, 0)


def test_measure_equals_brute_force_zeroing_and_restores_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    params = [model[0].weight, model[2].weight]
    before = [p.detach().clone() for p in params]
    calls = []

    def loss():
        calls.append(1)
        with torch.no_grad():
            return float(F.cross_entropy(model(x).double(), y))

    total = sum(p.numel() for p in params)
    pred = {"a": torch.randn(total, dtype=torch.float64)}
    subs = groups.draw(total, [1, 7], n_random=4, seed=0)
    recs = groups.measure(params, subs, loss, pred)
    base = loss()
    for s, r in zip(subs, recs):
        clone = [p.detach().clone().reshape(-1) for p in params]
        flat = torch.cat(clone)
        flat[s.index] = 0
        w0, w2 = flat[:20].view(5, 4), flat[20:].view(2, 5)
        with torch.no_grad():
            z = model[2].bias + torch.tanh(x @ w0.T + model[0].bias) @ w2.T
            want = float(F.cross_entropy(z.double(), y)) - base
        assert r.actual == pytest.approx(want, abs=1e-6)
        assert r.predicted["a"] == pytest.approx(float(pred["a"][s.index].sum()))
        assert (r.origin, r.k, r.key) == (s.origin, s.k, s.key())
    assert all(p.equal(b) for p, b in zip(params, before))
    # Resume: records already done are not measured again (only the base loss is).
    calls.clear()
    again = groups.measure(params, subs, loss, pred, done={r.key: r for r in recs})
    assert again == recs and len(calls) == 1
    with pytest.raises(ValueError, match="NaN"):
        groups.measure(params, subs, loss, {"a": torch.full((total,), float("nan"))})
    with pytest.raises(ValueError, match="shape"):
        groups.measure(params, subs, loss, {"a": torch.zeros(3)})
