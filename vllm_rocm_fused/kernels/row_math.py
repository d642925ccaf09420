"""Triton device functions shared by the fused kernels: the per-row tail of the op.

A token row of HIDDEN elements is N_GROUPS = HIDDEN / GROUP groups of GROUP contiguous
elements. The groups are held in registers as up to four *parts* of P0 >= P1 >= P2 >= P3
groups (powers of two, 0 = no such part; launch.row_parts picks them): part k is a
[Pk, GS] tile (GS = GROUP rounded up to a power of two) starting at group P0 + ... + P(k-1).
So a row is not padded to a power-of-two tile: hidden 5120 in 128-groups is parts 32 + 8
(5120 elements in registers), not one 64-group tile (8192, 60% padding, which spilled
registers and ran at 2.1x the byte floor on an H200). Only a row whose group count has more
than four binary digits gets a padded (masked) last part.

A kernel handles a row in two steps over its parts, with every part's float32 sum kept in
registers (nothing is re-read, so the all-reduce kernels read their peers' data once):
  1. per part: s = (the kernel's all-reduced input) + residual, float32, and the part's
     weights (the kernel's own loader, every load issued before the row's reduction);
     ss = the sum of s^2 over the parts (``sum_sq``, part by part, in part order);
  2. inv_rms = rsqrt(ss / HIDDEN + eps) once, then per part ``finish_part``: r = round(s),
     normed = round(s * inv_rms * (w + offset)), per group scale and q, stores.
The arithmetic follows ``ops/reference.py`` step by step (same roundings, same
multiplication order, correctly rounded quotients), so a kernel differs from the reference
only through the order of the row's float32 sum of squares and of the all-reduce, and
through ``rsqrt``'s last bit. The quant's division by the group's scale is one reciprocal per
group and a Markstein correction per element (``quant_tile``): the correctly rounded
quotient the IEEE division gives, in three instructions instead of a division (an
element-wise ``div_rn`` cost a program holding a whole row 0.13-2.9 us per call at decode
sizes on an H200, most on a padded tile's all-zero groups; a program with a 256-element
slice, ~0: benchmarks/results/h200_tp1_decode_explore.json).

NaN/Inf: the sums propagate them; amax and the amax floor use NaN-propagating min/max (Triton's defaults drop NaN), so a NaN row gives NaN scales and NaN ``q`` as the
reference does.

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Floor under a group's amax (ops.reference.AMAX_FLOOR).
AMAX_FLOOR: tl.constexpr = tl.constexpr(1e-10)
F32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)

# Control words of a symmetric workspace's local int32 control tensor (see symm_sync.py).
CTL_CALLS: tl.constexpr = tl.constexpr(0)  # completed calls: their parity picks the buffer half
CTL_TICKET: tl.constexpr = tl.constexpr(1)  # blocks finished in the running call
CTL_ERRORS: tl.constexpr = tl.constexpr(2)  # barrier waits that gave up (must stay 0)
CTL_EPOCHS: tl.constexpr = tl.constexpr(8)  # per-block barrier epochs start here


@triton.jit
def nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def part_tile(G_OFF: tl.constexpr, NGP: tl.constexpr, GS: tl.constexpr, GROUP: tl.constexpr, N_GROUPS: tl.constexpr):
    """Part of NGP groups starting at group G_OFF: (offsets within the row [NGP, GS], their
    mask, the groups' indices [NGP], their mask). Lanes past GROUP or N_GROUPS are masked."""
    g = G_OFF + tl.arange(0, NGP)
    j = tl.arange(0, GS)[None, :]
    offs = g[:, None] * GROUP + j
    gmask = g < N_GROUPS
    if GS == GROUP:
        mask = gmask[:, None] & (j < GS)
    else:
        mask = gmask[:, None] & (j < GROUP)
    return offs, mask, g, gmask


@triton.jit
def sum_sq(s):
    """Sum of squares of a float32 part (masked lanes hold 0)."""
    return tl.sum(tl.sum(s * s, axis=1), axis=0)


@triton.jit
def inv_rms(ss, HIDDEN: tl.constexpr, eps):
    return tl.math.rsqrt(tl.math.div_rn(ss, tl.full((), HIDDEN, tl.float32)) + eps)


@triton.jit
def norm_part(s, inv, w, weight_offset, OUT_DTYPE: tl.constexpr):
    """normed = round(s * inv_rms * (w + offset)), the reference's order."""
    return (s * inv * (w.to(tl.float32) + weight_offset)).to(OUT_DTYPE)


@triton.jit
def quant_tile(normed, FP8_MAX: tl.constexpr):
    """Per-row-of-the-tile (= per group) dynamic symmetric quant of ``normed``.
    Returns (q as float32, within +-FP8_MAX once rounded to the fp8 type, scale [rows of the
    tile] float32).

    q = normed / scale, correctly rounded, as r = 1 / scale (rounded to nearest, once per
    group), q0 = n * r, then Markstein's correction q = q0 + (q0 * scale - n) * (-r) (two
    fused multiply-adds): with r the rounded reciprocal and q0 within an ulp of n / scale, the
    corrected q is n / scale rounded to nearest (Markstein 1990; the GPU tests check the
    bytes against an IEEE division). Negations are written x * -1.0, an exact sign flip that
    the compiler folds into the multiply-adds (Triton's -x is 0 - x, which turns -0 into +0
    and cost a sign fix per element), so a zero n gives a zero of n's sign. An infinite
    scale (an fp16/bf16 overflow in normed) gives r = 0; the correction then uses the largest
    finite float32 so that q = n * 0 stays what n / inf is (NaN for an infinite n). A NaN
    scale gives NaN.

    No clamp to +-FP8_MAX: scale = amax / FP8_MAX, so |q| exceeds FP8_MAX by at most the
    scale's rounding (a few float32 ulps), which rounding to the fp8 type takes back to
    FP8_MAX (the reference clamps; the bytes are the same: GPU tests and
    benchmarks/results/h200_tp1_split_sum_explore2.json). Per element: one multiply, two
    multiply-adds."""
    nf = normed.to(tl.float32)
    amax = tl.reduce(tl.abs(nf), 1, nan_max)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL), FP8_MAX)
    r = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    finite = tl.minimum(scale, F32_MAX, propagate_nan=tl.PropagateNan.ALL)[:, None]
    q0 = nf * r[:, None]
    q = tl.fma(tl.fma(q0, finite, nf * -1.0), (r * -1.0)[:, None], q0)
    return q, scale


@triton.jit
def finish_part(
    s,
    w,
    inv,
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
    HIDDEN: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """One part of a row's outputs: residual round(s), (normed), (q, scale) into [T, H]
    outputs (scale at row * scale_st + g * scale_sg, so either layout). ``w``: the part's
    weights, loaded by the caller with its other loads (not after the row's reduction)."""
    base = tl.cast(row, tl.int64) * HIDDEN
    tl.store(res_out_ptr + base + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    store_norm_quant(
        s,
        w,
        inv,
        row,
        offs,
        mask,
        g,
        gmask,
        weight_offset,
        normed_ptr,
        q_ptr,
        scale_ptr,
        scale_st,
        scale_sg,
        res_out_ptr.dtype.element_ty,
        HIDDEN,
        QUANT,
        EMIT,
        FP8_MAX,
    )


@triton.jit
def store_norm_quant(
    s,
    w,
    inv,
    row,
    offs,
    mask,
    g,
    gmask,
    weight_offset,
    normed_ptr,
    q_ptr,
    scale_ptr,
    scale_st,
    scale_sg,
    OUT_DTYPE: tl.constexpr,
    HIDDEN: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """A tile's normed (OUT_DTYPE; stored if EMIT) and its (q, scale) (if QUANT), the
    residual being stored by the caller."""
    base = tl.cast(row, tl.int64) * HIDDEN
    normed = norm_part(s, inv, w, weight_offset, OUT_DTYPE)
    if EMIT:
        tl.store(normed_ptr + base + offs, normed, mask=mask)
    if QUANT:
        q, scale = quant_tile(normed, FP8_MAX)
        tl.store(q_ptr + base + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g * scale_sg, scale, mask=gmask)
