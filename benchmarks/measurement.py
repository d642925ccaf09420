"""The measurement method the benchmark scripts share: the grids they measure, their inputs,
graph-replayed timing, the correctness check against ops/reference.py, the byte floor, and
the machine's facts.

Every script under benchmarks/ imports what it shares from here and from nothing else in
benchmarks/ but the tools it runs (compiled_baseline.py, precompile.py), so no two scripts
import each other. Importing this module also keeps NVLink multicast off and points every
process at one Triton cache (see below): the scripts import it before they compile anything
or start a process group.

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v  # NVLink multicast stays off, whatever the caller's environment says
# One Triton cache for every process and every kernel: Inductor points TRITON_CACHE_DIR at its
# own directory when it first compiles (if unset), after which this project's kernels would
# miss what benchmarks/precompile.py compiled into Triton's default directory.
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# The token counts every TP=1 and TP=2 grid measures, and TP=1's hidden sizes (Qwen3.5's
# first, so a run cut short keeps the most useful part).
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TP1_HIDDEN = (5120, 2048, 4096, 3072, 2560, 6144, 7168, 8192)
ROTATIONS = 4  # distinct input sets per graph (large shapes do not stay in L2)
WARMUP = 5
WARMUP_S = 0.05
REPEAT = 8  # captures of the rotation list per graph (see time_graph)
INDUCTOR_Q_STEPS = 1.25  # measured up to ~1.03 for that arithmetic on CPU
EPS = 1e-6
FP8 = torch.float8_e4m3fn
# Launch shapes of the local kernel that sweep_local_launch.py times (and precompile.py
# compiles ahead): warps per program x 128-groups per program. Up to SPLIT_MAX_TOKENS tokens
# every power-of-two slice of the row (a row over several programs); above, one program per
# row only (the rows alone fill the SMs, and a split row is read once more per program).
SWEEP_WARPS = (4, 8, 16)
SPLIT_MAX_TOKENS = 256


def local_candidates(hidden: int, tokens: int | None = None, warps=SWEEP_WARPS) -> list[tuple[int, int]]:
    """The sweep's (num_warps, slice_groups) candidates at ``hidden`` (in 128-groups) and
    ``tokens`` (None: every candidate of any token count)."""
    row_g = 1 << max(0, (hidden // 128 - 1).bit_length())
    if tokens is not None and tokens > SPLIT_MAX_TOKENS:
        slices = [row_g]
    else:
        slices = [1 << k for k in range(row_g.bit_length())]
    return [(w, g) for w in warps for g in slices]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def time_graph(fns, replays: int, repeat: int = REPEAT, warmup_s: float = WARMUP_S) -> list[float]:
    """Per-op microseconds of each replay of a graph of fns (one per rotation, the list
    captured ``repeat`` times), after about ``warmup_s`` of warm-up replays; the ranks of an
    initialized process group start each phase together. The repeats keep a replay of microsecond ops longer than the host takes to
    launch the next one, so the timed span is never the GPU waiting for the host."""
    for f in fns:  # eager warm-up: compiles, creates handles
        f()
    torch.cuda.synchronize()
    _barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for f in fns:
                f()
    torch.cuda.synchronize()
    _barrier()
    # Warm up for about warmup_s of back-to-back replays, not a fixed few: after an idle gap
    # (compiles, checks on the host) the GPU's clocks are low, and a few microsecond-long
    # replays would time the clock ramp instead of the op (seen on the first variant timed
    # after each pause). Every rank replays the same count (the graphs hold collectives).
    t_warm = time.perf_counter()
    for _ in range(WARMUP):
        graph.replay()
    torch.cuda.synchronize()
    per_replay = (time.perf_counter() - t_warm) / WARMUP
    more = torch.tensor([int(warmup_s / max(per_replay, 1e-6))], device="cuda")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
    for i in range(int(more.item())):
        graph.replay()
        if i % 64 == 63:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    _barrier()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    us = [s.elapsed_time(e) * 1000.0 / (len(fns) * repeat) for s, e in zip(starts, ends)]
    del graph
    return us


def replay_stats(us: list[float]) -> dict:
    """The fields every timing record carries from time_graph's per-replay microseconds:
    median, min, and the 10th and 90th percentiles."""
    deciles = statistics.quantiles(us, n=10)
    return {"median_us": statistics.median(us), "min_us": min(us), "p10_us": deciles[0], "p90_us": deciles[-1]}


def make_inputs(world, t, h, seed, device):
    """Every rank's x (so each rank can form the exact sum), residual, weight."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    xs = [torch.randn(t, h, device=device, generator=g).to(torch.bfloat16) for _ in range(world)]
    res = (torch.randn(t, h, device=device, generator=g) * 2).to(torch.bfloat16)
    w = (torch.randn(h, device=device, generator=g) * 0.3).to(torch.bfloat16)
    return xs, res, w


def check_outputs(out, xs, res, w, *, bf16_sum: bool, ar_only=False, q_steps: float = 1.0) -> dict:
    """Max errors against ops.reference on the exact (or, for NCCL sums, bf16-rounded) sum.
    q_steps: how many fp8 steps the dequantized q may be off (1 for this project's kernels;
    Inductor's baseline quantizes the unrounded float32 normed value with a scale from it,
    which adds that scale's bf16-rounding difference: INDUCTOR_Q_STEPS)."""
    from vllm_rocm_fused.ops.reference import norm_quant_reference

    h = xs[0].float()
    for x in xs[1:]:
        h = h + x.float()
    if bf16_sum:
        h = h.to(torch.bfloat16)
    if ar_only:
        err = ((out.float() - h.float()).abs() / h.float().abs().clamp(min=1e-3)).max().item()
        return {"ok": bool(err <= 2**-7 + 1e-6), "rel_err_sum": err}
    q, scale, residual, normed = out
    ref = norm_quant_reference(h, res, w, EPS, out_dtype=torch.bfloat16, weight_offset=1.0, emit_bf16=True)
    t, hid = q.shape
    deq = (q.float().view(t, -1, 128) * scale.unsqueeze(-1)).view(t, hid)
    rdeq = (ref.q.float().view(t, -1, 128) * ref.scale.unsqueeze(-1)).view(t, hid)
    ulp = 2**-7
    r_err = ((residual.float() - ref.residual.float()).abs() / ref.residual.float().abs().clamp(min=1e-2)).max().item()
    s_err = ((scale - ref.scale).abs() / ref.scale).max().item()
    # dequantized q: within one fp8 step (1/8 relative) of the reference's, at the group's scale
    q_err = ((deq - rdeq).abs() / (rdeq.abs() / 8 + scale.repeat_interleave(128, 1) * 2**-9)).max().item()
    ok = r_err <= 2 * ulp and s_err <= 0.01 and q_err <= q_steps + 1e-6
    info = {"rel_err_residual": r_err, "rel_err_scale": s_err, "q_err_in_fp8_steps": q_err}
    if normed is not None:
        n_err = ((normed.float() - ref.normed.float()).abs() / ref.normed.float().abs().clamp(min=1e-2)).max().item()
        info["rel_err_normed"] = n_err
        ok = ok and n_err <= 2 * ulp
    all_written = all(x is None or not x.float().isnan().any() for x in out)
    info["ok"] = bool(ok and all_written)
    return info


def machine_info(world) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "world_size": world,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "python": platform.python_version(),
        "env": {
            k: os.environ.get(k)
            for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
        },
    }
    try:
        import subprocess

        info["driver"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.split("\n")[0]
            .strip()
        )
    except Exception:  # noqa: BLE001
        info["driver"] = None
    return info


def poisoned_outputs(tokens: int, hidden: int, *, emit: bool = False):
    """The op's outputs filled with NaN (0xFF bytes in fp8), so a check sees any element a
    kernel did not write."""
    from vllm_rocm_fused.kernels.launch import empty_outputs

    outs = empty_outputs(
        tokens,
        hidden,
        torch.bfloat16,
        torch.device("cuda"),
        group_size=128,
        quantize=True,
        emit_bf16=emit,
        scale_layout="row",
        quant_dtype=FP8,
    )
    for t in outs:
        if t is not None:
            (t.view(torch.uint8).fill_(0xFF) if t.dtype == FP8 else t.fill_(float("nan")))
    return outs


def op_bytes(tokens: int, hidden: int) -> int:
    """Fewest bytes the TP=1 op moves: reads x, residual (bf16) and the weight; writes the
    residual (bf16), q (1 byte) and one float32 scale per 128-group."""
    return tokens * hidden * (2 + 2 + 2 + 1) + tokens * (hidden // 128) * 4 + hidden * 2


def copy_bandwidth(nbytes: int = 1 << 30, replays: int = 20) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), graph-replayed: the faster of
    a memcpy node (``copy_``, which a graph may give to a copy engine) and an elementwise
    kernel that reads and writes the same bytes (the SMs' copy)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    memcpy_us = statistics.median(time_graph([lambda: dst.copy_(src)], replays, repeat=1))
    kernel_us = statistics.median(time_graph([lambda: torch.mul(src, 1.0, out=dst)], replays, repeat=1))
    print(f"copy of {nbytes >> 20} MiB: memcpy {memcpy_us:.0f} us, elementwise kernel {kernel_us:.0f} us", flush=True)
    return 2 * nbytes / (min(memcpy_us, kernel_us) * 1e-6)


def compiled_kernels(jit_fn) -> dict:
    """This process's compiled specializations of a Triton kernel: {(device, cache key): kernel}
    (best effort: Triton's cache layout differs between versions)."""
    out = {}
    for device, cache in getattr(jit_fn, "device_caches", {}).items():
        for key, kernel in cache[0].items():
            out[(str(device), key)] = kernel
    return out


def kernel_resources(jit_fn, run_once) -> list[dict]:
    """Call ``run_once`` (which compiles or loads specializations of ``jit_fn``) and return the
    warps, registers per thread and spilled bytes of each specialization it added."""
    try:
        before = set(compiled_kernels(jit_fn))
    except Exception:  # noqa: BLE001 - introspection only
        before = None
    run_once()
    torch.cuda.synchronize()
    if before is None:
        return []
    described = []
    try:
        for key, kernel in compiled_kernels(jit_fn).items():
            if key not in before:
                kernel._init_handles()
                described.append(
                    {"num_warps": kernel.metadata.num_warps, "regs": kernel.n_regs, "spills": kernel.n_spills}
                )
    except Exception as e:  # noqa: BLE001
        described.append({"error": f"{type(e).__name__}: {e}"})
    return described
