"""Print a pytest-benchmark JSON file as markdown tables of ratios per group.

    python benchmarks/summarize.py bench.json                       # ratios to "compiled"
    python benchmarks/summarize.py bench-hvp.json --baseline gradient

In every group, the benchmark matching ``--baseline`` (its ``extra_info["impl"]``,
its parametrisation id or a part of its test name) is the reference point; each
other member gets a row with its time and ``member / baseline`` (so with the
default baseline, "reference" rows give how many times faster the compiled op
is). Benchmarks that recorded ``extra_info["peak_extra_mib"]`` (memory checks)
are listed in a separate table instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def label(b: dict) -> str:
    info = b.get("extra_info") or {}
    if info.get("impl"):
        return str(info["impl"])
    return b.get("param") or b["name"]


def is_baseline(b: dict, baseline: str) -> bool:
    return label(b) == baseline or baseline in b["name"]


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def summarize(data: dict, baseline: str = "compiled", stat: str = "median") -> str:
    groups = defaultdict(list)
    memory = []
    for b in data["benchmarks"]:
        if "peak_extra_mib" in (b.get("extra_info") or {}):
            memory.append(b)
        else:
            groups[b.get("group") or b["name"]].append(b)

    lines = []
    machine = data.get("machine_info") or {}
    if machine:
        cpu = (machine.get("cpu") or {}).get("brand_raw", "?")
        lines.append(
            f"Machine: {cpu}, {(machine.get('cpu') or {}).get('count', '?')} CPUs; "
            f"Python {machine.get('python_version', '?')}; {data.get('datetime', '')}"
        )
        lines.append("")
    lines.append(f"| group | {baseline} ({stat}) | other | other ({stat}) | other / {baseline} |")
    lines.append("|---|---:|---|---:|---:|")
    for group, members in groups.items():
        base = next((b for b in members if is_baseline(b, baseline)), None)
        t_base = base["stats"][stat] if base else None
        others = [b for b in members if b is not base] or []
        if not others and base is not None:
            lines.append(f"| {group} | {fmt_time(t_base)} | — | — | — |")
        for b in others:
            t = b["stats"][stat]
            ratio = f"{t / t_base:.1f}×" if t_base else "—"
            base_txt = fmt_time(t_base) if t_base else "—"
            lines.append(f"| {group} | {base_txt} | {label(b)} | {fmt_time(t)} | {ratio} |")

    if memory:
        lines += [
            "",
            "| memory check | impl | peak extra RSS | output | data |",
            "|---|---|---:|---:|---:|",
        ]
        for b in memory:
            i = b["extra_info"]
            lines.append(
                f"| {b.get('group') or b['name']} | {label(b)} | {i['peak_extra_mib']:.1f} MiB | "
                f"{i.get('output_mib', float('nan')):.1f} MiB | {i.get('data_mib', float('nan')):.0f} MiB |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="file written by pytest --benchmark-json")
    p.add_argument("--baseline", default="compiled", help="member each group is compared to")
    p.add_argument("--stat", default="median", choices=["median", "mean", "min", "max"])
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    print(summarize(data, args.baseline, args.stat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
