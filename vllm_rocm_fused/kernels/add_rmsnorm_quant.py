"""Fused residual add + RMSNorm + per-group dynamic FP8 quant on one GPU (no all-reduce).

Algorithm: each program takes ROWS token rows (unrolled, so the loads of its rows can be in
flight together); a row (already summed input ``h``, any float dtype), its residual and the
weight are loaded in power-of-two parts of whole groups (row_math.py: hidden 5120 = 32 + 8
groups of 128, no padding), then s = h + residual (float32), r = round(s),
normed = round(s * rsqrt(mean(s^2) + eps) * (w + offset)), and per group
scale = max(amax, 1e-10) / fp8_max, q = clamp(normed / scale).

Memory traffic per row: reads h, residual (H elements each) and the weight (cache
resident); writes residual (H), q (H bytes), scale (H / group_size floats), normed
(H, only when asked). One pass: the unfused chain (add+norm kernel, then quant kernel)
re-reads normed and writes it once more.

Launch shape (warps, rows per program): measured per hidden size and token count
(launch.local_launch, local_launch_table.py).

Limits: hidden % group_size == 0 and the row's groups (in parts) x (group_size rounded up to
a power of two) <= 16384 elements (any multiple of 128 up to 16384 in 128-groups); any
group_size (padded inside the tile); x/residual contiguous [T, H]; scale in either layout
(strides passed). With ``quantize=False`` it is the fused add + RMSNorm (the unfused
chain's first kernel).

Graph safety: plain loads/stores, no host sync; outputs come from the caller or the
caching allocator. Used at TP=1 and after an NCCL all-reduce (the large-token path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Outputs, local_launch, prepare_rows, tile_reason
from .row_math import finish_part, inv_rms, part_tile, sum_sq


@triton.jit
def _load_part(
    h_ptr,
    res_ptr,
    w_ptr,
    base,
    row_ok,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    N_GROUPS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ROWS: tl.constexpr,
):
    """(s = float32 h + residual of one part of a row, its weights, offsets, masks)."""
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GROUP, N_GROUPS)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if ROWS > 1:  # the last program's rows past the end
        mask = mask & row_ok
        gmask = gmask & row_ok
    s = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return s, w, offs, mask, g, gmask


@triton.jit(do_not_specialize=["n_rows", "scale_st", "scale_sg"])
def _add_rmsnorm_quant_kernel(
    h_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    n_rows,
    eps,
    weight_offset,
    scale_st,
    scale_sg,
    HIDDEN: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_RES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // GROUP
    O1: tl.constexpr = P0
    O2: tl.constexpr = P0 + P1
    O3: tl.constexpr = P0 + P1 + P2
    for i in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + i
        row_ok = row < n_rows
        base = tl.cast(row, tl.int64) * HIDDEN
        s0, w0, o0, m0, g0, gm0 = _load_part(
            h_ptr, res_ptr, w_ptr, base, row_ok, 0, P0, GS, GROUP, N_GROUPS, HAS_RES, ROWS
        )
        ss = sum_sq(s0)
        if P1 > 0:
            s1, w1, o1, m1, g1, gm1 = _load_part(
                h_ptr, res_ptr, w_ptr, base, row_ok, O1, P1, GS, GROUP, N_GROUPS, HAS_RES, ROWS
            )
            ss += sum_sq(s1)
        if P2 > 0:
            s2, w2, o2, m2, g2, gm2 = _load_part(
                h_ptr, res_ptr, w_ptr, base, row_ok, O2, P2, GS, GROUP, N_GROUPS, HAS_RES, ROWS
            )
            ss += sum_sq(s2)
        if P3 > 0:
            s3, w3, o3, m3, g3, gm3 = _load_part(
                h_ptr, res_ptr, w_ptr, base, row_ok, O3, P3, GS, GROUP, N_GROUPS, HAS_RES, ROWS
            )
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
    rows_per_program: int | None = None,
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
        num_warps, rows_per_program: override the measured launch shape (the sweep).
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
    reason = tile_reason(hidden, run.tile.group)
    if reason is not None:
        raise ValueError(reason)
    if tokens == 0:
        return run.outputs
    shape = local_launch(hidden, tokens, run.tile)
    rows = rows_per_program or shape.rows
    _add_rmsnorm_quant_kernel[(triton.cdiv(tokens, rows),)](
        h,
        residual,
        weight,
        res_out,
        normed,
        q,
        scale,
        tokens,
        float(eps),
        float(weight_offset),
        run.scale_st,
        run.scale_sg,
        HIDDEN=hidden,
        **run.tile.constexprs(),
        ROWS=rows,
        HAS_RES=residual is not None,
        QUANT=quantize,
        EMIT=normed is not None,
        FP8_MAX=run.fp8_max,
        num_warps=num_warps or shape.num_warps,
    )
    return run.outputs
