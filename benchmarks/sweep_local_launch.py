"""Sweep: launch shapes of the local add + RMSNorm + 1x128 FP8 quant kernel on one GPU.

The local kernel (kernels/add_rmsnorm_quant.py, the TP=1 path and the kernel after an NCCL
all-reduce) has two launch parameters: warps per program and 128-groups per program (the
slice; the row's group count rounded up to a power of two = one program per row, smaller =
the row split over several programs). This times every candidate at every (hidden, tokens)
point, graph-replayed as bench_fused_ar_rms_quant.py does (4 rotating input sets, median over
the replays), checks every point's outputs against ops/reference.py (outputs poisoned first),
records each shape's registers and spills, and writes one JSON file;
benchmarks/derive_launch_table.py turns it into vllm_rocm_fused/kernels/local_launch_table.py.

Candidates (measurement.local_candidates): warps in {4, 8, 16} x every power-of-two slice
up to SPLIT_MAX_TOKENS tokens, one program per row above. Inputs bf16, weight offset 1,
row-major scales, residual, no normed output (what the fused sites run).

    PYTHONPATH=. python benchmarks/sweep_local_launch.py --out RESULTS.json [--deadline-s S]

torch + Triton only; no vLLM. Prints a table of the fastest shape per point last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from measurement import (
    EPS,
    ROTATIONS,
    SPLIT_MAX_TOKENS,
    SWEEP_WARPS,
    TOKENS,
    TP1_HIDDEN,
    WARMUP_S,
    check_outputs,
    kernel_resources,
    local_candidates,
    machine_info,
    make_inputs,
    poisoned_outputs,
    replay_stats,
    time_graph,
)
from precompile import default_workers, warm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--hidden", type=int, nargs="+", default=list(TP1_HIDDEN))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--warps", type=int, nargs="+", default=list(SWEEP_WARPS))
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--warmup-s", type=float, default=WARMUP_S, help="warm-up replays per candidate (seconds)")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="stop starting new points after this many seconds (the file keeps what was done)",
    )
    p.add_argument("--precompile-workers", type=int, default=None, help="0: compile in this process only")
    p.add_argument("--precompile-timeout-s", type=float, default=120)
    args = p.parse_args(argv)
    t0 = time.time()

    from vllm_rocm_fused.kernels.add_rmsnorm_quant import _add_rmsnorm_quant_kernel, add_rmsnorm_quant
    from vllm_rocm_fused.kernels.launch import local_launch, row_tile

    torch.cuda.set_device(0)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plan = {h: local_candidates(h, warps=args.warps) for h in args.hidden}
    report = {
        # the output path as committed: where the file went on the measuring machine is not a
        # fact about the run
        "command": "PYTHONPATH=. python benchmarks/sweep_local_launch.py "
        + " ".join(
            f"benchmarks/results/{Path(a).name}" if a == args.out else a
            for a in (sys.argv[1:] if argv is None else argv)
        ),
        "machine": machine_info(1),
        "settings": {
            "rotations": ROTATIONS,
            "replays": args.replays,
            "eps": EPS,
            "dtype": "bfloat16",
            "group_size": 128,
            "scale_layout": "row",
            "weight_offset": 1.0,
            "residual": True,
            "emit_bf16": False,
            "warmup_s": args.warmup_s,
            "candidates": {str(h): c for h, c in plan.items()},
            "one_program_per_row_above_tokens": SPLIT_MAX_TOKENS,
        },
        "results": [],
    }
    workers = default_workers() if args.precompile_workers is None else args.precompile_workers
    if workers > 0:
        jobs = [("local", h, w, g, True, False) for h in args.hidden for w, g in plan[h]]
        report["precompile"] = warm(jobs, workers=workers, timeout_s=args.precompile_timeout_s)
    report["settings"]["precompile_s"] = round(time.time() - t0, 1)

    def save():
        report["settings"]["wall_s"] = round(time.time() - t0, 1)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out_path)

    stopped = False
    report["kernels"] = []
    for hidden in args.hidden:
        for warps, slice_g in plan[hidden]:  # compile (or load) each shape once, outside the timing
            rec = {"hidden": hidden, "num_warps": warps, "slice_groups": slice_g}
            try:
                xs, res, w = make_inputs(1, 2, hidden, 1, "cuda")
                rec["compiled"] = kernel_resources(
                    _add_rmsnorm_quant_kernel,
                    lambda: add_rmsnorm_quant(
                        xs[0], res, w, EPS, weight_offset=1.0, num_warps=warps, slice_groups=slice_g
                    ),
                )
            except Exception as e:  # noqa: BLE001 - the points of this shape record it again
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            report["kernels"].append(rec)
        for t in args.tokens:
            if args.deadline_s is not None and time.time() - t0 > args.deadline_s:
                stopped = True
                break
            sets = [make_inputs(1, t, hidden, hidden * 1009 + t + 7 * k, "cuda") for k in range(ROTATIONS)]
            fresh = make_inputs(1, t, hidden, hidden * 1009 + t + 999, "cuda")
            rule = local_launch(hidden, t, row_tile(hidden, 128))
            for warps, slice_g in local_candidates(hidden, t, warps=args.warps):
                rec = {"hidden": hidden, "tokens": t, "num_warps": warps, "slice_groups": slice_g}
                try:

                    def run(inputs, warps=warps, slice_g=slice_g):
                        xs, res, w = inputs
                        return add_rmsnorm_quant(
                            xs[0], res, w, EPS, weight_offset=1.0, num_warps=warps, slice_groups=slice_g
                        )

                    us = time_graph(
                        [lambda inputs=inputs: run(inputs) for inputs in sets], args.replays, warmup_s=args.warmup_s
                    )
                    rec.update(replay_stats(us))
                    fx, fres, fw = fresh
                    out = add_rmsnorm_quant(
                        fx[0],
                        fres,
                        fw,
                        EPS,
                        weight_offset=1.0,
                        num_warps=warps,
                        slice_groups=slice_g,
                        outputs=poisoned_outputs(t, hidden),
                    )
                    rec.update(check_outputs(out, fx, fres, fw, bf16_sum=False))
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rec["in_use"] = (warps, slice_g) == (rule.num_warps, rule.slice_groups)
                report["results"].append(rec)
            del sets, fresh
            ok = [r for r in report["results"] if r["hidden"] == hidden and r["tokens"] == t and r.get("ok")]
            if ok:
                best = min(ok, key=lambda r: r["median_us"])
                print(
                    f"H={hidden} T={t}: best warps={best['num_warps']} slice={best['slice_groups']} "
                    f"{best['median_us']:.2f} us of {len(ok)} ok",
                    flush=True,
                )
            save()  # a run cut short keeps its data
        if stopped:
            break
    report["stopped_early"] = stopped
    save()
    print(table(report))
    bad = [r for r in report["results"] if not r.get("ok")]
    print(
        f"\n{len(report['results'])} points, {len(bad)} failed or errored; {report['settings']['wall_s']} s"
        + ("; stopped at the deadline" if stopped else "")
    )
    for r in bad[:10]:
        print(
            "  FAILED",
            {
                k: r.get(k)
                for k in (
                    "hidden",
                    "tokens",
                    "num_warps",
                    "slice_groups",
                    "error",
                    "q_err_in_fp8_steps",
                    "rel_err_residual",
                    "rel_err_scale",
                )
            },
        )
    return 0 if not bad else 1


def table(report: dict) -> str:
    """Per hidden: the fastest shape at each token count ("w8s4 2.31": 8 warps, 4 groups per program)."""
    by: dict[int, dict[int, list]] = {}
    for r in report["results"]:
        if r.get("ok"):
            by.setdefault(r["hidden"], {}).setdefault(r["tokens"], []).append(r)
    tokens = sorted({t for rows in by.values() for t in rows})
    lines = [
        "fastest launch shape (warps w, 128-groups per program s) and its median us:",
        "| hidden | " + " | ".join(str(t) for t in tokens) + " |",
        "|---" * (len(tokens) + 1) + "|",
    ]
    for h in sorted(by):
        cells = []
        for t in tokens:
            rs = by[h].get(t)
            if not rs:
                cells.append("-")
                continue
            b = min(rs, key=lambda r: r["median_us"])
            cells.append(f"w{b['num_warps']}s{b['slice_groups']} {b['median_us']:.2f}")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
