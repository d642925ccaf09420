"""One-shot all-reduce + residual add + RMSNorm + per-group FP8 quant, one kernel.

Algorithm (W ranks, symmetric memory, peer pointers over NVLink P2P; no multicast):
  1. each program copies its token rows of this rank's x into this rank's staging
     buffer (the half picked by the call parity, see symm_sync.py);
  2. block barrier with the same program of every peer (release/acquire, sys scope);
  3. per row: sum the W ranks' staged rows in float32 in rank order (so every rank gets
     the same bits), add the residual, RMSNorm, quantize per group, write q, scale,
     the new residual (and normed) locally;
  4. the last program to finish advances the call counter (parity for the next call).
With ``norm=False`` step 3 writes round(sum) instead: the bare one-shot all-reduce, the
floor the benchmark compares against, built from the same skeleton.

Memory traffic per rank: reads x (local) and (W - 1) peers' rows over NVLink (the
one-shot cost: W - 1 times the input bytes), plus residual, weight; writes the staging
copy, residual, q, scale (and normed). Nothing else goes through HBM twice.

Row math: row_math.py (the row in power-of-two parts of whole groups, each part's sum kept
in registers, so every peer's row is read once).

Limits: 2 <= W <= 8; the row's groups (in parts) <= 16384 elements (launch.MAX_TILE);
T * H <= the workspace's staging capacity; the grid is at most the workspace's max_grid
(<= the SM count, so all programs are co-resident and the per-program barriers cannot
deadlock) and programs loop over rows.

Graph safety: no host sync, no allocation in the kernel; barrier flags and the call
parity live in device memory and need no reset, so captured replays and eager calls
interleave freely on one stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Outputs, SymmPeers, norm_tile, prepare_rows, tile_reason
from .row_math import finish_part, inv_rms, part_tile, sum_sq
from .symm_sync import block_barrier, call_parity, finish_call, next_epoch

# PHASE: 0 = the whole kernel (GPU). 1 = copy-in only, 2 = reduce only (no barrier):
# with ranks emulated on one device, the Triton interpreter runs phase 1 on every rank,
# then phase 2, which is what the barrier orders on real GPUs.


@triton.jit
def _copy_part(
    x_ptr,
    dst,
    base,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    N_GROUPS: tl.constexpr,
):
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GROUP, N_GROUPS)
    tl.store(dst + base + offs, tl.load(x_ptr + base + offs, mask=mask), mask=mask)


@triton.jit
def _sum_part(
    stage,
    half,
    base,
    res_ptr,
    w_ptr,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    N_GROUPS: tl.constexpr,
    W: tl.constexpr,
    HAS_RES: tl.constexpr,
    NORM: tl.constexpr,
):
    """(s = the W staged rows' float32 sum in rank order (+ residual) of one part, its weights,
    offsets, masks)."""
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GROUP, N_GROUPS)
    if NORM:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:  # the bare all-reduce has no weight (w unused)
        w = tl.zeros((NGP, GS), dtype=tl.float32)
    s = tl.zeros((NGP, GS), dtype=tl.float32)
    for p in tl.static_range(W):
        s += tl.load(stage[p] + half + base + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return s, w, offs, mask, g, gmask


@triton.jit(do_not_specialize=["n_rows", "scale_st", "scale_sg"])
def _oneshot_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    stage,
    flags,
    ctl_ptr,
    n_rows,
    stage_cap,
    eps,
    weight_offset,
    scale_st,
    scale_sg,
    W: tl.constexpr,
    RANK: tl.constexpr,
    HIDDEN: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PHASE: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // GROUP
    O1: tl.constexpr = P0
    O2: tl.constexpr = P0 + P1
    O3: tl.constexpr = P0 + P1 + P2
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    calls, parity = call_parity(ctl_ptr)
    half = parity.to(tl.int64) * stage_cap

    if PHASE != 2:
        for row in range(pid, n_rows, nprog):
            base = tl.cast(row, tl.int64) * HIDDEN
            dst = stage[RANK] + half
            _copy_part(x_ptr, dst, base, 0, P0, GS, GROUP, N_GROUPS)
            if P1 > 0:
                _copy_part(x_ptr, dst, base, O1, P1, GS, GROUP, N_GROUPS)
            if P2 > 0:
                _copy_part(x_ptr, dst, base, O2, P2, GS, GROUP, N_GROUPS)
            if P3 > 0:
                _copy_part(x_ptr, dst, base, O3, P3, GS, GROUP, N_GROUPS)
    if PHASE == 0:
        block_barrier(flags, ctl_ptr, pid, next_epoch(ctl_ptr, pid), W, RANK)
    if PHASE != 1:
        for row in range(pid, n_rows, nprog):
            base = tl.cast(row, tl.int64) * HIDDEN
            s0, w0, o0, m0, g0, gm0 = _sum_part(
                stage, half, base, res_ptr, w_ptr, 0, P0, GS, GROUP, N_GROUPS, W, HAS_RES, NORM
            )
            if P1 > 0:
                s1, w1, o1, m1, g1, gm1 = _sum_part(
                    stage, half, base, res_ptr, w_ptr, O1, P1, GS, GROUP, N_GROUPS, W, HAS_RES, NORM
                )
            if P2 > 0:
                s2, w2, o2, m2, g2, gm2 = _sum_part(
                    stage, half, base, res_ptr, w_ptr, O2, P2, GS, GROUP, N_GROUPS, W, HAS_RES, NORM
                )
            if P3 > 0:
                s3, w3, o3, m3, g3, gm3 = _sum_part(
                    stage, half, base, res_ptr, w_ptr, O3, P3, GS, GROUP, N_GROUPS, W, HAS_RES, NORM
                )
            if NORM:
                ss = sum_sq(s0)
                if P1 > 0:
                    ss += sum_sq(s1)
                if P2 > 0:
                    ss += sum_sq(s2)
                if P3 > 0:
                    ss += sum_sq(s3)
                inv = inv_rms(ss, HIDDEN, eps)
                finish_part(
                    s0,
                    w0,
                    inv,
                    row,
                    o0,
                    m0,
                    g0,
                    gm0,
                    weight_offset,
                    out_ptr,
                    normed_ptr,
                    q_ptr,
                    scale_ptr,
                    scale_st,
                    scale_sg,
                    HIDDEN,
                    QUANT,
                    EMIT,
                    FP8_MAX,
                )
                if P1 > 0:
                    finish_part(
                        s1,
                        w1,
                        inv,
                        row,
                        o1,
                        m1,
                        g1,
                        gm1,
                        weight_offset,
                        out_ptr,
                        normed_ptr,
                        q_ptr,
                        scale_ptr,
                        scale_st,
                        scale_sg,
                        HIDDEN,
                        QUANT,
                        EMIT,
                        FP8_MAX,
                    )
                if P2 > 0:
                    finish_part(
                        s2,
                        w2,
                        inv,
                        row,
                        o2,
                        m2,
                        g2,
                        gm2,
                        weight_offset,
                        out_ptr,
                        normed_ptr,
                        q_ptr,
                        scale_ptr,
                        scale_st,
                        scale_sg,
                        HIDDEN,
                        QUANT,
                        EMIT,
                        FP8_MAX,
                    )
                if P3 > 0:
                    finish_part(
                        s3,
                        w3,
                        inv,
                        row,
                        o3,
                        m3,
                        g3,
                        gm3,
                        weight_offset,
                        out_ptr,
                        normed_ptr,
                        q_ptr,
                        scale_ptr,
                        scale_st,
                        scale_sg,
                        HIDDEN,
                        QUANT,
                        EMIT,
                        FP8_MAX,
                    )
            else:
                tl.store(out_ptr + base + o0, s0.to(out_ptr.dtype.element_ty), mask=m0)
                if P1 > 0:
                    tl.store(out_ptr + base + o1, s1.to(out_ptr.dtype.element_ty), mask=m1)
                if P2 > 0:
                    tl.store(out_ptr + base + o2, s2.to(out_ptr.dtype.element_ty), mask=m2)
                if P3 > 0:
                    tl.store(out_ptr + base + o3, s3.to(out_ptr.dtype.element_ty), mask=m3)
        finish_call(ctl_ptr, calls)


def fits(tokens: int, hidden: int, group: int, peers_stage_cap: int) -> str | None:
    """Why a call of this shape cannot run here (None = it can); host-side."""
    reason = tile_reason(hidden, group)
    if reason is not None:
        return reason
    if tokens * hidden > peers_stage_cap:
        return f"{tokens} x {hidden} elements exceed the staging capacity ({peers_stage_cap})"
    return None


def oneshot_ar_norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    peers: SymmPeers,
    *,
    weight_offset: float = 0.0,
    group_size: int = 128,
    quantize: bool = True,
    emit_bf16: bool = False,
    scale_layout: str = "row",
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
    phase: int = 0,
    outputs: Outputs | None = None,
    num_warps: int | None = None,
) -> Outputs:
    """All-reduce of x over ``peers`` + add + RMSNorm (+ group quant), one kernel.

    Args:
        x: [T, H] contiguous bf16/fp16, this rank's partial sum (every rank: same T, H).
        residual: [T, H] contiguous like x, or None. weight: [H], x.dtype or float32.
        peers: the symmetric workspace views (stage in x.dtype).
        phase/outputs: interpreter emulation only (0 = the real kernel).
        num_warps: override of the tile's warp count (measurements).
    Returns:
        (q, scale, residual, normed) as ops.reference defines them (None where not asked).
    """
    tokens, hidden = x.shape
    run = prepare_rows(
        tokens,
        hidden,
        x.dtype,
        x.device,
        group_size=group_size,
        quantize=quantize,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
        outputs=outputs,
    )
    q, scale, res_out, normed = run.outputs
    if tokens == 0:
        return run.outputs
    reason = fits(tokens, hidden, run.tile.group, peers.stage_cap)
    if reason is not None:
        raise ValueError(reason)
    _oneshot_kernel[(peers.grid(tokens),)](
        x,
        residual,
        weight,
        res_out,
        normed,
        q,
        scale,
        peers.stage,
        peers.flags,
        peers.ctl,
        tokens,
        peers.stage_cap,
        float(eps),
        float(weight_offset),
        run.scale_st,
        run.scale_sg,
        W=peers.world_size,
        RANK=peers.rank,
        HIDDEN=hidden,
        **run.tile.constexprs(),
        NORM=True,
        HAS_RES=residual is not None,
        QUANT=quantize,
        EMIT=normed is not None,
        FP8_MAX=run.fp8_max,
        PHASE=phase,
        num_warps=num_warps or (run.tile.quant_num_warps if quantize else run.tile.num_warps),
    )
    return run.outputs


def oneshot_all_reduce(
    x: torch.Tensor, peers: SymmPeers, *, phase: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The bare one-shot all-reduce (float32 sum, rounded to x.dtype) with the fused
    kernel's skeleton: the benchmark's floor and an unfused-chain candidate."""
    tokens, hidden = x.shape
    out = torch.empty_like(x) if out is None else out
    if tokens == 0:
        return out
    tile = norm_tile(hidden)
    reason = fits(tokens, hidden, tile.group, peers.stage_cap)
    if reason is not None:
        raise ValueError(reason)
    _oneshot_kernel[(peers.grid(tokens),)](
        x,
        None,
        None,
        out,
        None,
        None,
        None,
        peers.stage,
        peers.flags,
        peers.ctl,
        tokens,
        peers.stage_cap,
        0.0,
        0.0,
        0,
        0,
        W=peers.world_size,
        RANK=peers.rank,
        HIDDEN=hidden,
        **tile.constexprs(),
        NORM=False,
        HAS_RES=False,
        QUANT=False,
        EMIT=False,
        FP8_MAX=1.0,
        PHASE=phase,
        num_warps=tile.num_warps,
    )
    return out
