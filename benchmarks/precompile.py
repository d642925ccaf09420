"""Warm the on-disk compile caches in parallel before a measurement run.

A sweep over launch shapes and a benchmark against Inductor compile far more kernels than
they time: each Triton specialization or Inductor graph costs seconds, one after another in
the measuring process. Here a pool of worker processes compiles them first, side by side on
the CPU cores, into the caches every process of the machine shares (Triton's kernel cache;
Inductor's FX graph cache and its Triton cache); the measuring process then loads them.

Nothing is timed in the workers, and they do not save Inductor's runtime autotuning choices
(``autotune_local_cache`` off there, which the FX graph cache key ignores), so the measuring
process tunes those itself on a quiet GPU. A job that fails only costs the measuring process
its own compile; ``warm`` returns every job's outcome.

Jobs (tuples):
  ("local", hidden, num_warps, slice_groups, quantize, emit)  the local add + RMSNorm + quant kernel
  ("inductor", hidden, tokens, mode)                  compiled_baseline.compiled(mode) at one size
                                                     (mode "dynamic": tokens 1 then 2, as the
                                                     benchmark first calls it)
  ("call", module, function, *args)                  module.function(*args) (a script's own
                                                     kernels, e.g. explore_decode.compile_variant)

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import time

EPS = 1e-6


def _init_worker() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    try:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # many workers already; no pool inside each
        inductor_config.autotune_local_cache = False  # the measuring process tunes on a quiet GPU
    except Exception:  # noqa: BLE001 - Inductor jobs then just compile slower
        pass


def _inputs(tokens: int, hidden: int):
    import torch

    g = torch.Generator(device="cuda")
    g.manual_seed(tokens * 7919 + hidden)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    res = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(hidden, device="cuda", generator=g) * 0.3).to(torch.bfloat16)
    return x, res, w


def run_job(job: tuple) -> tuple[tuple, float, str | None]:
    """Compile (and run once, on small inputs) what ``job`` names; (job, seconds, error)."""
    import torch

    t0 = time.time()
    try:
        if job[0] == "local":
            from vllm_rocm_fused.kernels.add_rmsnorm_quant import add_rmsnorm_quant

            _, hidden, warps, slice_groups, quantize, emit = job
            x, res, w = _inputs(2, hidden)
            add_rmsnorm_quant(
                x,
                res,
                w,
                EPS,
                weight_offset=1.0,
                quantize=quantize,
                emit_bf16=emit,
                num_warps=warps,
                slice_groups=slice_groups,
            )
        elif job[0] == "inductor":
            from compiled_baseline import compiled, configure_dynamo

            _, hidden, tokens, mode = job
            configure_dynamo()
            fn = compiled(mode, tag=f"{hidden}" if mode == "dynamic" else f"{hidden}_{tokens}")
            for t in (1, 2) if mode == "dynamic" else (tokens,):
                x, res, w = _inputs(t, hidden)
                fn(x, res, w, EPS)
        elif job[0] == "call":
            import importlib

            _, module, function, *call_args = job
            getattr(importlib.import_module(module), function)(*call_args)
        else:
            raise ValueError(f"unknown job {job!r}")
        torch.cuda.synchronize()
        return job, time.time() - t0, None
    except Exception as e:  # noqa: BLE001 - reported to the caller
        return job, time.time() - t0, f"{type(e).__name__}: {str(e)[:300]}"


def warm(jobs: list[tuple], *, workers: int, timeout_s: float, log=print) -> list[dict]:
    """Run ``jobs`` on ``workers`` processes for at most ``timeout_s`` seconds; returns one
    record per job ({"job", "s", "error"}; "error": "not run (time-out)" for the rest)."""
    if not jobs:
        return []
    t0 = time.time()
    workers = max(1, min(workers, len(jobs)))
    done: dict[tuple, dict] = {}
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    try:
        futures = [pool.submit(run_job, job) for job in jobs]
        try:
            for fut in cf.as_completed(futures, timeout=max(1.0, timeout_s)):
                job, secs, err = fut.result()
                done[job] = {"job": list(job), "s": round(secs, 2), "error": err}
                if err:
                    log(f"precompile {job}: {err}")
        except cf.TimeoutError:
            log(f"precompile: time-out after {timeout_s:.0f} s, {len(done)}/{len(jobs)} jobs done")
    finally:
        procs = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # the pool's own workers, still compiling after a time-out
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
    records = [done.get(job, {"job": list(job), "s": None, "error": "not run (time-out)"}) for job in jobs]
    failed = sum(1 for r in records if r["error"])
    log(f"precompile: {len(jobs)} jobs on {workers} processes in {time.time() - t0:.1f} s ({failed} not done)")
    return records


def default_workers() -> int:
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "benchmarks"))
    from measurement import TOKENS, TP1_HIDDEN, local_candidates

    p = argparse.ArgumentParser(description="Warm the compile caches for the launch sweep and the TP=1 benchmark")
    p.add_argument("--sweep", action="store_true", help="the local kernel at every sweep candidate")
    p.add_argument("--inductor", action="store_true", help="the benchmark's Inductor graphs (static and dynamic)")
    p.add_argument(
        "--references", action="store_true", help="the benchmark's plain masked-tile, groupwise and empty kernels"
    )
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--timeout-s", type=float, default=120)
    p.add_argument("--out", default=None, help="write every job's outcome here (JSON)")
    args = p.parse_args(argv)
    jobs = []  # the slowest compiles (Inductor's) first, so the pool ends together
    if args.inductor:
        for h in TP1_HIDDEN:
            jobs.append(("inductor", h, 0, "dynamic"))
            jobs += [("inductor", h, t, "static") for t in TOKENS]
    if args.references:
        jobs += [("call", "reference_kernels", "warm", h) for h in TP1_HIDDEN]
    if args.sweep:
        jobs += [("local", h, w, g, True, False) for h in TP1_HIDDEN for w, g in local_candidates(h)]
    records = warm(jobs, workers=args.workers, timeout_s=args.timeout_s)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    import sys as _sys

    _sys.exit(main())
