"""Fused residual add + RMSNorm + per-group dynamic FP8 quant on one GPU (no all-reduce).

Algorithm: one program per token row; the row (already summed input ``h``, any float
dtype), the residual and the weight are loaded as [NG_P2, GS] tiles (row_math), then
s = h + residual (float32), r = round(s), normed = round(s * rsqrt(mean(s^2) + eps) * (w + offset)),
and per group scale = max(amax, 1e-10) / fp8_max, q = clamp(normed / scale).

Memory traffic per row: reads h, residual (H elements each) and the weight (cache
resident); writes residual (H), q (H bytes), scale (H / group_size floats), normed
(H, only when asked). One pass: the unfused chain (add+norm kernel, then quant kernel)
re-reads normed and writes it once more.

Limits: hidden % group_size == 0 and (hidden / group_size rounded up to a power of two)
x (group_size rounded up likewise) <= 16384 elements per row; any group_size (padded
inside the tile); x/residual contiguous [T, H]; scale in either layout (strides passed).
With ``quantize=False`` it is the fused add + RMSNorm (the unfused chain's first kernel).

Graph safety: plain loads/stores, no host sync; outputs come from the caller or the
caching allocator. Used at TP=1 and after an NCCL all-reduce (the large-token path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import empty_outputs, norm_tile, quant_constants, row_tile, scale_strides, tile_reason
from .row_math import add_rmsnorm, row_tile as tile_offsets, store_row_outputs


@triton.jit(do_not_specialize=["scale_st", "scale_sg"])
def _add_rmsnorm_quant_kernel(
    h_ptr, res_ptr, w_ptr, res_out_ptr, normed_ptr, q_ptr, scale_ptr,
    hidden, n_groups, eps, weight_offset, scale_st, scale_sg,
    NG_P2: tl.constexpr, GS: tl.constexpr, GROUP: tl.constexpr,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, EMIT: tl.constexpr, FP8_MAX: tl.constexpr,
):
    row = tl.program_id(0)
    offs, mask = tile_offsets(n_groups, NG_P2, GS, GROUP)
    base = tl.cast(row, tl.int64) * hidden
    acc = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + base + offs, mask=mask, other=0.0)
    else:
        res = acc
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    r, normed = add_rmsnorm(acc, res, w, eps, hidden, weight_offset, res_out_ptr.dtype.element_ty, HAS_RES)
    store_row_outputs(row, offs, mask, n_groups, r, normed, res_out_ptr, normed_ptr, q_ptr, scale_ptr,
                      scale_st, scale_sg, hidden, NG_P2, QUANT, EMIT, FP8_MAX)


def fits(hidden: int, group_size: int) -> str | None:
    """Why this kernel cannot take the shape (None = it can)."""
    if hidden % group_size:
        return f"hidden {hidden} is not a multiple of group_size {group_size}"
    reason = tile_reason(hidden, group_size)
    if reason is not None:
        return reason
    return None


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
    emit_normed: bool = False,
    scale_layout: str = "row",
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
    outputs=None,
):
    """s = h + residual (float32); r = round(s); normed = round(RMSNorm(s)); (q, scale) = group quant(normed).

    Args:
        h: [T, H] contiguous, any float dtype (the already summed input).
        residual: [T, H] contiguous in out_dtype, or None.
        weight: [H] contiguous, out_dtype or float32.
        out_dtype: dtype of residual/normed outputs (default h.dtype).
        scale_layout: "row" (contiguous [T, G]) or "col" (stride (1, T)).
        outputs: preallocated (q, scale, residual, normed) as launch.empty_outputs makes them
            (tests poison them first); None = allocate.
    Returns:
        (q [T, H] quant_dtype, scale [T, G] float32, residual [T, H], normed [T, H] or None);
        with quantize=False: (None, None, residual, normed).
    """
    tokens, hidden = h.shape
    out_dtype = out_dtype or h.dtype
    if outputs is None:
        outputs = empty_outputs(tokens, hidden, out_dtype, h.device, group_size=group_size, quantize=quantize,
                                emit_normed=emit_normed, scale_layout=scale_layout, quant_dtype=quant_dtype)
    q, scale, res_out, normed = outputs
    tile = row_tile(hidden, group_size) if quantize else norm_tile(hidden)
    reason = tile_reason(hidden, tile.group)
    if reason is not None:
        raise ValueError(reason)
    if tokens == 0:
        return outputs
    st, sg = scale_strides(scale) if quantize else (0, 0)
    _add_rmsnorm_quant_kernel[(tokens,)](
        h, residual, weight, res_out, normed, q, scale,
        hidden, tile.n_groups, float(eps), float(weight_offset), st, sg,
        NG_P2=tile.ng_p2, GS=tile.gs, GROUP=tile.group,
        HAS_RES=residual is not None, QUANT=quantize, EMIT=normed is not None,
        FP8_MAX=quant_constants(quant_dtype) if quantize else 1.0,
        num_warps=tile.num_warps,
    )
    return outputs
