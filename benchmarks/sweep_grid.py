"""Sweep: programs per SM and warps per program of the fused one-shot kernels.

The fused kernels give each program one token row at a time and launch at most the
workspace's ``max_grid`` programs (one per SM by default), so at large token counts each
SM works through its rows one after another with few warps in flight. This sweep times
the pull and LL fused-1 kernels (and split-2, the pull kernel without the quant followed
by the group-quant kernel, as the comparison) for grid caps of 1, 2, 4 programs per SM and
4, 8, 16 warps per program, graph-replayed as in bench_fused_ar_rms_quant.py, checks each
configuration's outputs against the reference, and reports the compiled kernels' registers
per thread (which bound how many programs can be resident per SM).

    PYTHONPATH=. python benchmarks/sweep_grid.py [--out FILE]

Writes a JSON file (default benchmarks/results/<gpu>_tp<W>_grid_sweep.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from measurement import check_outputs, free_port, make_inputs, time_graph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = ((4096, 16), (4096, 64), (4096, 256), (4096, 1024), (4096, 8192), (5120, 256), (5120, 2048), (2048, 1024))
BLOCKS_PER_SM = (1, 2, 4)
WARPS = (4, 8, 16)
LL_MAX_TOKENS = 2048


def registers(fn) -> dict:
    """Registers per thread of every compiled specialization of a Triton kernel (best effort)."""
    out = {}
    try:
        for cache in fn.device_caches.values():
            for key, kernel in cache[0].items():
                kernel._init_handles()
                out[f"warps={kernel.metadata.num_warps}:{hash(key) & 0xFFFF:04x}"] = {
                    "regs": kernel.n_regs,
                    "spills": kernel.n_spills,
                }
    except Exception as e:  # noqa: BLE001 - introspection only
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def rank_main(rank, world, port, out_path, replays):
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, device_id=dev)
    from vllm_rocm_fused.backends.cuda.workspace import SymmWorkspace
    from vllm_rocm_fused.kernels import oneshot_ar_norm_quant as pull
    from vllm_rocm_fused.kernels import oneshot_ll_ar_norm_quant as ll
    from vllm_rocm_fused.kernels.group_quant import group_quant

    group = dist.group.WORLD
    max_elems = max(h * t for h, t in SHAPES)
    records = []
    t0 = time.time()
    for bps in BLOCKS_PER_SM:
        ws = SymmWorkspace.create(
            group,
            dev,
            stage_bytes=2 * max_elems,
            with_twoshot=False,
            ll_bytes=2 * LL_MAX_TOKENS * 5120,
            blocks_per_sm=bps,
        )
        peers = ws.peers(torch.bfloat16)
        for nw in WARPS:
            for h, t in SHAPES:
                sets = [make_inputs(world, t, h, 7 * k + h + t, dev) for k in range(4)]
                w = sets[0][2]

                def fused(k, kern=pull.oneshot_ar_norm_quant):
                    return kern(sets[k][0][rank], sets[k][1], w, 1e-6, peers, weight_offset=1.0, num_warps=nw)

                def split2(k):
                    _, _, r, n = pull.oneshot_ar_norm_quant(
                        sets[k][0][rank], sets[k][1], w, 1e-6, peers, weight_offset=1.0, quantize=False, num_warps=nw
                    )
                    q, s = group_quant(n)
                    return q, s, r, None

                variants = {"fused1": fused, "split2": split2}
                if t <= LL_MAX_TOKENS:
                    variants["fused1_ll"] = lambda k: fused(k, ll.oneshot_ll_ar_norm_quant)
                for name, fn in variants.items():
                    rec = {
                        "blocks_per_sm": bps,
                        "num_warps": nw,
                        "hidden": h,
                        "tokens": t,
                        "variant": name,
                        "grid": min(t, peers.max_grid),
                    }
                    try:
                        us = time_graph([lambda k=k: fn(k) for k in range(4)], replays)
                        rec["median_us"] = statistics.median(us)
                        rec.update(check_outputs(fn(0), sets[0][0], sets[0][1], w, bf16_sum=False))
                    except Exception as e:  # noqa: BLE001 - recorded
                        rec["error"] = f"{type(e).__name__}: {e}"
                    records.append(rec)
                torch.cuda.synchronize()
                gathered = [None] * world
                dist.all_gather_object(gathered, [r.get("median_us") for r in records[-len(variants) :]])
                if rank == 0:
                    for i, r in enumerate(records[-len(variants) :]):
                        times = [g[i] for g in gathered]
                        r["median_us"] = None if None in times else max(times)
                        print(
                            f"bps={bps} warps={nw} H={h} T={t} {r['variant']}: {r['median_us']} "
                            f"ok={r.get('ok')} {r.get('error', '')}",
                            flush=True,
                        )
        torch.cuda.synchronize()
        if ws.barrier_errors():
            records.append({"blocks_per_sm": bps, "barrier_errors": ws.barrier_errors()})
        dist.barrier()
    if rank == 0:
        regs = {"pull": registers(pull._oneshot_kernel), "ll": registers(ll._oneshot_ll_kernel)}
        Path(out_path).write_text(
            json.dumps(
                {
                    "machine": torch.cuda.get_device_name(0),
                    "world_size": world,
                    "replays": replays,
                    "sms": torch.cuda.get_device_properties(0).multi_processor_count,
                    "torch": torch.__version__,
                    "wall_s": round(time.time() - t0, 1),
                    "registers": regs,
                    "results": records,
                },
                indent=1,
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--replays", type=int, default=100)
    args = p.parse_args(argv)
    world = torch.cuda.device_count()
    if world < 2:
        print("needs at least 2 GPUs", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0).split()[-1].lower()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{gpu}_tp{world}_grid_sweep.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    mp.start_processes(rank_main, args=(world, free_port(), str(out), args.replays), nprocs=world, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
