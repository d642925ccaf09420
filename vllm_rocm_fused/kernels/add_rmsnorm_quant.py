"""Fused residual add + RMSNorm + per-group dynamic FP8 quant on one GPU (no all-reduce).

Algorithm: a token row (already summed input ``h``, any float dtype), its residual and the
weight are held as one masked [ROW_G, GS] tile of groups (ROW_G = the row's group count
rounded up to a power of two, GS = the group rounded up to a power of two); s = h + residual
(float32), r = round(s), normed = round(s * rsqrt(mean(s^2) + eps) * (w + offset)), and per
group scale = max(amax, 1e-10) / fp8_max, q = clamp(normed / scale) (row_math.py).

A row may be split over SPLIT programs (the launch table's slice size: SPLIT > 1 at decode
sizes). Program p takes row p // SPLIT and its SLICE_G groups from (p % SPLIT) * SLICE_G:
it loads its slice (h, residual, weight), stores the slice's residual, computes the whole
row's sum of squares from the row's h and residual (read again, as the one masked tile, from
L2; every program of a row computes the same bits), then the slice's norm and quant. With
SPLIT = 1 the slice is the row and nothing is read twice. Why: at 1-64 tokens one program
per row leaves most SMs idle and each row's tail (norm, quant, stores) runs on one SM;
spread over SPLIT programs it runs SPLIT times shorter, at the price of each program's
sum-of-squares pass over the row (benchmarks/results/h200_tp1_decode_explore.json: at hidden
5120 and 1 token, 2.14 us in 20 programs against 2.68 us in one; plain row parts, padded
tile and slices compared there).

Memory traffic per row: reads h, residual (H elements each; SPLIT > 1: SPLIT times, the
repeats from L2) and the weight (cache resident); writes residual (H), q (H bytes), scale
(H / group_size floats), normed (H, only when asked). One pass: the unfused chain (add+norm
kernel, then quant kernel) re-reads normed and writes it once more.

Launch shape (warps, slice groups): measured per hidden size and token count
(launch.local_launch, local_launch_table.py).

Limits: hidden % group_size == 0 and ROW_G x GS <= 16384 elements (launch.MAX_TILE: any
multiple of 128 up to 16384 in 128-groups); any group_size (padded inside the tile);
x/residual contiguous [T, H]; scale in either layout (strides passed). With
``quantize=False`` it is the fused add + RMSNorm (the unfused chain's first kernel).

Graph safety: plain loads/stores, no host sync; outputs come from the caller or the
caching allocator. Used at TP=1 and after an NCCL all-reduce (the large-token path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Outputs, local_launch, prepare_rows, tile_reason
from .row_math import finish_part, inv_rms, sum_sq


@triton.jit
def _group_tile(g0, NG: tl.constexpr, GS: tl.constexpr, GROUP: tl.constexpr, N_GROUPS: tl.constexpr):
    """NG groups of a row from group g0: (offsets in the row [NG, GS], their mask, the groups'
    indices [NG], their mask). Lanes past GROUP or N_GROUPS are masked."""
    g = g0 + tl.arange(0, NG)
    j = tl.arange(0, GS)[None, :]
    offs = g[:, None] * GROUP + j
    gmask = g < N_GROUPS
    mask = gmask[:, None] & (j < GROUP)
    return offs, mask, g, gmask


@triton.jit
def _load_sum(h_ptr, res_ptr, base, offs, mask, HAS_RES: tl.constexpr):
    """s = float32 h + residual over a tile (masked lanes 0)."""
    s = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit(do_not_specialize=["scale_st", "scale_sg"])
def _add_rmsnorm_quant_kernel(
    h_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    eps,
    weight_offset,
    scale_st,
    scale_sg,
    HIDDEN: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    ROW_G: tl.constexpr,
    SLICE_G: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_RES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // GROUP
    pid = tl.program_id(0)
    row = pid // SPLIT
    base = tl.cast(row, tl.int64) * HIDDEN
    # this program's slice first: its loads are in flight before the row's reduction
    offs, mask, g, gmask = _group_tile((pid % SPLIT) * SLICE_G, SLICE_G, GS, GROUP, N_GROUPS)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    s = _load_sum(h_ptr, res_ptr, base, offs, mask, HAS_RES)
    if SPLIT == 1:  # the slice is the row
        ss = sum_sq(s)
    else:
        row_offs, row_mask, _, _ = _group_tile(0, ROW_G, GS, GROUP, N_GROUPS)
        ss = sum_sq(_load_sum(h_ptr, res_ptr, base, row_offs, row_mask, HAS_RES))
    finish_part(
        s,
        w,
        inv_rms(ss, HIDDEN, eps),
        row,
        offs,
        mask,
        g,
        gmask,
        weight_offset,
        res_out_ptr,
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


def add_rmsnorm_quant(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
    group_size: int = 128,
    quantize: bool = True,
    emit_bf16: bool = False,
    scale_layout: str = "row",
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
    outputs: Outputs | None = None,
    num_warps: int | None = None,
    slice_groups: int | None = None,
) -> Outputs:
    """s = h + residual (float32); r = round(s); normed = round(RMSNorm(s)); (q, scale) = group quant(normed).

    Args:
        h: [T, H] contiguous, any float dtype (the already summed input).
        residual: [T, H] contiguous in out_dtype, or None.
        weight: [H] contiguous, out_dtype or float32.
        out_dtype: dtype of residual/normed outputs (default h.dtype).
        scale_layout: "row" (contiguous [T, G]) or "col" (stride (1, T)).
        outputs: preallocated (q, scale, residual, normed) as launch.empty_outputs makes them
            (tests poison them first); None = allocate.
        num_warps, slice_groups: override the measured launch shape (the sweep): warps per
            program, and groups per program (a power of two; the row's group count rounded up
            to one = one program per row).
    Returns:
        (q [T, H] quant_dtype, scale [T, G] float32, residual [T, H], normed [T, H] or None);
        with quantize=False: (None, None, residual, normed).
    """
    tokens, hidden = h.shape
    run = prepare_rows(
        tokens,
        hidden,
        out_dtype or h.dtype,
        h.device,
        group_size=group_size,
        quantize=quantize,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
        outputs=outputs,
    )
    q, scale, res_out, normed = run.outputs
    tile = run.tile
    reason = tile_reason(hidden, tile.group)
    if reason is not None:
        raise ValueError(reason)
    if tokens == 0:
        return run.outputs
    row_g = triton.next_power_of_2(tile.n_groups)
    shape = local_launch(hidden, tokens, tile)
    slice_g = slice_groups or shape.slice_groups
    if slice_g & (slice_g - 1) or not 1 <= slice_g <= row_g:
        raise ValueError(f"slice_groups must be a power of two from 1 to {row_g}, got {slice_g}")
    split = triton.cdiv(tile.n_groups, slice_g)
    _add_rmsnorm_quant_kernel[(tokens * split,)](
        h,
        residual,
        weight,
        res_out,
        normed,
        q,
        scale,
        float(eps),
        float(weight_offset),
        run.scale_st,
        run.scale_sg,
        HIDDEN=hidden,
        GS=tile.gs,
        GROUP=tile.group,
        ROW_G=row_g,
        SLICE_G=slice_g,
        SPLIT=split,
        HAS_RES=residual is not None,
        QUANT=quantize,
        EMIT=normed is not None,
        FP8_MAX=run.fp8_max,
        num_warps=num_warps or shape.num_warps,
    )
    return run.outputs
