"""EK-FAC against its definition built densely here, and exact where the Fisher is Kronecker."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _toys import mlp_problem, tiny_bert_problem
from torch import nn
from torch.func import functional_call, grad

import mftx
from mftx.inverse import ekfac


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def per_example_grads(model, space, batches, loss_fn):
    """Flat gradient of each example's loss (the example alone in a batch), via torch.func."""
    names = space.names
    params = {n: p.detach() for n, p in zip(names, space.params)}
    out = []
    for b in batches:
        for i in range(b["labels"].shape[0]):
            one = {k: v[i : i + 1] for k, v in b.items()}

            def loss(ps, one=one):
                return loss_fn(_Swap(model, ps), one)

            g = grad(loss)(params)
            out.append(torch.cat([g[n].detach().reshape(-1) for n in names]))
    return torch.stack(out)


class _Swap(nn.Module):
    """`model` called with the analysed parameters replaced (for per-example torch.func.grad)."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


def token_factors(model, module, batches, loss_fn, bias_only=False):
    """A and S of one Linear module from hooks written here: inputs, and output gradients
    taken through an added zero probe (not through autograd.grad of the outputs)."""
    A, S = 0.0, 0.0
    for b in batches:
        n = b["labels"].shape[0]
        seen = {}

        def hook(mod, inputs, output, seen=seen):
            seen["a"] = inputs[0].detach()
            seen["probe"] = torch.zeros_like(output, requires_grad=True)
            return output + seen["probe"]

        h = module.register_forward_hook(hook)
        try:
            loss = loss_fn(model, b) * n
            (delta,) = torch.autograd.grad(loss, seen["probe"])
        finally:
            h.remove()
        a = seen["a"].reshape(n, -1, module.in_features)
        ones = torch.ones_like(a[..., :1])
        a_bar = ones if bias_only else torch.cat([a, ones], -1)
        w = (
            b["attention_mask"].to(a.dtype)
            if "attention_mask" in b
            else torch.ones(a.shape[:2]).double()
        )
        a2 = a_bar.reshape(-1, a_bar.shape[-1])
        A = A + (a2 * w.reshape(-1, 1)).T @ a2
        d2 = delta.reshape(-1, module.out_features)
        S = S + d2.T @ d2
    return A, S


def dense_ekfac(blocks, grads, space):
    """(Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ per block, Λ from per-example gradients, in space order."""
    n = space.numel
    offsets = torch.tensor([0, *space.numels]).cumsum(0).tolist()
    F_dense = torch.zeros(n, n, dtype=torch.float64)
    for w_idx, b_idx, d_out, d_in, A, S in blocks:
        QA, QS = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
        k = A.shape[0]
        index = []  # the flat position of M[o, i], M = [W | b]
        for o in range(d_out):
            if w_idx is not None:
                index += [offsets[w_idx] + o * d_in + i for i in range(d_in)]
            if b_idx is not None:
                index.append(offsets[b_idx] + o)
        index = torch.tensor(index)
        M = grads[:, index].reshape(-1, d_out, k)  # per-example [G_W | G_b]
        lam = ((QS.T @ M @ QA) ** 2).mean(0)
        B = torch.kron(QS, QA)  # column i*k + j: vec(QS[:, i] QA[:, j]ᵀ), row-major
        block = B @ torch.diag(lam.reshape(-1)) @ B.T
        F_dense[index[:, None], index[None, :]] = block
    return F_dense


def test_ekfac_equals_its_dense_definition_on_an_mlp():
    model, train, val, obj = mlp_problem()
    space = mftx.select_params(model, exclude=None)
    fitted = ekfac.fit(model, space, train, obj, fisher="empirical")
    grads = per_example_grads(model, space, train, obj)
    blocks = []
    for idx, name in ((0, "0"), (2, "2")):
        mod = model[idx]
        A, S = token_factors(model, mod, train, obj)
        blocks.append((space.names.index(f"{name}.weight"), space.names.index(f"{name}.bias"),
                       mod.out_features, mod.in_features, A, S))  # fmt: skip
    F_dense = dense_ekfac(blocks, grads, space)
    v = torch.randn(space.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(fitted.matvec(v), F_dense @ v) < 1e-10
    lam = 0.03
    want = torch.linalg.solve(F_dense + lam * torch.eye(space.numel, dtype=torch.float64), v)
    assert rel(fitted.solve(v, lam), want) < 1e-10
    # A real approximation here: the empirical Fisher itself differs (so the test can fail).
    F_emp = grads.T @ grads / grads.shape[0]
    assert rel(F_dense @ v, F_emp @ v) > 1e-3


def test_ekfac_equals_its_dense_definition_on_tiny_bert():
    """Tokens, padding, and a module whose bias alone is analysed (ā = the ones column)."""
    model, train, val, space = tiny_bert_problem()
    obj = mftx.HFClassification()
    fitted = ekfac.fit(model, space, train, obj, fisher="empirical")
    mods = dict(model.named_modules())
    grads = per_example_grads(model, space, train, obj)
    blocks = []
    for prefix, bias_only in (("bert.encoder.layer.1.attention.output.dense", False),
                              ("bert.encoder.layer.1.output.dense", True)):  # fmt: skip
        mod = mods[prefix]
        A, S = token_factors(model, mod, train, obj, bias_only=bias_only)
        w = None if bias_only else space.names.index(prefix + ".weight")
        blocks.append((w, space.names.index(prefix + ".bias"), mod.out_features,
                       mod.in_features, A, S))  # fmt: skip
    assert [b.k for b in fitted.blocks] == [17, 1]
    F_dense = dense_ekfac(blocks, grads, space)
    v = torch.randn(space.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel(fitted.matvec(v), F_dense @ v) < 1e-9
    want = torch.linalg.solve(F_dense + 0.1 * torch.eye(space.numel, dtype=torch.float64), v)
    assert rel(fitted.solve(v, 0.1), want) < 1e-9


def _shared_input_problem(n, seed=0, classes=3, d=4, batch=50):
    torch.manual_seed(seed)
    model = nn.Linear(d, classes).double()
    x = torch.randn(1, d, dtype=torch.float64).expand(n, d).contiguous()
    obj = mftx.Objective(lambda m, b: m(b["x"]), lambda z, b: F.cross_entropy(z, b["labels"]),
                         requires=("labels",))  # fmt: skip
    starts = range(0, n, batch)
    return model, [_labelled(x[i : i + batch], classes) for i in starts], obj


def _labelled(x, classes):
    return {"x": x, "labels": torch.randint(0, classes, (x.shape[0],))}


def test_ekfac_is_exact_where_the_fisher_is_kronecker():
    """One token per example and the same input for all: F = ā āᵀ ⊗ S exactly."""
    model, batches, obj = _shared_input_problem(200)
    space = mftx.select_params(model, exclude=None)
    fitted = ekfac.fit(model, space, batches, obj, fisher="empirical")
    grads = per_example_grads(model, space, batches, obj)
    F_emp = grads.T @ grads / grads.shape[0]
    E = torch.eye(space.numel, dtype=torch.float64)
    assert rel(torch.stack([fitted.matvec(e) for e in E], 1), F_emp) < 1e-12


def test_sampled_fisher_approaches_the_ggn():
    model, batches, obj = _shared_input_problem(4000, seed=1, batch=1000)
    space = mftx.select_params(model, exclude=None)
    fitted = ekfac.fit(model, space, batches, obj, fisher="sampled", seed=3)
    # Every example has the same input, so one of them has the dataset's GGN.
    one = [{k: v[:1] for k, v in batches[0].items()}]
    ggn = mftx.Curvature(model, space, one, obj, curvature="ggn").dense()
    E = torch.eye(space.numel, dtype=torch.float64)
    F_ekfac = torch.stack([fitted.matvec(e) for e in E], 1)
    assert rel(F_ekfac, ggn) < 0.1  # Monte Carlo: about 1/sqrt(4000) per entry
    # The labels follow the model's predictive distribution.
    sampled = ekfac.sampled_batches(model, batches, obj, seed=3)
    y = torch.cat([b["labels"] for b in sampled])
    p = torch.softmax(model(batches[0]["x"][:1]), 1)[0].detach()
    freq = torch.bincount(y, minlength=3).double() / len(y)
    assert float((freq - p).abs().max()) < 4 * float((p * (1 - p) / len(y)).sqrt().max())
    # Seeded: the same seed gives the same fit, another seed other labels.
    again = ekfac.fit(model, space, batches, obj, fisher="sampled", seed=3)
    assert torch.equal(again.eigenvalues(), fitted.eigenvalues())
    other = ekfac.sampled_batches(model, batches, obj, seed=4)
    assert not torch.equal(torch.cat([b["labels"] for b in other]), y)
    # Sampled = empirical on the sampled labels.
    emp = ekfac.fit(model, space, sampled, obj, fisher="empirical")
    assert torch.equal(emp.eigenvalues(), fitted.eigenvalues())


def test_ekfac_refuses_parameters_outside_linear_modules():
    model, train, val, _ = tiny_bert_problem()
    space = mftx.select_params(
        model, include=[r"layer\.1\.output\."], exclude=None, structural=False
    )
    assert any("LayerNorm" in n for n in space.names)
    with pytest.raises(
        ValueError, match=r"linear modules only \(nn\.Linear, GPT-2's Conv1D\).*LayerNorm"
    ):
        mftx.score(model, train, val, params=space, solver="ekfac", progress=False)
    with pytest.raises(ValueError, match=r"linear modules only.*LayerNorm.*another solver"):
        mftx.score(model, train, val, params=space, progress=False)  # the default: EK-FAC
    with pytest.raises(ValueError, match="fisher must be one of"):
        mftx.score(model, train, val, solver="ekfac", fisher="true", progress=False)
    mlp, mtrain, mval, obj = mlp_problem()
    with pytest.raises(TypeError, match="fisher='empirical'"):
        ekfac.fit(mlp, mftx.select_params(mlp, exclude=None), mtrain, lambda m, b: obj(m, b))


def test_influence_with_ekfac():
    model, train, val, space = tiny_bert_problem()
    obj = mftx.HFClassification()
    s = mftx.score(model, train, val, params=space, solver="ekfac", damping=0.1, progress=False)
    fitted = ekfac.fit(model, space, train, obj, fisher="sampled", seed=0)
    theta = space.flatten(space.detached())
    g = mftx.Curvature(model, space, val, obj).gradient(val)[0]
    want = -theta * fitted.solve(g, 0.1)
    assert rel(space.flatten([s.scores[n] for n in space.names]), want) < 1e-12
    assert s.stats["damping"] == 0.1 and s.stats["n_hvp"] == 0
    assert s.stats["solver"]["solver"] == "ekfac" and s.stats["ekfac"]["fisher"] == "sampled"
    auto = mftx.score(model, train, val, params=space, solver="ekfac", damping="auto",
                      progress=False)  # fmt: skip
    assert auto.stats["damping"] == pytest.approx(0.01 * float(fitted.eigenvalues().max()))


def _tiny_gpt2(seed=0):
    import transformers as T

    from mftx.models import tiny_config

    config = tiny_config("gpt2", 40, 8, 2, 2, 16, 3, 16)
    config.initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T.AutoModelForSequenceClassification.from_config(
            config, attn_implementation="eager"
        )
    gen = torch.Generator().manual_seed(seed)

    def mk(n):
        ids = torch.randint(5, 40, (n, 6), generator=gen)
        mask = torch.ones(n, 6, dtype=torch.long)
        mask[0, 4:] = 0
        ids[mask == 0] = 0
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=gen),
        }

    return model.double().eval(), [mk(4), mk(3)], [mk(5)]


def conv1d_factors(model, module, batches, loss_fn):
    """A and S of a GPT-2 Conv1D (weight (d_in, d_out), y = x W + b), with the ones column."""
    d_in, d_out = module.weight.shape
    A, S = 0.0, 0.0
    for b in batches:
        n = b["labels"].shape[0]
        seen = {}

        def hook(mod, inputs, output, seen=seen):
            seen["a"] = inputs[0].detach()
            seen["probe"] = torch.zeros_like(output, requires_grad=True)
            return output + seen["probe"]

        h = module.register_forward_hook(hook)
        try:
            (delta,) = torch.autograd.grad(loss_fn(model, b) * n, seen["probe"])
        finally:
            h.remove()
        a = seen["a"].reshape(n, -1, d_in)
        a_bar = torch.cat([a, torch.ones_like(a[..., :1])], -1).reshape(-1, d_in + 1)
        w = b["attention_mask"].to(a.dtype).reshape(-1, 1)
        A = A + (a_bar * w).T @ a_bar
        d2 = delta.reshape(-1, d_out)
        S = S + d2.T @ d2
    return A, S


def test_ekfac_takes_gpt2_conv1d_and_equals_its_dense_definition():
    """GPT-2's Conv1D stores W as (in, out): the block of M = [Wᵀ | b] is read transposed."""
    model, train, val = _tiny_gpt2()
    obj = mftx.HFClassification()
    space = mftx.select_params(model, include=[r"h\.1\.attn\.c_proj", r"h\.1\.mlp\.c_fc"])
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("c_proj")} == {
        "Conv1D"
    }
    fitted = ekfac.fit(model, space, train, obj, fisher="empirical")
    assert [b.transposed for b in fitted.blocks] == [True, True]
    grads = per_example_grads(model, space, train, obj)
    mods = dict(model.named_modules())
    offsets = torch.tensor([0, *space.numels]).cumsum(0).tolist()
    n = space.numel
    F_dense = torch.zeros(n, n, dtype=torch.float64)
    for prefix in ("transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"):
        mod = mods[prefix]
        d_in, d_out = mod.weight.shape
        A, S = conv1d_factors(model, mod, train, obj)
        QA, QS = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
        w, bias = space.names.index(prefix + ".weight"), space.names.index(prefix + ".bias")
        index = []  # flat position of M[o, i]: W[i, o] for i < d_in, then b[o]
        for o in range(d_out):
            index += [offsets[w] + i * d_out + o for i in range(d_in)] + [offsets[bias] + o]
        index = torch.tensor(index)
        M = grads[:, index].reshape(-1, d_out, d_in + 1)
        lam = ((QS.T @ M @ QA) ** 2).mean(0)
        B = torch.kron(QS, QA)
        F_dense[index[:, None], index[None, :]] = B @ torch.diag(lam.reshape(-1)) @ B.T
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert rel(fitted.matvec(v), F_dense @ v) < 1e-9
    want = torch.linalg.solve(F_dense + 0.1 * torch.eye(n, dtype=torch.float64), v)
    assert rel(fitted.solve(v, 0.1), want) < 1e-9
    # read untransposed, the same factors give another operator: the test can fail
    for b in fitted.blocks:
        b.transposed = False
    assert rel(fitted.matvec(v), F_dense @ v) > 1e-3
