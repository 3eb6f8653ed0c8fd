"""`torch.library.opcheck` on every mftx custom op (as torchao's op tests do).

opcheck runs four utilities on each sample: ``test_schema`` (declared mutations and
aliasing match what the op does), ``test_autograd_registration``, ``test_faketensor``
(the fake kernel's shapes, dtypes and devices match the real op's, dynamic output
sizes included) and ``test_aot_dispatch_dynamic`` (AOTAutograd with dynamic shapes
gives the eager results, gradients included when inputs require grad).
"""

from __future__ import annotations

import pytest
import torch

import mftx.ops as ops
from mftx.ops import reference

pytestmark = pytest.mark.skipif(
    not ops.HAS_CPP, reason=f"compiled ops unavailable: {ops.IMPORT_ERROR}"
)

ALL_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)
INF = float("inf")


def _c():
    from mftx.ops import _compiled

    return _compiled


def lists(requires_grad: bool = False):
    """Small lists of mixed shapes: ties across tensors, -0.0, ±inf, an empty tensor."""
    g = torch.Generator().manual_seed(11)
    a = torch.randint(-4, 4, (5, 6), generator=g).float() / 2
    a[1, 1], a[2, 2], a[3, 3] = -0.0, INF, -INF
    tensors = [a, torch.empty(0, 3), torch.randn(9, generator=g), torch.tensor(0.5)]
    grads = [torch.randn(t.shape, generator=g) for t in tensors]
    if requires_grad:
        tensors = [t.clone().requires_grad_() for t in tensors]
        grads = [t.clone().requires_grad_() for t in grads]
    return tensors, grads


def ranking_samples(requires_grad: bool):
    ts, gs = lists(requires_grad)
    C = _c()
    return [
        pytest.param(C.topk_op, (ts, 7, True), id="topk"),
        pytest.param(C.topk_op, (ts, 4, False), id="topk-smallest"),
        pytest.param(C.topk_op, (ts, 0, True), id="topk-k0"),
        pytest.param(C.topk_op, (ts, 1000, True), id="topk-k-above-n"),
        pytest.param(C.topk_op, ([ts[1]], 3, True), id="topk-only-empty"),
        pytest.param(C.select_op, (ts, 0.0, True), id="select"),
        pytest.param(C.select_op, (ts, 0.25, False), id="select-above"),
        pytest.param(C.select_op, (ts, -INF, True), id="select-none"),
        pytest.param(C.toward_zero_op, (ts, gs, 0.1), id="toward_zero"),
        pytest.param(C.toward_zero_op, (ts, gs, 0.0), id="toward_zero-lr0"),
    ]


def index(ti, fi):
    return torch.tensor(ti, dtype=torch.int64), torch.tensor(fi, dtype=torch.int64)


def masking_samples(requires_grad: bool):
    ts, _ = lists()
    C = _c()

    def fresh():  # opcheck runs the op several times: each sample mutates its own copies
        ws = [t.clone() for t in ts]
        return [w.requires_grad_() for w in ws] if requires_grad else ws

    ti, fi = index([0, 2, 0, 0, 3], [3, 8, 29, 3, 0])  # a duplicate, the 0-d tensor
    saved = reference.mask_([t.clone() for t in ts], ops.Candidates(ti, fi, torch.zeros(5)))
    empty = index([], [])
    return [
        pytest.param(C.mask_op, (fresh(), ti, fi), id="mask_"),
        pytest.param(C.mask_op, (fresh(), *empty), id="mask_-none"),
        pytest.param(C.restore_op, (fresh(), ti, fi, saved), id="restore_"),
    ]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires-grad"])
def test_opcheck_ranking_ops(requires_grad):
    for sample in ranking_samples(requires_grad):
        op, args = sample.values
        result = torch.library.opcheck(op, args, test_utils=ALL_UTILS)
        assert result == dict.fromkeys(ALL_UTILS, "SUCCESS"), (sample.id, result)


def test_opcheck_masking_ops():
    for sample in masking_samples(requires_grad=False):
        op, args = sample.values
        result = torch.library.opcheck(op, args, test_utils=ALL_UTILS)
        assert result == dict.fromkeys(ALL_UTILS, "SUCCESS"), (sample.id, result)


def test_opcheck_masking_ops_on_tensors_requiring_grad():
    """mask_ writes in place and returns the values it overwrote; torch accepts no
    autograd formula for an op that mutates its inputs (`register_autograd` refuses
    non-functional schemas). So on weights that require grad, mask_ passes schema,
    autograd registration and fake tensors, while `test_aot_dispatch_dynamic`, which
    differentiates its output, meets the "no autograd formula" error; restore_
    returns nothing and passes all four. mftx's own wrappers run both ops under
    `torch.no_grad()`: masking is not a step to differentiate."""
    C = _c()
    with pytest.raises(RuntimeError, match="non-functional operator"):
        C.mask_op.register_autograd(lambda ctx, grad: None)
    for sample in masking_samples(requires_grad=True):
        op, args = sample.values
        if op is not C.mask_op:
            result = torch.library.opcheck(op, args, test_utils=ALL_UTILS)
            assert result == dict.fromkeys(ALL_UTILS, "SUCCESS"), (sample.id, result)
            continue
        result = torch.library.opcheck(op, args, test_utils=ALL_UTILS[:3])
        assert result == dict.fromkeys(ALL_UTILS[:3], "SUCCESS"), (sample.id, result)
        with pytest.raises(Exception, match="no autograd formula was registered"):
            torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))


def test_ranking_outputs_never_require_grad():
    """Compiled and reference paths agree: candidates are plain data, whatever the input."""
    w = torch.nn.Parameter(torch.tensor([[1.0, 5.0], [3.0, -2.0]]))
    g = torch.ones(2, 2, requires_grad=True)
    for mod in (ops, reference):
        for c in (mod.topk([w], 2), mod.select([w], 0.0), mod.toward_zero([w], [g], 0.5)):
            assert not c.value.requires_grad and c.value.grad_fn is None
    assert ops.topk([w], 3).equal(reference.topk([w], 3))
