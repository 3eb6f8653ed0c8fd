"""Fine-tuning: the learning-rate schedule and exact resumption of an interrupted run."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_cli import workspace  # noqa: F401  (the tiny BERT and TSVs)

from mftx.study import finetune as experiments
from mftx.study.finetune import FinetuneConfig, finetune, lr_factor


def test_linear_schedule_warms_up_then_decays_to_zero():
    cfg = FinetuneConfig(schedule="linear", warmup_ratio=0.25)
    f = [lr_factor(cfg, s, 8) for s in range(8)]
    assert f[:2] == [0.5, 1.0]  # two warm-up steps of eight
    assert f[2:] == [1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert all(lr_factor(FinetuneConfig(), s, 8) == 1.0 for s in range(8))


@pytest.mark.parametrize(
    "field,value,match",
    [("schedule", "cosine", "schedule"), ("warmup_ratio", 1.0, "warmup_ratio"),
     ("state_every", -1, "state_every")],
)  # fmt: skip
def test_bad_recipe_is_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**{field: value}).validate()


def _cfg(model, data, **kw):
    return FinetuneConfig(
        model=str(model), data=str(data), train_size=32, batch_size=8, lr=1e-3, epochs=2,
        eval_every=2, targets=[0.3, 0.995], schedule="linear", warmup_ratio=0.2, state_every=2,
        progress=False, **kw,
    )  # fmt: skip


def _history(summary):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in summary["history"]]


def test_interrupted_run_resumes_to_the_same_result(workspace, tmp_path, monkeypatch):  # noqa: F811
    root, data, model = workspace
    full = finetune(_cfg(model, data), tmp_path / "full")
    assert full["complete"] and full["recipe"]["schedule"] == "linear"
    assert not (tmp_path / "full" / "state").exists()  # removed once complete

    # Interrupt the second run at its fourth evaluation (step 6 of 8).
    real, calls = experiments.evaluate, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(experiments, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(model, data), tmp_path / "cut")
    monkeypatch.setattr(experiments, "evaluate", real)
    saved = json.loads((tmp_path / "cut" / "state" / "state.json").read_text())
    assert saved["step"] == 4
    with pytest.raises(ValueError, match="lr"):  # another recipe is refused, state kept
        finetune(replace(_cfg(model, data), lr=2e-3), tmp_path / "cut")
    resumed = finetune(_cfg(model, data), tmp_path / "cut")
    assert _history(resumed) == _history(full)
    assert resumed["steps"] == full["steps"]
    ck = full["targets"]["0.30"]["checkpoint"]
    a = load_file(str(tmp_path / "full" / ck / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / ck / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_killed_between_the_state_renames_resumes(workspace, tmp_path, monkeypatch):  # noqa: F811
    """A kill after `state` became `state.old` and before `state.tmp` became `state`."""
    root, data, model = workspace
    real, calls = experiments.evaluate, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(experiments, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(model, data), tmp_path / "cut")
    out = tmp_path / "cut"
    (out / "state").replace(out / "state.old")  # the first rename done, the second not
    counted = []

    def counting(*args, **kw):
        counted.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(experiments, "evaluate", counting)
    resumed = finetune(_cfg(model, data), out)
    assert len(counted) == 2  # steps 6 and 8 only: it resumed at step 4, not from scratch
    full = finetune(_cfg(model, data), tmp_path / "full")
    assert _history(resumed) == _history(full)
    assert not (out / "state").exists() and not (out / "state.old").exists()
