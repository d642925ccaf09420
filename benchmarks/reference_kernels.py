"""Kernels the TP=1 measurements compare the dispatched op with, and the decode exploration's
candidate kernel.

- ``empty``: a kernel that does nothing (one program): in a graph of back-to-back nodes, the
  least one kernel node costs. No kernel of the op can run faster than this floor.
- ``plain_tile``: a deliberately plain add + RMSNorm + 1x128 quant, the yardstick of
  issue 24: one program per token row, the row as ONE masked [next_pow2(groups), 128] tile,
  16 warps, no tuning; the production kernels' arithmetic (row_math's norm and quant
  helpers). Residual given, bf16/fp16 in, row-major scales, no normed output (what the
  model's fused sites run).
- ``sliced``: the decode exploration's candidate (benchmarks/explore_decode.py). Program p
  takes row p // SPLIT and that row's slice of SLICE_G groups starting at group (p % SPLIT)
  * SLICE_G, so a short batch spreads each row over SPLIT programs (SMs) instead of one.
  Each program computes the whole row's sum of squares (SPLIT > 1: the row's h and residual
  read again, from L2, as one masked tile or, ROW_PARTS, as the power-of-two parts of
  kernels/launch.row_parts), then the norm and quant of its slice only. FAST_DIV: the quant
  divides as row_math.quant_tile does (one reciprocal per group and a Markstein correction
  per element); without it, by an IEEE division per element (quant_tile before issue 24).
  The committed exploration (benchmarks/results/h200_tp1_decode_explore.json, commit
  4533c9e) ran FAST_DIV in an earlier form whose zero quotients lost n's sign (-0 came out
  +0), the likely cause of its failed q-bytes comparisons with the division twin (at the
  larger points; a normed -0 comes from h + residual = 0 with w + 1 < 0; not confirmed
  element by element). The timings are unaffected: the fix is one bitwise op.

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_rocm_fused.kernels.row_math import AMAX_FLOOR, inv_rms, nan_max, norm_part, quant_tile, sum_sq

PLAIN_WARPS = 16


@triton.jit
def _empty_kernel(x_ptr):
    pass


def empty(x: torch.Tensor) -> None:
    """Launch the empty kernel (one program, one warp)."""
    _empty_kernel[(1,)](x, num_warps=1)


@triton.jit
def _group_tile(g0, NG: tl.constexpr, GS: tl.constexpr, GROUP: tl.constexpr, N_GROUPS: tl.constexpr):
    """NG groups from group g0 (a run-time value): offsets in the row [NG, GS], their mask,
    the groups' indices [NG] and their mask."""
    g = g0 + tl.arange(0, NG)
    j = tl.arange(0, GS)[None, :]
    offs = g[:, None] * GROUP + j
    gmask = g < N_GROUPS
    mask = gmask[:, None] & (j < GROUP)
    return offs, mask, g, gmask


@triton.jit(do_not_specialize=["scale_st"])
def _plain_tile_kernel(
    h_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    q_ptr,
    scale_ptr,
    eps,
    weight_offset,
    scale_st,
    HIDDEN: tl.constexpr,
    ROW_G: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    row = tl.program_id(0)
    base = tl.cast(row, tl.int64) * HIDDEN
    offs, mask, g, gmask = _group_tile(0, ROW_G, 128, 128, HIDDEN // 128)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    s = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    inv = inv_rms(sum_sq(s), HIDDEN, eps)
    tl.store(res_out_ptr + base + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    normed = norm_part(s, inv, w, weight_offset, res_out_ptr.dtype.element_ty)
    q, scale = quant_tile(normed, FP8_MAX)
    tl.store(q_ptr + base + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g, scale, mask=gmask)


def _outputs(h: torch.Tensor, quant_dtype: torch.dtype, outputs):
    tokens, hidden = h.shape
    if outputs is not None:
        return outputs
    q = torch.empty((tokens, hidden), dtype=quant_dtype, device=h.device)
    scale = torch.empty((tokens, hidden // 128), dtype=torch.float32, device=h.device)
    return q, scale, torch.empty_like(h), None


def warm(hidden: int) -> None:
    """Compile (or load) the empty and plain masked-tile kernels at ``hidden``
    (precompile.py's ("call", "reference_kernels", "warm", hidden) job)."""
    g = torch.Generator(device="cuda")
    g.manual_seed(hidden)
    x = torch.randn(2, hidden, device="cuda", generator=g).to(torch.bfloat16)
    plain_tile(x, x, x[0], 1e-6)
    empty(x)
    torch.cuda.synchronize()


def plain_tile(h, residual, weight, eps, *, weight_offset=1.0, quant_dtype=torch.float8_e4m3fn, outputs=None):
    """(q, scale, residual, None) of the plain masked-tile kernel; ``outputs`` as
    kernels.launch.empty_outputs makes them (row-major scales, no normed), or None."""
    tokens, hidden = h.shape
    if hidden % 128:
        raise ValueError(f"hidden {hidden} is not a multiple of 128")
    q, scale, res_out, _ = out = _outputs(h, quant_dtype, outputs)
    if tokens:
        _plain_tile_kernel[(tokens,)](
            h,
            residual,
            weight,
            res_out,
            q,
            scale,
            float(eps),
            float(weight_offset),
            scale.stride(0),
            HIDDEN=hidden,
            ROW_G=triton.next_power_of_2(hidden // 128),
            FP8_MAX=float(torch.finfo(quant_dtype).max),
            num_warps=PLAIN_WARPS,
        )
    return out


@triton.jit
def _quant_ieee(normed, FP8_MAX: tl.constexpr):
    """row_math.quant_tile as it was before issue 24: an IEEE division per element."""
    nf = normed.to(tl.float32)
    amax = tl.reduce(tl.abs(nf), 1, nan_max)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL), FP8_MAX)
    q = tl.math.div_rn(nf, scale[:, None])
    q = tl.maximum(q, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    q = tl.minimum(q, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return q, scale


@triton.jit
def _row_sum_part(h_ptr, res_ptr, base, G_OFF: tl.constexpr, NGP: tl.constexpr, N_GROUPS: tl.constexpr):
    offs, mask, _, _ = _group_tile(G_OFF, NGP, 128, 128, N_GROUPS)
    s = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return sum_sq(s)


@triton.jit(do_not_specialize=["scale_st"])
def _sliced_kernel(
    h_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    q_ptr,
    scale_ptr,
    eps,
    weight_offset,
    scale_st,
    HIDDEN: tl.constexpr,
    ROW_G: tl.constexpr,
    SLICE_G: tl.constexpr,
    SPLIT: tl.constexpr,
    ROW_PARTS: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    FAST_DIV: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // 128
    pid = tl.program_id(0)
    row = pid // SPLIT
    base = tl.cast(row, tl.int64) * HIDDEN
    offs, mask, g, gmask = _group_tile((pid % SPLIT) * SLICE_G, SLICE_G, 128, 128, N_GROUPS)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    s = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if SPLIT == 1:  # the slice is the row
        ss = sum_sq(s)
    elif ROW_PARTS:
        ss = _row_sum_part(h_ptr, res_ptr, base, 0, P0, N_GROUPS)
        if P1 > 0:
            ss += _row_sum_part(h_ptr, res_ptr, base, P0, P1, N_GROUPS)
        if P2 > 0:
            ss += _row_sum_part(h_ptr, res_ptr, base, P0 + P1, P2, N_GROUPS)
        if P3 > 0:
            ss += _row_sum_part(h_ptr, res_ptr, base, P0 + P1 + P2, P3, N_GROUPS)
    else:
        ss = _row_sum_part(h_ptr, res_ptr, base, 0, ROW_G, N_GROUPS)
    tl.store(res_out_ptr + base + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    inv = inv_rms(ss, HIDDEN, eps)
    normed = norm_part(s, inv, w, weight_offset, res_out_ptr.dtype.element_ty)
    if FAST_DIV:
        q, scale = quant_tile(normed, FP8_MAX)
    else:
        q, scale = _quant_ieee(normed, FP8_MAX)
    tl.store(q_ptr + base + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g, scale, mask=gmask)


def sliced(
    h,
    residual,
    weight,
    eps,
    *,
    slice_groups: int,
    num_warps: int,
    row_parts: bool = False,
    fast_div: bool = False,
    weight_offset=1.0,
    quant_dtype=torch.float8_e4m3fn,
    outputs=None,
):
    """(q, scale, residual, None) of the exploration's candidate: ``slice_groups`` (a power of
    two) 128-groups per program, so cdiv(groups, slice_groups) programs per row."""
    from vllm_rocm_fused.kernels.launch import row_parts as parts_of

    tokens, hidden = h.shape
    if hidden % 128:
        raise ValueError(f"hidden {hidden} is not a multiple of 128")
    n_groups = hidden // 128
    row_g = triton.next_power_of_2(n_groups)
    if slice_groups & (slice_groups - 1) or not 1 <= slice_groups <= row_g:
        raise ValueError(f"slice_groups must be a power of two <= {row_g}, got {slice_groups}")
    split = triton.cdiv(n_groups, slice_groups)
    q, scale, res_out, _ = out = _outputs(h, quant_dtype, outputs)
    p0, p1, p2, p3 = parts_of(n_groups)
    if tokens:
        _sliced_kernel[(tokens * split,)](
            h,
            residual,
            weight,
            res_out,
            q,
            scale,
            float(eps),
            float(weight_offset),
            scale.stride(0),
            HIDDEN=hidden,
            ROW_G=row_g,
            SLICE_G=slice_groups,
            SPLIT=split,
            ROW_PARTS=row_parts,
            P0=p0,
            P1=p1,
            P2=p2,
            P3=p3,
            FAST_DIV=fast_div,
            FP8_MAX=float(torch.finfo(quant_dtype).max),
            num_warps=num_warps,
        )
    return out
