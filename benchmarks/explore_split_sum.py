"""Exploration for issue 24, second part: the split row's sum of squares and the quant's
instruction count (one GPU, 1-64 tokens).

The local kernel, at 1-64 tokens, spreads a row over SPLIT programs and every program reads
the whole row a second time for its sum of squares (kernels/add_rmsnorm_quant.py).
Candidates (reference_kernels.split_sum; names ``{kind}{G}_w{W}``: G 128-groups per program,
W warps; G = the padded row: one program per row, kinds r and rl only):
  r    the whole row read again, as one masked tile; the quant as before this exploration
       (reference_kernels._quant_sign_fix: a sign fix per element and a clamp)
  rl   r with the lean quant (row_math.quant_tile now: negations as x * -1.0, no clamp);
       its q and scale bytes must equal r's
  rlc  rl with the re-read bypassing L1 (``.cg``); bytes must equal r's
  tl   the other slices as one masked row tile (own lanes masked off) + the own slice's sum:
       two reductions
  el   slice-wise: the other slices read one slice-shaped tile at a time, squares
       accumulated element by element in slice order (own from registers), one reduction
  o    the other slices only, summed slice by slice (a reduction per slice)
  x    the slices' sums exchanged through a global workspace (a counter per row, atomics;
       bounded wait, then o's reads; the same bits either way: bytes must equal o's)
  bt   the other slices loaded with no branch, every slice's squares summed element-wise
       as a butterfly, one reduction (the local kernel's add_rmsnorm_quant.row_squares,
       called by reference_kernels.split_sum; the local kernel's form since round 4)
  btr  bt with the residual stored right after the slice's loads (before the sum); bytes
       must equal bt's
  btb  bt with the row's groups spread evenly over its programs (20 groups on 2 programs:
       10 + 10 in 16-group tiles, not 16 + 4; only where that differs from bt)
  btbr btb with btr's early residual; bytes must equal btb's
  bp   btb with the programs per row given (the name's number: 2, 3 or 4), each in the
       smallest power-of-two tile that holds its slice (3 programs at hidden 4096: 11, 11
       and 10 groups in 16-group tiles)
  nx   not a candidate but a bound: bt's kernel with each program's own slice's sum of
       squares times SPLIT taken for the row's (no other slice read, no exchange): the time
       that sharing the slices' sums could at best reach; its outputs are wrong, so they are
       not checked (its records: "bound": true)
  k    the local kernel of the round's tree at that launch shape (add_rmsnorm_quant; in
       rounds 7-11 trial kernels not kept: round 7 with even slices, round 8 with even
       slices and its loads without ``other``, rounds 9-11 loads without ``other`` and the
       residual stored first; benchmarks/NOTES.md, issue 24, fourth and fifth passes)
  NAME (``--trial NAME=FILE``, lower-case letters) k with a trial copy of
       kernels/add_rmsnorm_quant.py (FILE, imported as its own module: its add_rmsnorm_quant
       launches its own kernel), at k's launch shapes; its q, scale and residual bytes must
       equal k's (a trial reorders the kernel's work, not its arithmetic); the report keeps
       each trial's diff against the tree's kernel file
``--before empty|mm`` launches a kernel ahead of every timed call (the empty kernel, or
``h @ W``, a [T, H] x [H, 512] bf16 GEMM through torch): every record then times both, and
"before" times it alone; a kernel launched with programmatic dependent launch (PDL) can
overlap its start with such a predecessor, which back-to-back calls of itself would
overstate.
plus the dispatched op, today's kernel at its table shape (kernel_today) and the empty
kernel, graph-replayed as the benchmark times them (4 rotating input sets, 8 captures of them
per graph, 100 replays). Every variant of every point is checked against ops/reference.py on
fresh inputs (outputs poisoned first); x's waits that gave up are counted.

    PYTHONPATH=. python benchmarks/explore_split_sum.py --out RESULTS.json [--kinds K ...] [--deadline-s S]

Committed runs (2026-12-03, one H200; the kinds each ran):
  benchmarks/results/h200_tp1_split_sum_explore.json   round 1: r o x (split rows only)
  benchmarks/results/h200_tp1_split_sum_explore2.json  round 2: r rl rlc tl
  benchmarks/results/h200_tp1_split_sum_explore3.json  round 3: rl el; here the dispatched op
      already had the lean quant, with the previous launch table
  benchmarks/results/h200_tp1_split_sum_explore4.json  round 4: rl bt (the default), tokens 1,
      32, 64; here the dispatched op and kernel_today already used bt at every split (before
      the local kernel kept it to 2-4 programs per row), with the previous launch table
  benchmarks/results/h200_tp1_split_sum_explore5.json  round 5: bt btr btb btbr, hidden
      2560-8192 but 5120
  benchmarks/results/h200_tp1_split_sum_explore6.json  round 6: bt btb bp, tokens 16, 32, 64
      (rounds 5 and 6: the dispatched op and kernel_today as of round 4)
  benchmarks/results/h200_tp1_split_sum_explore7.json  round 7: bt btb k, tokens 32, 64,
      200 replays (k, the dispatched op and kernel_today: the even-slice trial kernel)
  benchmarks/results/h200_tp1_split_sum_explore8.json  round 8: as round 7 without hidden
      8192, with the trial kernel's loads also without ``other``
  benchmarks/results/h200_tp1_split_sum_explore9.json  round 9: bt btb k, tokens 32, 64,
      200 replays (k, the dispatched op and kernel_today: the trial kernel of rounds 9-11,
      its loads without ``other`` and its residual stored before the rsqrt; not kept)
  benchmarks/results/h200_tp1_split_sum_explore10.json  round 10: k and the trials old (the
      kernel kept) and wb (a barrier after the own slice's loads), hidden 2048-8192, tokens
      1, 8, 32, 64
  benchmarks/results/h200_tp1_split_sum_explore11.json  round 11: bt nx k, hidden
      2048-8192, tokens 8, 32, 64 (rounds 9-11: each report's "note" and "candidate_diff")
  benchmarks/results/h200_tp1_split_sum_explore12.json  round 12: k and the trial pdl (the
      kernel launched with programmatic dependent launch), --before mm, tokens 1-64
  benchmarks/results/h200_tp1_split_sum_explore13.json  round 13: as round 12, back to back

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
import time
from pathlib import Path

import explore_decode
import reference_kernels as rk
import torch
import triton
from measurement import (
    EPS,
    ROTATIONS,
    check_outputs,
    machine_info,
    make_inputs,
    poisoned_outputs,
    replay_stats,
    time_graph,
)
from precompile import default_workers, warm
from sass_schedule import module_from

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN = (2560, 3072, 4096, 5120, 6144, 7168, 8192)
TOKENS = (1, 16, 32, 64)
# name prefix -> (sum-of-squares mode, lean quant, re-read bypassing L1, balanced slices,
# residual stored before the row's sum)
KINDS = {
    "r": (rk.SS_REREAD, False, False, False, False),
    "rl": (rk.SS_REREAD, True, False, False, False),
    "rlc": (rk.SS_REREAD, True, True, False, False),
    "tl": (rk.SS_OTHERS_TILE, True, False, False, False),
    "o": (rk.SS_OTHERS, False, False, False, False),
    "x": (rk.SS_EXCHANGE, False, False, False, False),
    "el": (rk.SS_SLICEWISE, True, False, False, False),
    "bt": (rk.SS_BUTTERFLY, True, False, False, False),
    "btr": (rk.SS_BUTTERFLY, True, False, False, True),
    "btb": (rk.SS_BUTTERFLY, True, False, True, False),
    "btbr": (rk.SS_BUTTERFLY, True, False, True, True),
    "bp": (rk.SS_BUTTERFLY, True, False, True, False),  # the name's number: programs per row
    "nx": (rk.SS_OWN_ONLY_BOUND, True, False, False, False),  # a bound, outputs not checked
    "k": None,  # the local kernel itself (add_rmsnorm_quant) at this launch shape
}
BP_PROGRAMS = (2, 3, 4)  # programs per row of the bp kind
# kind -> the kind whose q and scale bytes it must equal (btb and btbr: the butterfly sums the
# slices in another grouping, so their sums of squares may differ from bt's in the last bits)
TWINS = {"x": "o", "rl": "r", "rlc": "r", "btr": "bt", "btbr": "btb"}
ROUND4 = ("rl", "bt")  # the default plan (o and x: the first round; rlc and tl: the second; el: the third)
SPIN = 4096
TRIALS: dict = {}  # trial kind -> its copy of kernels/add_rmsnorm_quant.py, imported (--trial)
# timed at every point besides the candidates ("before": only with --before)
FIXED_NAMES = ("dispatched", "kernel_today", "empty", "before")
MM_N = 512  # --before mm: output columns of the GEMM (a few microseconds at hidden 8192)
BEFORE: dict = {}  # --before: {"kind": "empty" | "mm", "weights": {hidden: the mm's [H, MM_N] bf16 matrix}}


def variants(hidden: int, kinds=ROUND4) -> list[str]:
    """Split rows (two programs or more per row) of every kind in ``kinds``, and one program
    per row (kinds r and rl only: the others equal them there); balanced kinds only where
    their slices differ from the unbalanced ones."""
    groups, row_g = hidden // 128, triton.next_power_of_2(hidden // 128)
    names = [f"bp{p}_w{w}" for p in BP_PROGRAMS for w in (4, 8, 16)] if "bp" in kinds else []
    for g in (2, 4, 8, 16, 32, 64):
        if g > row_g or (g < row_g and triton.cdiv(groups, g) < 2) or (g == 2 and hidden < 8192):
            continue
        even = groups % triton.cdiv(groups, g) == 0 and groups // triton.cdiv(groups, g) == g
        for w in (4, 8) if g <= 8 else (8, 16):
            names += [
                f"{k}{g}_w{w}"
                for k in kinds
                if k != "bp"
                and (g < row_g or k in ("r", "rl", "k") or k in TRIALS)
                and not (k.startswith("btb") and even)  # balanced = unbalanced
            ]
    return names


def split_name(name: str) -> tuple[str, int, int]:
    """'rl8_w4' -> ("rl", 8, 4): kind, groups per program (kind bp: programs per row), warps."""
    head, warps = name.split("_w")
    kind = head.rstrip("0123456789")
    return kind, int(head[len(kind) :]), int(warps)


def parse(name: str) -> dict:
    """'rl8_w4' -> {"mode": SS_REREAD, "lean": True, "reread_cg": False, "slice_groups": 8, "num_warps": 4}."""
    kind, slice_groups, warps = split_name(name)
    mode, lean, cg, balanced, early = KINDS[kind]
    if kind == "bp":
        return {"mode": mode, "lean": lean, "programs": slice_groups, "slice_groups": 0, "num_warps": warps}
    return {
        "mode": mode,
        "lean": lean,
        "reread_cg": cg,
        "balanced": balanced,
        "early_res": early,
        "slice_groups": slice_groups,
        "num_warps": warps,
    }


def predecessor(h: torch.Tensor) -> None:
    """--before's kernel, launched ahead of each timed call: the empty kernel (one program),
    or ``h @ W`` (a [T, H] x [H, MM_N] bf16 GEMM through torch: a kernel that reads the op's
    input, as the projection before a norm site does in a model)."""
    if BEFORE["kind"] == "empty":
        rk.empty(h)
        return
    torch.mm(h, BEFORE["weights"][h.shape[1]])


def _after_predecessor(fn, h, res, w, outputs=None):
    predecessor(h)
    return fn(h, res, w, outputs)


def runner(name: str, timed: bool = False):
    """(h, res, w, outputs) -> (q, scale, residual, normed) of variant ``name`` (the
    dispatched op, today's kernel and the empty kernel: explore_decode.runner's). ``timed``
    with --before: the callable launches the predecessor first ("before": it alone)."""
    if name == "before":
        return lambda h, res, w, outputs=None: predecessor(h)
    if timed and BEFORE:
        return functools.partial(_after_predecessor, runner(name))
    if name in explore_decode.FIXED:
        return explore_decode.runner(name)
    kind, slice_groups, warps = split_name(name)
    if kind == "k" or kind in TRIALS:
        return functools.partial(_local, num_warps=warps, slice_groups=slice_groups, module=TRIALS.get(kind))
    return functools.partial(_split, **parse(name))


def _local(h, res, w, outputs=None, module=None, **kw):
    """The local kernel's op (``module``: a trial copy's) at the launch shape in ``kw``."""
    if module is None:
        from vllm_rocm_fused.kernels import add_rmsnorm_quant as module

    return module.add_rmsnorm_quant(h, res, w, EPS, weight_offset=1.0, outputs=outputs, **kw)


def add_trial(spec: str) -> tuple[str, str]:
    """``NAME=FILE`` -> the trial kind NAME registered (its kernel file imported); returns
    (NAME, the file's diff against kernels/add_rmsnorm_quant.py)."""
    name, _, file = spec.partition("=")
    if not re.fullmatch(r"[a-z]+", name) or name in KINDS or not file:
        raise ValueError(f"--trial {spec!r}: want NAME=FILE, NAME lower-case letters and not one of {sorted(KINDS)}")
    TRIALS[name] = module_from(Path(file), name)
    tree = ROOT / "vllm_rocm_fused" / "kernels" / "add_rmsnorm_quant.py"
    diff = difflib.unified_diff(
        tree.read_text().splitlines(True), Path(file).read_text().splitlines(True), str(tree.relative_to(ROOT)), file
    )
    return name, "".join(diff)


def _split(h, res, w, outputs=None, **kw):
    return rk.split_sum(h, res, w, EPS, outputs=outputs, spin=SPIN, **kw)


def compile_variant(hidden: int, name: str, trial: str = "") -> None:
    """precompile.py's ("call", "explore_split_sum", "compile_variant", hidden, name[, trial])
    job (``trial``: the --trial NAME=FILE that defines the variant's kind)."""
    if trial and trial.partition("=")[0] not in TRIALS:
        add_trial(trial)
    torch.cuda.set_device(0)
    xs, res, w = make_inputs(1, 2, hidden, 1, "cuda")
    runner(name)(xs[0], res, w)
    torch.cuda.synchronize()


def measure(name, sets, fresh, replays, warmup_s, t, hidden) -> dict:
    rec: dict = {"hidden": hidden, "tokens": t, "variant": name}
    fn = runner(name)
    try:
        gave_up = rk.split_sum_gave_up("cuda")
        timed = runner(name, timed=True)
        us = time_graph([functools.partial(timed, xs[0], res, w) for xs, res, w in sets], replays, warmup_s=warmup_s)
        rec.update(replay_stats(us))
        if name in ("empty", "before"):
            rec["ok"] = True
            return rec
        kind, slice_groups, warps = split_name(name) if name not in FIXED_NAMES else (name, 0, 0)
        if kind == "nx":
            rec.update(ok=True, bound=True)
            return rec
        fx, fres, fw = fresh
        outs = None if name == "dispatched" else poisoned_outputs(t, hidden)
        out = fn(fx[0], fres, fw, outs)
        rec.update(check_outputs(out, fx, fres, fw, bf16_sum=False))
        if kind in TWINS or kind in TRIALS:  # same bytes as its twin of the same shape
            twin_name = f"{TWINS.get(kind, 'k')}{slice_groups}_w{warps}"
            twin = runner(twin_name)(fx[0], fres, fw, poisoned_outputs(t, hidden))
            rec["same_as"] = twin_name
            rec["same_bytes"] = bool(
                torch.equal(twin[0].view(torch.uint8), out[0].view(torch.uint8))
                and torch.equal(twin[1], out[1])
                and (kind not in TRIALS or torch.equal(twin[2], out[2]))
            )
            rec["ok"] = rec["ok"] and rec["same_bytes"]
        if kind == "x":
            rec["gave_up"] = rk.split_sum_gave_up("cuda") - gave_up
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["ok"] = False
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--kinds", nargs="+", default=list(ROUND4), choices=list(KINDS))
    p.add_argument(
        "--trial",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="also time kind NAME: k with FILE, a trial copy of kernels/add_rmsnorm_quant.py",
    )
    p.add_argument(
        "--before",
        choices=("empty", "mm"),
        default=None,
        help="launch this kernel ahead of every timed call (each record: both; 'before': it alone)",
    )
    p.add_argument("--replays", type=int, default=100)
    p.add_argument("--warmup-s", type=float, default=0.02)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--precompile-timeout-s", type=float, default=150)
    p.add_argument("--deadline-s", type=float, default=None, help="start no new point after this many seconds")
    args = p.parse_args(argv)
    t0 = time.time()
    torch.cuda.set_device(0)
    from vllm_rocm_fused.kernels.launch import local_launch, row_tile

    diffs = dict(add_trial(spec) for spec in args.trial)
    trial_of = {spec.partition("=")[0]: spec for spec in args.trial}
    if args.before:  # the mm's matrices made before any graph capture
        BEFORE.update(kind=args.before, weights={})
        for h in args.hidden:
            BEFORE["weights"][h] = (torch.randn(h, MM_N, device="cuda") * 0.02).to(torch.bfloat16)
    fixed = FIXED_NAMES if args.before else FIXED_NAMES[:-1]
    plan = {h: (*fixed, *variants(h, [*args.kinds, *TRIALS])) for h in args.hidden}
    report: dict = {
        "command": "PYTHONPATH=. python benchmarks/explore_split_sum.py "
        + " ".join(
            f"benchmarks/results/{Path(a).name}" if a == args.out else a
            for a in (sys.argv[1:] if argv is None else argv)
        ),
        "machine": machine_info(1),
        "settings": {
            "rotations": ROTATIONS,
            "replays": args.replays,
            "warmup_s": args.warmup_s,
            "spin": SPIN,
            "plan": {str(h): list(v) for h, v in plan.items()},
            "trials": diffs,
            "before": args.before,
        },
        "results": [],
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
        jobs += [
            ("call", "explore_split_sum", "compile_variant", h, n, trial_of.get(split_name(n)[0], ""))
            for n in plan[h][len(fixed) :]
        ]
        shapes = {local_launch(h, t, row_tile(h, 128)) for t in args.tokens}
        jobs += [("local", h, s.num_warps, s.slice_groups, True, False) for s in shapes]
    jobs.append(("call", "reference_kernels", "warm", args.hidden[0]))
    if args.workers > 0:
        report["precompile"] = warm(jobs, workers=args.workers, timeout_s=args.precompile_timeout_s)
    report["settings"]["precompile_s"] = round(time.time() - t0, 1)
    save()

    stopped = False
    for h in args.hidden:
        for t in args.tokens:
            if args.deadline_s is not None and time.time() - t0 > args.deadline_s:
                stopped = True
                break
            sets = [make_inputs(1, t, h, h * 1009 + t + 7 * k, "cuda") for k in range(ROTATIONS)]
            fresh = make_inputs(1, t, h, h * 1009 + t + 999, "cuda")
            recs = [measure(n, sets, fresh, args.replays, args.warmup_s, t, h) for n in plan[h]]
            report["results"] += recs
            got = {r["variant"]: r["median_us"] for r in recs if r.get("ok") and "median_us" in r}
            kind = {n: split_name(n)[0] for n in got if n not in FIXED_NAMES}
            best = {k: min((got[n], n) for n in kind if kind[n] == k) for k in sorted(set(kind.values()))}
            print(
                f"H={h} T={t}: dispatched {got.get('dispatched', float('nan')):.2f} empty {got.get('empty', float('nan')):.2f} "
                + (f"before {got.get('before', float('nan')):.2f} " if args.before else "")
                + " ".join(f"{m}: {us:.2f} {n}" for m, (us, n) in best.items())
                + f" | {sum(1 for r in recs if not r.get('ok'))} not ok",
                flush=True,
            )
            save()
    report["stopped_early"] = stopped
    save()
    bad = [r for r in report["results"] if not r.get("ok")]
    print(f"{len(report['results'])} records, {len(bad)} failed; {report['settings']['wall_s']} s")
    for r in bad[:12]:
        print(
            "  FAILED",
            {k: r.get(k) for k in ("hidden", "tokens", "variant", "error", "q_err_in_fp8_steps", "same_bytes")},
        )
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
