"""Sweep: launch shapes of the local add + RMSNorm + 1x128 FP8 quant kernel on one GPU.

The local kernel (kernels/add_rmsnorm_quant.py, the TP=1 path and the kernel after an NCCL
all-reduce) has two launch parameters: warps per program and token rows per program. This
times every candidate at every (hidden, tokens) point, graph-replayed as
bench_fused_ar_rms_quant.py does (4 rotating input sets, median over the replays), checks
every point's outputs against ops/reference.py (outputs poisoned first), records each
shape's registers and spills, and writes one JSON file; benchmarks/derive_launch_table.py turns it into
vllm_rocm_fused/kernels/local_launch_table.py.

Candidates per hidden: warps in {4, 8, 16, 32} with 4 to 32 row elements per thread (fewer
spill-free choices would be wasted compiles), x rows per program in {1, 2}. Inputs bf16,
weight offset 1, row-major scales, residual, no normed output (what the fused sites run).

    PYTHONPATH=. python benchmarks/sweep_local_launch.py --out RESULTS.json [--deadline-s S]

torch + Triton only; no vLLM. Prints a table of the fastest shape per point last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from measurement import (
    EPS,
    ROTATIONS,
    SWEEP_ROWS,
    SWEEP_WARPS,
    TOKENS,
    TP1_HIDDEN,
    check_outputs,
    local_candidates,
    machine_info,
    make_inputs,
    poisoned_outputs,
    time_graph,
)
from precompile import default_workers, warm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _compiled_local_kernels() -> dict:
    """This process's compiled specializations of the local kernel: {cache key: kernel}."""
    from vllm_rocm_fused.kernels import add_rmsnorm_quant as mod

    out = {}
    for device, cache in getattr(mod._add_rmsnorm_quant_kernel, "device_caches", {}).items():
        for key, kernel in cache[0].items():
            out[(str(device), key)] = kernel
    return out


def compile_and_describe(run_once) -> list[dict]:
    """Call ``run_once`` (compiles or loads one launch shape) and return the registers and
    spills of the kernels it added (best effort: Triton's cache layout differs between versions)."""
    try:
        before = set(_compiled_local_kernels())
    except Exception:  # noqa: BLE001 - introspection only
        before = None
    run_once()
    torch.cuda.synchronize()
    if before is None:
        return []
    described = []
    try:
        for key, kernel in _compiled_local_kernels().items():
            if key not in before:
                kernel._init_handles()
                described.append(
                    {"num_warps": kernel.metadata.num_warps, "regs": kernel.n_regs, "spills": kernel.n_spills}
                )
    except Exception as e:  # noqa: BLE001
        described.append({"error": f"{type(e).__name__}: {e}"})
    return described


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON path")
    p.add_argument("--hidden", type=int, nargs="+", default=list(TP1_HIDDEN))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--warps", type=int, nargs="+", default=list(SWEEP_WARPS))
    p.add_argument("--rows", type=int, nargs="+", default=list(SWEEP_ROWS))
    p.add_argument("--replays", type=int, default=50)
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

    from vllm_rocm_fused.kernels.add_rmsnorm_quant import add_rmsnorm_quant
    from vllm_rocm_fused.kernels.launch import local_launch, row_tile

    torch.cuda.set_device(0)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plan = {h: local_candidates(h, args.warps, args.rows) for h in args.hidden}
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
            "candidates": {str(h): c for h, c in plan.items()},
        },
        "results": [],
    }
    workers = default_workers() if args.precompile_workers is None else args.precompile_workers
    if workers > 0:
        jobs = [("local", h, w, r, True, False) for h in args.hidden for w, r in plan[h]]
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
        for warps, rows in plan[hidden]:  # compile (or load) each shape once, outside the timing
            rec = {"hidden": hidden, "num_warps": warps, "rows": rows}
            try:
                xs, res, w = make_inputs(1, 2 * rows, hidden, 1, "cuda")
                rec["compiled"] = compile_and_describe(
                    lambda: add_rmsnorm_quant(
                        xs[0], res, w, EPS, weight_offset=1.0, num_warps=warps, rows_per_program=rows
                    )
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
            for warps, rows in plan[hidden]:
                rec = {"hidden": hidden, "tokens": t, "num_warps": warps, "rows": rows}
                try:

                    def run(inputs, warps=warps, rows=rows):
                        xs, res, w = inputs
                        return add_rmsnorm_quant(
                            xs[0], res, w, EPS, weight_offset=1.0, num_warps=warps, rows_per_program=rows
                        )

                    us = time_graph([lambda inputs=inputs: run(inputs) for inputs in sets], args.replays)
                    rec.update(
                        median_us=statistics.median(us),
                        min_us=min(us),
                        p10_us=statistics.quantiles(us, n=10)[0],
                        p90_us=statistics.quantiles(us, n=10)[-1],
                    )
                    fx, fres, fw = fresh
                    out = add_rmsnorm_quant(
                        fx[0],
                        fres,
                        fw,
                        EPS,
                        weight_offset=1.0,
                        num_warps=warps,
                        rows_per_program=rows,
                        outputs=poisoned_outputs(t, hidden),
                    )
                    rec.update(check_outputs(out, fx, fres, fw, bf16_sum=False))
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rec["in_use"] = (warps, rows) == (rule.num_warps, rule.rows)
                report["results"].append(rec)
            del sets, fresh
            ok = [r for r in report["results"] if r["hidden"] == hidden and r["tokens"] == t and r.get("ok")]
            if ok:
                best = min(ok, key=lambda r: r["median_us"])
                print(
                    f"H={hidden} T={t}: best warps={best['num_warps']} rows={best['rows']} "
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
                    "rows",
                    "error",
                    "q_err_in_fp8_steps",
                    "rel_err_residual",
                    "rel_err_scale",
                )
            },
        )
    return 0 if not bad else 1


def table(report: dict) -> str:
    """Per hidden: the fastest shape at each token count ("w8r1 2.31")."""
    by: dict[int, dict[int, list]] = {}
    for r in report["results"]:
        if r.get("ok"):
            by.setdefault(r["hidden"], {}).setdefault(r["tokens"], []).append(r)
    tokens = sorted({t for rows in by.values() for t in rows})
    lines = [
        "fastest launch shape (warps w, rows per program r) and its median us:",
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
            cells.append(f"w{b['num_warps']}r{b['rows']} {b['median_us']:.1f}")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
