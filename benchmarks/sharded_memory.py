"""Per-rank memory of scoring an FSDP2-sharded BERT (run under torchrun, gloo, CPU).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=N \
        benchmarks/sharded_memory.py [--hidden 384 --layers 4]

Builds a random-init BERT (float32, eager attention), wraps every encoder layer and the
model with `fully_shard`, scores it with the gradient rule and EK-FAC, and prints one JSON
line per rank: the analysed parameters held (local / whole), the score entries held, the
EK-FAC factor and Λ bytes, and the process's peak RSS (MiB). Run with N = 1 and N = 2 to
compare.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig, BertForSequenceClassification

import mftx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=int, default=2, help="batches per rank (8 x 32 tokens)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    gen = torch.Generator().manual_seed(1 + rank)
    batches = [
        {"input_ids": torch.randint(1, 1000, (8, 32), generator=gen),
         "attention_mask": torch.ones(8, 32, dtype=torch.long),
         "labels": torch.randint(0, 2, (8,), generator=gen)}
        for _ in range(args.batches)
    ]  # fmt: skip
    space = mftx.select_params(model)
    out = {"rank": rank, "world": world}
    for method, kw in (("gradient", {}), ("influence", {"solver": "ekfac", "damping": 0.1})):
        s = mftx.score(model, batches, batches, method=method, params=space, progress=False, **kw)
        sh = s.stats["shard"]
        out[method] = {"local_numel": sh["local_numel"], "numel": sh["numel"],
                       "score_entries": sum(t.numel() for t in s.tensors())}  # fmt: skip
        if "ekfac" in s.stats:
            out[method].update({k: s.stats["ekfac"][k] for k in ("factor_bytes", "lambda_bytes")})
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
