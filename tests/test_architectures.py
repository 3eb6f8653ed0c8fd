"""Beyond BERT: tiny random RoBERTa, DistilBERT, GPT-2, Llama and ViT classifiers.

For each family: the structural default selection (exactly the attention and MLP
blocks), gradient and influence scores (Hessian and GGN) against dense float64
oracles, masking with bitwise restore, the zeroing evaluator against brute force,
and `mftx analyze` end to end on a saved checkpoint of each text family.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from _toys import TOY_WORDS, dense_ggn, toy_sst2
from torch.func import functional_call, hessian

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mftx
from mftx import masking
from mftx.cli import main
from mftx.evaluate import ZeroingEvaluator, evaluate
from mftx.models import TINY_FAMILIES, load_classifier, make_tiny_classifier, tiny_config

FAMILIES = [*TINY_FAMILIES, "vit"]
VOCAB = 40

#: The attention and MLP blocks of each family: what the default selection must analyse.
BLOCKS = {
    "bert": r"^bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|"
    r"attention\.output\.dense|intermediate\.dense|output\.dense)\.(weight|bias)$",
    "roberta": r"^roberta\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|"
    r"attention\.output\.dense|intermediate\.dense|output\.dense)\.(weight|bias)$",
    "distilbert": r"^distilbert\.transformer\.layer\.\d+\.(attention\.(q|k|v|out)_lin|"
    r"ffn\.lin[12])\.(weight|bias)$",
    "gpt2": r"^transformer\.h\.\d+\.(attn\.c_(attn|proj)|mlp\.c_(fc|proj))\.(weight|bias)$",
    "llama": r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$",
    "vit": r"^vit\.layers\.\d+\.(attention\.[qkvo]_proj|mlp\.fc[12])\.(weight|bias)$",
}
#: Names the old BERT-name patterns let through on each family (the bug this fixes).
LEAKED_BY_NAMES = {
    "gpt2": ["transformer.wte.weight", "transformer.h.0.ln_1.weight", "score.weight"],
    "distilbert": ["pre_classifier.weight"],
    "llama": ["model.embed_tokens.weight", "model.norm.weight", "score.weight"],
}
#: 64-80 analysed parameters in the last block (attention output, MLP output bias),
#: for dense oracles.
SMALL = {
    "bert": [r"layer\.1\.attention\.output\.dense", r"layer\.1\.output\.dense\.bias"],
    "roberta": [r"layer\.1\.attention\.output\.dense", r"layer\.1\.output\.dense\.bias"],
    "distilbert": [r"layer\.1\.attention\.out_lin", r"layer\.1\.ffn\.lin2\.bias"],
    "gpt2": [r"h\.1\.attn\.c_proj", r"h\.1\.mlp\.c_proj\.bias"],
    "llama": [r"layers\.1\.self_attn\.o_proj"],
    "vit": [r"layers\.1\.attention\.o_proj", r"layers\.1\.mlp\.fc2\.bias"],
}
HIDDEN, INTER = 8, 16
#: Llama's and ViT's eager attention take the softmax in float32 (Llama's RMSNorm too), even
#: in a float64 model: mftx's per-batch derivatives and the oracle's whole-set ones scale
#: the values passing there differently, so float32 rounding separates them by ~1e-8.
LOOSE = {"llama": 1e-6, "vit": 1e-6}


def tiny_model(family: str, seed: int = 0):
    """A float64, eager-attention, 2-block, 8-wide random classifier with 3 labels."""
    import transformers as T

    if family == "vit":
        config = T.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=INTER, num_labels=3,
        )  # fmt: skip
        cls = T.AutoModelForImageClassification
    else:
        config = tiny_config(family, VOCAB, HIDDEN, 2, 2, INTER, 3, 16)
        cls = T.AutoModelForSequenceClassification
    config.initializer_range = 0.2  # far enough from zero for curvature to matter
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config, attn_implementation="eager")
    return model.double().eval()


def batches(family: str, sizes, seed: int):
    """Batches of the family's inputs; text rows are right-padded with id 0 (pad)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        labels = torch.randint(0, 3, (n,), generator=gen)
        if family == "vit":
            out.append({"pixel_values": torch.randn(n, 3, 8, 8, generator=gen).double(),
                        "labels": labels})  # fmt: skip
            continue
        length = 6
        ids = torch.randint(5, VOCAB, (n, length), generator=gen)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, length - 2 :] = 0  # padding
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def problem(request):
    family = request.param
    model = tiny_model(family)
    return family, model, batches(family, [4, 3], 0), batches(family, [5], 1)


def _logits(model, state, b):
    return functional_call(model, state, (), {k: v for k, v in b.items() if k != "labels"}).logits


def mean_ce(model, space, batches):
    """flat θ -> row-weighted mean cross-entropy of the logits (not transformers' own loss,
    which some families compute in float32)."""

    def f(theta):
        state = dict(zip(space.names, space.unflatten(theta)))
        total = sum(F.cross_entropy(_logits(model, state, b), b["labels"], reduction="sum")
                    for b in batches)  # fmt: skip
        return total / sum(len(b["labels"]) for b in batches)

    return f


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ---------------------------------------------------------------- default selection


def test_default_selection_is_the_attention_and_mlp_blocks(problem):
    family, model, _, _ = problem
    space = mftx.select_params(model)
    names = [n for n, _ in model.named_parameters()]
    want = [n for n in names if re.search(BLOCKS[family], n)]
    assert list(space.names) == want
    s = space.summary()
    total = sum(p.numel() for p in model.parameters())
    excluded = sum(g["params"] for g in s["excluded"].values())
    assert s["total"] == total and s["analysed"] + excluded == total
    assert {"embedding", "normalisation", "head"} <= set(s["excluded"])
    for g in s["excluded"].values():
        assert g["why"] and 1 <= len(g["examples"]) <= 3
    # What the old name patterns would have analysed is now left out.
    old = set(mftx.select_params(model, exclude=mftx.DEFAULT_EXCLUDE, structural=False).names)
    for name in LEAKED_BY_NAMES.get(family, []):
        assert name in old and name not in space.names


def test_structural_selection_names_its_reasons(problem):
    family, model, _, _ = problem
    reasons = {n: r for n, r, _ in mftx.select_params(model).excluded}
    head = {"bert": "classifier.weight", "roberta": "classifier.out_proj.weight",
            "distilbert": "pre_classifier.weight", "gpt2": "score.weight",
            "llama": "score.weight", "vit": "classifier.weight"}[family]  # fmt: skip
    assert reasons[head] == "head"
    emb = model.get_input_embeddings()
    assert all(reasons[n] == "embedding" for n, p in model.named_parameters()
               if any(p is q for q in emb.parameters()))  # fmt: skip
    norms = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(reasons[f"{m}.weight"] == "normalisation" for m in norms)


def test_include_cannot_reach_structurally_excluded_tensors(problem):
    family, model, _, _ = problem
    norms = [n for n, r, _ in mftx.select_params(model).excluded if r == "normalisation"]
    include = [re.escape(n) for n in norms]
    with pytest.raises(ValueError, match="structural=False") as err:
        mftx.select_params(model, include=include)
    assert f"{len(norms)} by normalisation" in str(err.value)
    assert list(mftx.select_params(model, include=include, structural=False).names) == norms


def test_bert_base_and_gpt2_small_on_the_meta_device():
    """Real shapes without allocating them: BERT-base keeps the reference study's space."""
    import transformers as T

    with torch.device("meta"):
        bert = T.BertForSequenceClassification(T.BertConfig(num_labels=2))
        gpt2 = T.GPT2ForSequenceClassification(T.GPT2Config(num_labels=2, pad_token_id=0))
    s = mftx.select_params(bert).summary()
    assert (s["analysed"], s["total"]) == (85_017_600, 109_483_778)
    assert {k: g["params"] for k, g in s["excluded"].items()} == {
        "embedding": (30522 + 512 + 2) * 768, "normalisation": 25 * 2 * 768, "pooler": 590_592,
        "head": 1_538,
    }  # fmt: skip
    g = mftx.select_params(gpt2).summary()
    # GPT-2 small: 12 blocks × (c_attn, c_proj, c_fc, c_proj with biases).
    assert g["analysed"] == 12 * (768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072
                                  + 3072 * 768 + 768)  # fmt: skip
    assert g["excluded"]["embedding"]["params"] == (50257 + 1024) * 768


# ---------------------------------------------------------------- scores against oracles


@pytest.mark.parametrize("solver", ["cg", "minres"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_influence_matches_a_dense_float64_solve(problem, curvature, solver):
    family, model, train, val = problem
    space = mftx.select_params(model, include=SMALL[family])
    assert 64 <= space.numel <= 80
    theta = space.flatten(space.detached())
    if curvature == "hessian":
        C = hessian(mean_ce(model, space, train))(theta).detach()
        damping = 2.0 * max(0.0, -float(torch.linalg.eigvalsh(C).min())) + 0.05
    else:
        C = dense_ggn(model, space, train, lambda state, b: _logits(model, state, b),
                      lambda z, b: F.cross_entropy(z, b["labels"]))  # fmt: skip
        damping = 0.05
    g_val = torch.func.grad(mean_ce(model, space, val))(theta).detach()
    want = -theta * torch.linalg.solve(C + damping * torch.eye(space.numel).double(), g_val)
    # CG and MINRES check the residual recomputed from s, which rounding keeps above ~1e-12,
    # and above ~1e-8 (ViT) or ~5e-7 (Llama) where the model rounds through float32 (LOOSE)
    tol = {"llama": 1e-6, "vit": 1e-8}.get(family, 1e-9)
    got = mftx.score(model, train, val, method="influence", params=space, curvature=curvature,
                     solver=solver, damping=damping, tol=tol, max_iter=300, strict=True,
                     progress=False)  # fmt: skip
    assert got.converged and got.stats["solver"]["relative_residual"] <= tol
    assert rel(space.flatten([got.scores[n] for n in space.names]), want) < LOOSE.get(family, 1e-8)


def test_the_default_influence_runs_on_every_family(problem):
    """EK-FAC (the default) covers every family's analysed blocks, GPT-2's Conv1D included:
    the scores are −θ ⊙ (F + 0.01 I)⁻¹ ∇L_val with F the fitted EK-FAC and ∇L_val taken
    here by autograd, and the run is silent (pytest turns warnings into errors)."""
    from mftx.inverse import ekfac

    family, model, train, val = problem
    space = mftx.select_params(model)
    got = mftx.score(model, train, val, progress=False)
    assert got.stats["solver"]["solver"] == "ekfac" and got.converged is None
    theta = space.flatten(space.detached())
    g_val = torch.func.grad(mean_ce(model, space, val))(theta).detach()
    fitted = ekfac.fit(model, space, train, mftx.HFClassification(), seed=0)
    want = -theta * fitted.solve(g_val, 0.01)
    assert rel(space.flatten([got.scores[n] for n in space.names]), want) < LOOSE.get(family, 1e-8)


def test_gradient_rule_on_the_default_space(problem):
    family, model, train, _ = problem
    space = mftx.select_params(model)
    theta = space.flatten(space.detached())
    g = torch.func.grad(mean_ce(model, space, train))(theta).detach()
    lr = 0.05
    got = mftx.score(model, train, None, method="gradient", lr=lr, progress=False)
    assert list(got.names) == list(space.names)
    want = theta.abs() - (theta - lr * g).abs()
    assert rel(space.flatten([got.scores[n] for n in space.names]), want) < LOOSE.get(family, 1e-10)


# ---------------------------------------------------------------- masking and evaluation


def test_masking_changes_the_model_and_restores_bitwise(problem):
    family, model, train, val = problem
    space = mftx.select_params(model)
    before = masking.fingerprint(list(model.state_dict().values()))
    base = evaluate(model, val)
    s = mftx.score(model, train, val, method="taylor", progress=False)
    with mftx.masked(space, s.candidates(50)):
        assert evaluate(model, val)["loss"] != base["loss"]
    assert masking.fingerprint(list(model.state_dict().values())) == before
    assert evaluate(model, val) == base


def test_zeroing_evaluator_matches_brute_force(problem):
    family, model, _, val = problem
    space = mftx.select_params(model)
    ev = ZeroingEvaluator(model, space, val)
    assert ev.layers is not None and len(ev.layers) == 2  # blocks before the zeroed one replay
    last = len(space) - 1
    for t, f in [(0, 3), (last, 1), (len(space) // 2, 0)]:
        p = space.params[t].detach().view(-1)
        saved = p[f].clone()
        with torch.no_grad():
            p[f] = 0
            after = evaluate(model, val)["loss"]
            p[f] = saved
        assert ev.delta(t, f) == pytest.approx(after - ev.base, rel=1e-6, abs=1e-13)


# ---------------------------------------------------------------- analyze end to end


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return toy_sst2(tmp_path_factory.mktemp("sst2"), n_train=16, n_dev=12)


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "bert"])  # bert: test_cli
def test_analyze_end_to_end_on_a_local_checkpoint(family, toy_data, tmp_path, capsys):
    ckpt = make_tiny_classifier(tmp_path / f"tiny-{family}", TOY_WORDS, family=family,
                                hidden_size=16, intermediate=32)  # fmt: skip
    out = tmp_path / "an"
    rc = main([
        "analyze", str(ckpt), "--data", str(toy_data), "--train-size", "16", "--batch-size", "8",
        "--ks", "5,50", "--methods", "gradient,influence-ggn", "--damping", "1.0",
        "--max-iter", "5", "--fidelity-samples", "4", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    model, _ = load_classifier(ckpt)
    space = mftx.select_params(model)
    ck = out / ckpt.name
    result = lambda name: json.loads((ck / name).read_text())["result"]  # noqa: E731
    info = result("checkpoint.json")
    assert info["analysed_params"] == space.numel < info["total_params"]
    scores = mftx.Scores.load(ck / "scores-influence-ggn.safetensors")
    assert list(scores.names) == list(space.names)
    for label in ("gradient", "influence-ggn"):
        sweep = result(f"sweep-{label}.json")
        assert sweep["restored_bitwise"] and [p["k"] for p in sweep["points"]] == [5, 50]
    fid = result("fidelity.json")
    assert len(fid["samples"]) == 4 and set(fid["summary"]) == {"gradient", "influence-ggn"}
