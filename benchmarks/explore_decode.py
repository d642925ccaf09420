"""Exploration for issue 24: the TP=1 kernel at decode sizes (1-64 tokens), one GPU.

Times, graph-replayed as the benchmark does (4 rotating input sets, 8 captures of them per
graph, median over the replays), at every Qwen3.5 hidden size:
  dispatched    the public op (the local kernel at its launch table's shape; in the committed
                results benchmarks/results/h200_tp1_decode_explore.json, measured at commit
                4533c9e, the kernel before issue 24: a row in power-of-two parts, IEEE divisions)
  kernel_today  that kernel launched directly with the same shape (the op's own cost)
  plain         reference_kernels.plain_tile: one masked tile per row, 16 warps (twice:
                "plain" first and "plain_again" last at each point, the run's noise)
  empty         reference_kernels.empty: the floor of one kernel node
  s{G}_w{W}[_parts][_fast]   reference_kernels.sliced: G groups per program (G = the padded
                row: one program per row), W warps; _parts: the row's sum of squares over
                the power-of-two parts instead of one masked tile; _fast: reciprocal +
                Markstein correction instead of the IEEE division
at 1-64 tokens (every candidate) and at 1024-8192 tokens (one program per row only: the
large-batch rates, against the byte floor). Every variant of every point is checked against
ops/reference.py on fresh inputs (outputs poisoned first); each _fast variant's q bytes are
compared with its division twin's (the same kernel with the IEEE division) on the same inputs:
they must be identical.

    PYTHONPATH=. python benchmarks/explore_decode.py --out RESULTS.json [--deadline-s S]

torch + Triton only; no vLLM. Prints, per hidden size and token count, the fastest variant
of each family last.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import reference_kernels as rk
import torch
import triton
from measurement import (
    EPS,
    ROTATIONS,
    TP1_HIDDEN,
    check_outputs,
    copy_bandwidth,
    kernel_resources,
    machine_info,
    make_inputs,
    op_bytes,
    poisoned_outputs,
    replay_stats,
    time_graph,
)
from precompile import default_workers, warm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
LARGE_TOKENS = (1024, 4096, 8192)
FIXED = ("dispatched", "kernel_today", "plain", "empty")


def row_groups(hidden: int) -> int:
    return triton.next_power_of_2(hidden // 128)


def decode_variants(hidden: int) -> list[str]:
    """Candidate names at 1-64 tokens."""
    groups, row_g = hidden // 128, row_groups(hidden)
    names = [f"s{row_g}_w8", f"s{row_g}_w16", f"s{row_g}_w8_fast", f"s{row_g}_w16_fast"]
    for g in (1, 2, 4, 8, 16):
        if g < groups:
            names += [f"s{g}_w4", f"s{g}_w8"]
    for g in (1, 2):
        names.append(f"s{g}_w16")
    for g in (2, 4):
        names += [f"s{g}_w4_fast", f"s{g}_w8_fast"]
        if groups & (groups - 1):  # not a power of two: the row's parts differ from its tile
            names += [f"s{g}_w4_parts", f"s{g}_w8_parts"]
    return names


def large_variants(hidden: int) -> list[str]:
    """Candidate names at 1024-8192 tokens: one program per row."""
    row_g = row_groups(hidden)
    names = [f"s{row_g}_w8", f"s{row_g}_w8_fast", f"s{row_g}_w16_fast"]
    if row_g * 128 >= 32 * 32 * 4:
        names.append(f"s{row_g}_w32_fast")
    return names


def parse(name: str) -> dict:
    """'s4_w8_parts_fast' -> {"slice_groups": 4, "num_warps": 8, "row_parts": True, "fast_div": True}."""
    parts = name.split("_")
    return {
        "slice_groups": int(parts[0][1:]),
        "num_warps": int(parts[1][1:]),
        "row_parts": "parts" in parts,
        "fast_div": "fast" in parts,
    }


def runner(name: str):
    """(h, res, w, outputs) -> (q, scale, residual, normed) of variant ``name``."""
    from vllm_rocm_fused.kernels.add_rmsnorm_quant import add_rmsnorm_quant
    from vllm_rocm_fused.ops import fused_allreduce_rmsnorm_quant

    if name == "dispatched":
        return lambda h, res, w, outputs=None: tuple(fused_allreduce_rmsnorm_quant(h, res, w, EPS, weight_offset=1.0))
    if name == "kernel_today":
        return lambda h, res, w, outputs=None: add_rmsnorm_quant(h, res, w, EPS, weight_offset=1.0, outputs=outputs)
    if name in ("plain", "plain_again"):
        return lambda h, res, w, outputs=None: rk.plain_tile(h, res, w, EPS, outputs=outputs)
    if name == "empty":
        return lambda h, res, w, outputs=None: rk.empty(h)
    return functools.partial(_sliced, **parse(name))


def _sliced(h, res, w, outputs=None, **kw):
    return rk.sliced(h, res, w, EPS, outputs=outputs, **kw)


def compile_variant(hidden: int, name: str) -> None:
    """Compile (or load) one variant's kernel: precompile.py's ("call", ...) job."""
    torch.cuda.set_device(0)
    xs, res, w = make_inputs(1, 2, hidden, 1, "cuda")
    runner(name)(xs[0], res, w)
    torch.cuda.synchronize()


def measure(name, sets, fresh, replays, warmup_s, t, hidden) -> dict:
    rec: dict = {"hidden": hidden, "tokens": t, "variant": name}
    fn = runner(name)
    try:
        us = time_graph([functools.partial(fn, xs[0], res, w) for xs, res, w in sets], replays, warmup_s=warmup_s)
        rec.update(replay_stats(us))
        if name == "empty":
            rec["ok"] = True
            return rec
        fx, fres, fw = fresh
        outs = None if name == "dispatched" else poisoned_outputs(t, hidden)
        out = fn(fx[0], fres, fw, outs)
        rec.update(check_outputs(out, fx, fres, fw, bf16_sum=False))
        if name.endswith("_fast"):  # the same kernel with the IEEE division, same inputs: same q
            twin = runner(name[: -len("_fast")])(fx[0], fres, fw, poisoned_outputs(t, hidden))
            rec["q_same_as_div_rn"] = bool(torch.equal(twin[0].view(torch.uint8), out[0].view(torch.uint8)))
            rec["ok"] = rec["ok"] and rec["q_same_as_div_rn"]
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["ok"] = False
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, nargs="+", default=list(TP1_HIDDEN))
    p.add_argument("--tokens", type=int, nargs="+", default=list(DECODE_TOKENS))
    p.add_argument("--large-tokens", type=int, nargs="+", default=list(LARGE_TOKENS))
    p.add_argument("--replays", type=int, default=100)
    p.add_argument("--large-replays", type=int, default=30)
    p.add_argument("--warmup-s", type=float, default=0.02, help="warm-up per variant (the GPU stays busy between)")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--precompile-timeout-s", type=float, default=150)
    p.add_argument("--deadline-s", type=float, default=None, help="start no new point after this many seconds")
    args = p.parse_args(argv)
    t0 = time.time()
    torch.cuda.set_device(0)
    from vllm_rocm_fused.kernels.launch import local_launch, row_tile

    plan = {h: FIXED + tuple(decode_variants(h)) for h in args.hidden}
    large = {h: ("dispatched", "kernel_today", "plain", *large_variants(h)) for h in args.hidden}
    report: dict = {
        "command": "PYTHONPATH=. python benchmarks/explore_decode.py "
        + " ".join(
            f"benchmarks/results/{Path(a).name}" if a == args.out else a
            for a in (sys.argv[1:] if argv is None else argv)
        ),
        "machine": machine_info(1),
        "settings": {
            "rotations": ROTATIONS,
            "replays": args.replays,
            "large_replays": args.large_replays,
            "warmup_s": args.warmup_s,
            "eps": EPS,
            "dtype": "bfloat16",
            "weight_offset": 1.0,
            "plan": {str(h): list(v) for h, v in plan.items()},
            "large": {str(h): list(v) for h, v in large.items()},
        },
        "results": [],
        "kernels": [],
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["settings"]["wall_s"] = round(time.time() - t0, 1)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out_path)

    jobs = []
    for h in args.hidden:
        for name in dict.fromkeys(plan[h] + large[h]):
            if name not in ("dispatched", "kernel_today", "empty"):
                jobs.append(("call", "explore_decode", "compile_variant", h, name))
        shapes = {local_launch(h, t, row_tile(h, 128)) for t in (*args.tokens, *args.large_tokens)}
        jobs += [("local", h, s.num_warps, s.slice_groups, True, False) for s in shapes]
    if args.workers > 0:
        report["precompile"] = warm(jobs, workers=args.workers, timeout_s=args.precompile_timeout_s)
    report["settings"]["precompile_s"] = round(time.time() - t0, 1)
    for h in args.hidden:  # registers and spills of each candidate (loads what the pool compiled)
        for name in dict.fromkeys(plan[h] + large[h]):
            if name.startswith("s"):
                xs, res, w = make_inputs(1, 2, h, 1, "cuda")
                fn = runner(name)
                rec = {"hidden": h, "variant": name}
                try:
                    rec["compiled"] = kernel_resources(rk._sliced_kernel, lambda: fn(xs[0], res, w))
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                report["kernels"].append(rec)
    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    save()

    stopped = False
    points = [(h, t, plan[h] + ("plain_again",), args.replays) for h in args.hidden for t in args.tokens]
    points += [(h, t, large[h], args.large_replays) for h in args.hidden for t in args.large_tokens]
    for h, t, names, replays in points:
        if args.deadline_s is not None and time.time() - t0 > args.deadline_s:
            stopped = True
            break
        sets = [make_inputs(1, t, h, h * 1009 + t + 7 * k, "cuda") for k in range(ROTATIONS)]
        fresh = make_inputs(1, t, h, h * 1009 + t + 999, "cuda")
        recs = [measure(name, sets, fresh, replays, args.warmup_s, t, h) for name in names]
        for r in recs:
            r["floor_us"] = op_bytes(t, h) / bw * 1e6
        report["results"] += recs
        ok = [r for r in recs if r.get("ok") and "median_us" in r]
        best = min((r for r in ok if r["variant"].startswith("s")), key=lambda r: r["median_us"], default=None)
        got = {r["variant"]: r["median_us"] for r in ok}
        print(
            f"H={h} T={t}: dispatched {got.get('dispatched', float('nan')):.2f} plain {got.get('plain', float('nan')):.2f}"
            f"/{got.get('plain_again', float('nan')):.2f} empty {got.get('empty', float('nan')):.2f} best "
            + (f"{best['variant']} {best['median_us']:.2f}" if best else "-")
            + f" | {len(recs) - len(ok)} not ok",
            flush=True,
        )
        del sets, fresh
        save()
    report["stopped_early"] = stopped
    save()
    print(summary(report))
    bad = [r for r in report["results"] if not r.get("ok")]
    print(f"\n{len(report['results'])} records, {len(bad)} failed; {report['settings']['wall_s']} s")
    for r in bad[:12]:
        print("  FAILED", {k: r.get(k) for k in ("hidden", "tokens", "variant", "error", "q_err_in_fp8_steps")})
    return 0 if not bad else 1


def summary(report: dict) -> str:
    """Per hidden x tokens: dispatched, plain, empty, and the fastest candidate of each family."""
    by: dict = {}
    for r in report["results"]:
        if r.get("ok") and "median_us" in r:
            by.setdefault((r["hidden"], r["tokens"]), {})[r["variant"]] = r["median_us"]
    families = {
        "tile": lambda n, h: n.startswith(f"s{row_groups(h)}_") and "fast" not in n,
        "tile_fast": lambda n, h: n.startswith(f"s{row_groups(h)}_") and "fast" in n,
        "sliced": lambda n, h: n.startswith("s") and not n.startswith(f"s{row_groups(h)}_") and "fast" not in n,
        "sliced_fast": lambda n, h: n.startswith("s") and not n.startswith(f"s{row_groups(h)}_") and "fast" in n,
    }
    lines = ["| hidden | tokens | dispatched | plain | empty | floor | " + " | ".join(families) + " |"]
    lines.append("|---" * (6 + len(families)) + "|")
    floors = {(r["hidden"], r["tokens"]): r.get("floor_us") for r in report["results"]}
    for (h, t), v in sorted(by.items()):
        cells = [f"{v[k]:.2f}" if k in v else "-" for k in ("dispatched", "plain", "empty")]
        cells.append(f"{floors.get((h, t)) or 0:.2f}")
        for test in families.values():
            have = {n: us for n, us in v.items() if test(n, h)}
            if have:
                n = min(have, key=have.get)
                cells.append(f"{have[n]:.2f} {n}")
            else:
                cells.append("-")
        lines.append(f"| {h} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
