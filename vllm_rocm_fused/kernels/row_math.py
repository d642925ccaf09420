"""Triton device functions shared by the fused kernels: the per-row tail of the op.

A token row of H elements is held in registers as a ``[NG_P2, GS]`` tile: NG = H / GS
groups of GS contiguous elements, the padding groups (NG..NG_P2) masked to zero, so the
quant's per-group amax is a reduction along axis 1 and the row's sum of squares one over
both axes. The arithmetic follows ``ops/reference.py`` step by step (same roundings, same
multiplication order, IEEE divisions via ``div_rn``), so a kernel differs from the
reference only through the order of the row's float32 sum of squares and of the
all-reduce, and through ``rsqrt``'s last bit.

NaN/Inf: the sums propagate them; amax, the amax floor and the clamp use NaN-propagating
min/max (Triton's defaults drop NaN), so a NaN row gives NaN scales and NaN ``q`` as the
reference does.

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Floor under a group's amax (ops.reference.AMAX_FLOOR).
AMAX_FLOOR: tl.constexpr = tl.constexpr(1e-10)

# Control words of a symmetric workspace's local int32 control tensor (see symm_sync.py).
CTL_CALLS: tl.constexpr = tl.constexpr(0)  # completed calls: their parity picks the buffer half
CTL_TICKET: tl.constexpr = tl.constexpr(1)  # blocks finished in the running call
CTL_ERRORS: tl.constexpr = tl.constexpr(2)  # barrier waits that gave up (must stay 0)
CTL_EPOCHS: tl.constexpr = tl.constexpr(8)  # per-block barrier epochs start here


@triton.jit
def nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_tile(n_groups, NG_P2: tl.constexpr, GS: tl.constexpr, GROUP: tl.constexpr):
    """Offsets (within a row) and mask of the [NG_P2, GS] tile of a row of
    ``n_groups`` groups of ``GROUP`` elements (GS = GROUP rounded up to a power of two)."""
    g = tl.arange(0, NG_P2)[:, None]
    j = tl.arange(0, GS)[None, :]
    offs = g * GROUP + j
    if GS == GROUP:
        mask = g < n_groups
    else:
        mask = (g < n_groups) & (j < GROUP)
    return offs, mask


@triton.jit
def add_rmsnorm(acc, res, w, eps, hidden, weight_offset, OUT_DTYPE: tl.constexpr, HAS_RES: tl.constexpr):
    """acc: float32 tile of the summed input; res, w: tiles of residual and weight
    (masked lanes 0). Returns (r, normed) in OUT_DTYPE: the norm reads the unrounded
    float32 sum s = acc + res, r is s rounded (the reference's order of roundings)."""
    if HAS_RES:
        acc = acc + res.to(tl.float32)
    r = acc.to(OUT_DTYPE)
    ss = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    inv_rms = tl.math.rsqrt(tl.math.div_rn(ss, hidden.to(tl.float32)) + eps)
    normed = (acc * inv_rms * (w.to(tl.float32) + weight_offset)).to(OUT_DTYPE)
    return r, normed


@triton.jit
def group_quant(normed, FP8_MAX: tl.constexpr):
    """Per-row-of-the-tile (= per group) dynamic symmetric quant of ``normed``.
    Returns (q as float32 already clamped to +-FP8_MAX, scale [NG_P2] float32)."""
    nf = normed.to(tl.float32)
    amax = tl.reduce(tl.abs(nf), 1, nan_max)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL), FP8_MAX)
    q = tl.math.div_rn(nf, scale[:, None])
    q = tl.maximum(q, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    q = tl.minimum(q, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return q, scale


@triton.jit
def store_row_outputs(row, offs, mask, n_groups, r, normed,
                      res_out_ptr, normed_ptr, q_ptr, scale_ptr, scale_st, scale_sg,
                      hidden, NG_P2: tl.constexpr, QUANT: tl.constexpr, EMIT: tl.constexpr,
                      FP8_MAX: tl.constexpr):
    """Write one row's residual, (normed), (q, scale) to [T, H] outputs (scale at
    row * scale_st + g * scale_sg, so either layout)."""
    base = tl.cast(row, tl.int64) * hidden
    tl.store(res_out_ptr + base + offs, r, mask=mask)
    if EMIT:
        tl.store(normed_ptr + base + offs, normed, mask=mask)
    if QUANT:
        q, scale = group_quant(normed, FP8_MAX)
        tl.store(q_ptr + base + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        g = tl.arange(0, NG_P2)
        tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g * scale_sg, scale, mask=g < n_groups)
