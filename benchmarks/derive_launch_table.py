"""Derive the local kernel's launch table from a sweep (sweep_local_launch.py's JSON).

For each hidden size and measured token count, the candidates whose outputs passed the
reference check are ranked by median time. A token count keeps the previous count's shape
when that shape is within TOLERANCE of the fastest there (so noise between near-equal shapes
does not split the table into many ranges); otherwise it takes the fastest. Runs of equal
shapes become one entry (max_tokens = the run's last count; the last entry covers every
larger count). A token count between two measured ones gets the shape of the next measured
count above it.

    python benchmarks/derive_launch_table.py SWEEP.json [--write vllm_rocm_fused/kernels/local_launch_table.py]

Prints the table (and how much slower than the per-point fastest it is anywhere); with
--write, replaces the table module. Pure Python (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE_MODULE = ROOT / "vllm_rocm_fused" / "kernels" / "local_launch_table.py"
# 2%: at decode sizes a point is ~2 us, so 3% (the rule before 2026-12-03's third sweep) let a
# shape 0.06 us slower than the fastest stand, more than the sweep's noise between repeated
# runs (~0.02-0.04 us) and enough to put 2560 and 3072 x 64 tokens above the plain kernel.
TOLERANCE = 0.02


def derive(results: list[dict], tolerance: float = TOLERANCE) -> dict[int, tuple[tuple[int | None, int, int], ...]]:
    """hidden -> ((max_tokens, num_warps, slice_groups), ...) from sweep records."""
    times: dict[int, dict[int, dict[tuple[int, int], float]]] = {}
    for r in results:
        if r.get("ok") and "median_us" in r:
            shape = (r["num_warps"], r["slice_groups"])
            times.setdefault(r["hidden"], {}).setdefault(r["tokens"], {})[shape] = r["median_us"]
    table = {}
    for hidden, per_t in sorted(times.items()):
        chosen: list[tuple[int, tuple[int, int]]] = []
        for t in sorted(per_t):
            shapes = per_t[t]
            best = min(shapes, key=lambda s: (shapes[s], s))
            prev = chosen[-1][1] if chosen else None
            if prev is not None and prev in shapes and shapes[prev] <= shapes[best] * (1 + tolerance):
                best = prev
            chosen.append((t, best))
        entries = []
        for i, (t, shape) in enumerate(chosen):
            if i + 1 < len(chosen) and chosen[i + 1][1] == shape:
                continue
            entries.append((t, shape[0], shape[1]))
        _, w, r = entries[-1]
        entries[-1] = (None, w, r)
        table[hidden] = tuple(entries)
    return table


def lookup(table, hidden: int, tokens: int):
    for max_tokens, warps, slice_groups in table.get(hidden, ()):
        if max_tokens is None or tokens <= max_tokens:
            return warps, slice_groups
    return None


def worst_loss(results: list[dict], table) -> tuple[float, tuple | None]:
    """The largest ratio (table's shape / fastest shape) over the measured points."""
    times: dict[tuple[int, int], dict[tuple[int, int], float]] = {}
    for r in results:
        if r.get("ok") and "median_us" in r:
            times.setdefault((r["hidden"], r["tokens"]), {})[(r["num_warps"], r["slice_groups"])] = r["median_us"]
    worst, where = 1.0, None
    for (h, t), shapes in times.items():
        shape = lookup(table, h, t)
        if shape in shapes:
            ratio = shapes[shape] / min(shapes.values())
            if ratio > worst:
                worst, where = ratio, (h, t, shape)
    return worst, where


def _literal(value: str | None) -> str:
    """A Python literal as the formatter writes it (strings in double quotes)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def render(table, *, source: str, gpu: str | None, command: str | None) -> str:
    lines = [
        '"""Measured launch shapes of the local add + RMSNorm + group-quant kernel.',
        "",
        "Written by benchmarks/derive_launch_table.py from a launch-shape sweep",
        "(benchmarks/sweep_local_launch.py); do not edit by hand: rerun the sweep and the script.",
        f"Source: {source} ({gpu or 'unknown GPU'}); other GPUs use it as an estimate.",
        "",
        "TABLE: hidden -> ((max_tokens, num_warps, slice_groups), ...), by rising max_tokens;",
        "an entry covers the token counts above the previous entry's max_tokens up to its own",
        "(None: every larger count); slice_groups = 128-groups per program (a row over",
        "cdiv(groups, slice_groups) programs). Hidden sizes not listed run launch.local_launch's",
        "default (one program per row).",
        '"""',
        "",
        f"SOURCE = {_literal(source)}",
        f"GPU = {_literal(gpu)}",
        "TABLE: dict[int, tuple[tuple[int | None, int, int], ...]] = {",
    ]
    for hidden, entries in sorted(table.items()):
        lines.append(f"    {hidden}: {entries!r},")
    lines.append("}")
    if command:
        lines.insert(5, f"Sweep command: {command}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep_local_launch.py's results JSON")
    p.add_argument(
        "--write",
        nargs="?",
        const=str(TABLE_MODULE),
        default=None,
        help="write the table module (default path: the package's local_launch_table.py)",
    )
    p.add_argument("--source", default=None, help="the sweep file's path as the module should name it")
    p.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = p.parse_args(argv)
    report = json.loads(Path(args.sweep).read_text())
    table = derive(report["results"], args.tolerance)
    if not table:
        print("no passing points in the sweep: nothing derived", file=sys.stderr)
        return 1
    source = args.source or "benchmarks/results/h200_tp1_launch_sweep.json"
    text = render(table, source=source, gpu=report.get("machine", {}).get("gpu"), command=report.get("command"))
    worst, where = worst_loss(report["results"], table)
    print(text)
    print(f"# worst point against the per-point fastest shape: {worst:.3f}x at {where}")
    if args.write:
        Path(args.write).write_text(text)
        print(f"# written to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
