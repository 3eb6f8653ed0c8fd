"""Worker for test_sharded.py: score an FSDP2-sharded copy of the problem on this rank (torchrun)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))

from _fsdp_cases import METHODS, K, problem

import mftx
from mftx.core.dist import shard
from mftx.sharded import ShardedMask, ShardedSpace


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, train, val, objective = problem()
    for mod in model:
        if isinstance(mod, torch.nn.Linear):
            fully_shard(mod)
    fully_shard(model)
    space = mftx.select_params(model, exclude=None)
    val_all = val
    train, val = shard(train), shard(val)
    report = {}
    for name, kw in METHODS.items():
        s = mftx.score(model, train, val, params=space, loss_fn=objective, progress=False, **kw)
        s.save(out / f"{name}-rank{rank}.safetensors")
        c = s.candidates(K)
        report[name] = {
            "tensor_index": c.tensor_index.tolist(), "flat_index": c.flat_index.tolist(),
            "local_numel": s.stats["shard"]["local_numel"], "numel": s.stats["shard"]["numel"],
        }  # fmt: skip
    # Masking on the shards: the loss with the top-K of the gradient rule zeroed, then restored.
    sh = ShardedSpace(space)
    before = [t.clone() for t in sh.local]
    c = mftx.Scores.load(out / f"gradient-rank{rank}.safetensors")  # local rows only
    cands = mftx.score(model, train, val, params=space, loss_fn=objective, progress=False,
                       **METHODS["gradient"]).candidates(K)  # fmt: skip
    with ShardedMask(sh) as mask:
        mask.push(cands)
        with torch.no_grad():
            masked = [float(objective(model, b)) for b in val_all]  # same forwards everywhere
    report["masked_val_losses"] = masked
    report["restored"] = all(torch.equal(a, b) for a, b in zip(before, sh.local))
    report["local_score_numel"] = sum(t.numel() for t in c.tensors())
    try:
        mftx.score(model, train, val, params=space, loss_fn=objective, method="influence",
                   solver="minres", progress=False)  # fmt: skip
        report["refusal"] = None
    except ValueError as e:
        report["refusal"] = str(e)
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # nobody tears gloo down while another rank still talks
    dist.destroy_process_group()
    # Every result is on disk; leave without C++ static destructors, where gloo's threads
    # aborted under load ("terminate called without an active exception", CI 2026-12-05).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
