"""Kernels the TP=1 measurements compare the dispatched op with, and the decode exploration's
candidate kernel.

- ``empty``: a kernel that does nothing (one program): in a graph of back-to-back nodes, the
  least one kernel node costs. No kernel of the op can run faster than this floor.
- ``groupwise``: the op without its row reduction: normed = s * (w + offset) (no rsqrt of
  the row's mean square), everything else as the op (reads h, residual, weight; writes the
  residual, q and the scales; the per-group amax and quant), in programs of GROUPWISE_G
  groups of the flattened [tokens x groups] grid. Its outputs are not the op's (not
  checked). The dispatched op minus this is what the row-wide dependency (each row's sum of
  squares before its first normed value) costs at that point.
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
- ``split_sum``: the candidates of benchmarks/explore_split_sum.py: a split row whose
  programs get the row's sum of squares in one of six ways (the whole row read again, as
  the local kernel does; only the other slices read, slice by slice, as one masked row tile,
  accumulated slice-wise into one tile, or summed as a butterfly; or the slices' sums
  exchanged through a global workspace with atomics), and the quant before (``_quant_sign_fix``) or after
  (row_math.quant_tile) its lean form.

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_rocm_fused.kernels.add_rmsnorm_quant import _group_tile, row_squares
from vllm_rocm_fused.kernels.row_math import AMAX_FLOOR, F32_MAX, inv_rms, nan_max, norm_part, quant_tile, sum_sq

PLAIN_WARPS = 16


@triton.jit
def _empty_kernel(x_ptr):
    pass


def empty(x: torch.Tensor) -> None:
    """Launch the empty kernel (one program, one warp)."""
    _empty_kernel[(1,)](x, num_warps=1)


GROUPWISE_G = 8  # groups per program of the groupwise kernel
GROUPWISE_WARPS = 4


@triton.jit(do_not_specialize=["n_groups"])
def _groupwise_kernel(
    h_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    q_ptr,
    scale_ptr,
    weight_offset,
    n_groups,
    GROUPS: tl.constexpr,
    NG: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """NG groups of the flattened [tokens x GROUPS] group grid from group program_id * NG (scales
    row-major, so a group's flat index is its scale's)."""
    g = tl.program_id(0) * NG + tl.arange(0, NG)
    j = tl.arange(0, 128)[None, :]
    offs = tl.cast(g, tl.int64)[:, None] * 128 + j
    gmask = g < n_groups
    mask = gmask[:, None] & (j < 128)
    w = tl.load(w_ptr + (g % GROUPS)[:, None] * 128 + j, mask=mask, other=0.0)
    s = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_out_ptr + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    normed = (s * (w.to(tl.float32) + weight_offset)).to(res_out_ptr.dtype.element_ty)
    q, scale = quant_tile(normed, FP8_MAX)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + g, scale, mask=gmask)


def groupwise(h, residual, weight, *, weight_offset=1.0, quant_dtype=torch.float8_e4m3fn, outputs=None):
    """(q, scale, residual, None) of the groupwise kernel (not the op: no RMS factor)."""
    tokens, hidden = h.shape
    q, scale, res_out, _ = out = _outputs(h, quant_dtype, outputs)
    n_groups = tokens * (hidden // 128)
    if n_groups:
        _groupwise_kernel[(triton.cdiv(n_groups, GROUPWISE_G),)](
            h,
            residual,
            weight,
            res_out,
            q,
            scale,
            float(weight_offset),
            n_groups,
            GROUPS=hidden // 128,
            NG=GROUPWISE_G,
            FP8_MAX=float(torch.finfo(quant_dtype).max),
            num_warps=GROUPWISE_WARPS,
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
def _quant_sign_fix(normed, FP8_MAX: tl.constexpr):
    """row_math.quant_tile as it was before explore_split_sum.py's second round (the "r"
    kinds there): Triton's negation (0 - x), so a sign fix per element, and a clamp to
    +-FP8_MAX. row_math.quant_tile now (the "l", lean, kinds) gives the same bytes in fewer
    instructions."""
    nf = normed.to(tl.float32)
    amax = tl.reduce(tl.abs(nf), 1, nan_max)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL), FP8_MAX)
    r = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)[:, None]
    finite = tl.minimum(scale, F32_MAX, propagate_nan=tl.PropagateNan.ALL)[:, None]
    q0 = nf * r
    q = tl.fma(-tl.fma(q0, finite, -nf), r, q0)
    sign = nf.to(tl.uint32, bitcast=True) & 0x80000000
    q = (q.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    q = tl.maximum(q, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    q = tl.minimum(q, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return q, scale


@triton.jit
def _load_sum(h_ptr, res_ptr, base, offs, mask, CACHE: tl.constexpr):
    """s = float32 h + residual over a tile (masked lanes 0); CACHE: the loads' cache
    modifier ("" or ".cg")."""
    s = tl.load(h_ptr + base + offs, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32)
    s += tl.load(res_ptr + base + offs, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32)
    return s


# _finish_row's quant forms
QUANT_LEAN: tl.constexpr = tl.constexpr(0)  # row_math.quant_tile
QUANT_SIGN_FIX: tl.constexpr = tl.constexpr(1)  # _quant_sign_fix
QUANT_IEEE: tl.constexpr = tl.constexpr(2)  # _quant_ieee


@triton.jit
def _finish_row(
    s,
    w,
    ss,
    row,
    offs,
    mask,
    g,
    gmask,
    eps,
    weight_offset,
    res_out_ptr,
    q_ptr,
    scale_ptr,
    scale_st,
    HIDDEN: tl.constexpr,
    QUANT_FORM: tl.constexpr,
    STORE_RES: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """A tile's tail, given its row's sum of squares ``ss``: the residual (if STORE_RES; else
    the caller stored it), normed, (q, scale) stored (row-major scales). QUANT_FORM:
    QUANT_LEAN (row_math.quant_tile), QUANT_SIGN_FIX (_quant_sign_fix) or QUANT_IEEE
    (_quant_ieee)."""
    base = tl.cast(row, tl.int64) * HIDDEN
    if STORE_RES:
        tl.store(res_out_ptr + base + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    normed = norm_part(s, inv_rms(ss, HIDDEN, eps), w, weight_offset, res_out_ptr.dtype.element_ty)
    if QUANT_FORM == QUANT_LEAN:
        q, scale = quant_tile(normed, FP8_MAX)
    elif QUANT_FORM == QUANT_SIGN_FIX:
        q, scale = _quant_sign_fix(normed, FP8_MAX)
    else:
        q, scale = _quant_ieee(normed, FP8_MAX)
    tl.store(q_ptr + base + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g, scale, mask=gmask)


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
    offs, mask, g, gmask = _group_tile(0, ROW_G, 128, 128, HIDDEN // 128, ROW_G)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    s = _load_sum(h_ptr, res_ptr, base, offs, mask, "")
    # the tail written out, not _finish_row: inv_rms before the residual's store, the order
    # of the code the committed benchmark results were measured with
    inv = inv_rms(sum_sq(s), HIDDEN, eps)
    tl.store(res_out_ptr + base + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    normed = norm_part(s, inv, w, weight_offset, res_out_ptr.dtype.element_ty)
    q, scale = quant_tile(normed, FP8_MAX)
    tl.store(q_ptr + base + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g, scale, mask=gmask)


def _outputs(h: torch.Tensor, quant_dtype: torch.dtype, outputs):
    """``outputs``, or new (q, scale, residual, None) for ``h`` (row-major scales, one per
    128-group); checks that the row is whole 128-groups either way."""
    tokens, hidden = h.shape
    if hidden % 128:
        raise ValueError(f"hidden {hidden} is not a multiple of 128")
    if outputs is not None:
        return outputs
    q = torch.empty((tokens, hidden), dtype=quant_dtype, device=h.device)
    scale = torch.empty((tokens, hidden // 128), dtype=torch.float32, device=h.device)
    return q, scale, torch.empty_like(h), None


def warm(hidden: int) -> None:
    """Compile (or load) the empty, groupwise and plain masked-tile kernels at ``hidden``
    (precompile.py's ("call", "reference_kernels", "warm", hidden) job)."""
    g = torch.Generator(device="cuda")
    g.manual_seed(hidden)
    x = torch.randn(2, hidden, device="cuda", generator=g).to(torch.bfloat16)
    plain_tile(x, x, x[0], 1e-6)
    groupwise(x, x, x[0])
    empty(x)
    torch.cuda.synchronize()


def plain_tile(h, residual, weight, eps, *, weight_offset=1.0, quant_dtype=torch.float8_e4m3fn, outputs=None):
    """(q, scale, residual, None) of the plain masked-tile kernel; ``outputs`` as
    kernels.launch.empty_outputs makes them (row-major scales, no normed), or None."""
    tokens, hidden = h.shape
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
def _row_sum_part(
    h_ptr, res_ptr, base, G_OFF: tl.constexpr, NGP: tl.constexpr, N_GROUPS: tl.constexpr, CACHE: tl.constexpr
):
    """Sum of squares of NGP groups of a row from group G_OFF, read with cache modifier CACHE."""
    offs, mask, _, _ = _group_tile(G_OFF, NGP, 128, 128, N_GROUPS, NGP)
    return sum_sq(_load_sum(h_ptr, res_ptr, base, offs, mask, CACHE))


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
    offs, mask, g, gmask = _group_tile((pid % SPLIT) * SLICE_G, SLICE_G, 128, 128, N_GROUPS, SLICE_G)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    s = _load_sum(h_ptr, res_ptr, base, offs, mask, "")
    if SPLIT == 1:  # the slice is the row
        ss = sum_sq(s)
    elif ROW_PARTS:
        ss = _row_sum_part(h_ptr, res_ptr, base, 0, P0, N_GROUPS, "")
        if P1 > 0:
            ss += _row_sum_part(h_ptr, res_ptr, base, P0, P1, N_GROUPS, "")
        if P2 > 0:
            ss += _row_sum_part(h_ptr, res_ptr, base, P0 + P1, P2, N_GROUPS, "")
        if P3 > 0:
            ss += _row_sum_part(h_ptr, res_ptr, base, P0 + P1 + P2, P3, N_GROUPS, "")
    else:
        ss = _row_sum_part(h_ptr, res_ptr, base, 0, ROW_G, N_GROUPS, "")
    _finish_row(
        s,
        w,
        ss,
        row,
        offs,
        mask,
        g,
        gmask,
        eps,
        weight_offset,
        res_out_ptr,
        q_ptr,
        scale_ptr,
        scale_st,
        HIDDEN,
        QUANT_LEAN if FAST_DIV else QUANT_IEEE,
        True,
        FP8_MAX,
    )


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


# ---------------------------------------------------------------------------------------------
# Split rows whose programs share the row's sum of squares (benchmarks/explore_split_sum.py)

SS_REREAD, SS_OTHERS, SS_EXCHANGE, SS_OTHERS_TILE, SS_SLICEWISE, SS_BUTTERFLY = 0, 1, 2, 3, 4, 5
# Not a candidate: a bound. Each program takes SPLIT x its own slice's sum of squares for the
# row's (no other slice read, no exchange): the time any exchange of the slices' sums could at
# best reach. Its outputs are wrong wherever the slices' sums differ.
SS_OWN_ONLY_BOUND = 6


@triton.jit
def _slice_sums(
    h_ptr,
    res_ptr,
    base,
    mine,
    own,
    SLICE_G: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    N_GROUPS: tl.constexpr,
):
    """The row's per-slice sums of squares as a [SPLIT_P2] vector (slot k: slice k, padding 0):
    slot ``mine`` is ``own`` (this program's slice, in registers), the other slices are loaded
    (this program's own slice masked off: no memory traffic). Every program of a row gets the
    same bits in every slot: the same tile shape and the same reduction."""
    idx = tl.arange(0, SPLIT_P2)
    parts = tl.zeros([SPLIT_P2], tl.float32)
    for k in tl.static_range(SPLIT):
        offs, mask, _, _ = _group_tile(k * SLICE_G, SLICE_G, 128, 128, N_GROUPS, SLICE_G)
        t = _load_sum(h_ptr, res_ptr, base, offs, mask & (mine != k), "")
        parts = tl.where(idx == k, tl.where(mine == k, own, sum_sq(t)), parts)
    return parts


@triton.jit(do_not_specialize=["scale_st", "spin"])
def _split_sum_kernel(
    h_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    q_ptr,
    scale_ptr,
    part_ptr,
    cnt_ptr,
    eps,
    weight_offset,
    scale_st,
    spin,
    HIDDEN: tl.constexpr,
    ROW_G: tl.constexpr,
    SLICE_G: tl.constexpr,
    SLICE_N: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    MODE: tl.constexpr,
    LEAN: tl.constexpr,
    RE_CG: tl.constexpr,
    EARLY_RES: tl.constexpr,
    ERR_SLOT: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // 128
    pid = tl.program_id(0)
    row = pid // SPLIT
    mine = pid % SPLIT
    base = tl.cast(row, tl.int64) * HIDDEN
    # balanced slices (SLICE_N < SLICE_G): the tile's rows from SLICE_N are the next slice's
    offs, mask, g, gmask = _group_tile(mine * SLICE_N, SLICE_G, 128, 128, N_GROUPS, SLICE_N)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    s = _load_sum(h_ptr, res_ptr, base, offs, mask, "")
    if EARLY_RES:  # the residual stored before the row's sum of squares
        tl.store(res_out_ptr + base + offs, s.to(res_out_ptr.dtype.element_ty), mask=mask)
    if SPLIT == 1:  # the slice is the row
        ss = sum_sq(s)
    elif MODE == 0:  # today's kernel: the whole row again, as one masked tile
        ss = _row_sum_part(h_ptr, res_ptr, base, 0, ROW_G, N_GROUPS, ".cg" if RE_CG else "")
    elif MODE == 6:  # SS_OWN_ONLY_BOUND: no other slice, no exchange (wrong outputs; a bound)
        ss = sum_sq(s) * SPLIT
    elif MODE == 5:  # the other slices loaded without a branch, squares summed as a butterfly
        acc = row_squares(s, h_ptr, res_ptr, base, mine, 0, SPLIT_P2, SLICE_G, SLICE_N, SPLIT, 128, 128, N_GROUPS, True)
        ss = tl.sum(tl.sum(acc, axis=1), axis=0)
    elif MODE == 4:  # slice by slice into one slice-shaped tile (own from registers), one reduction
        acc = tl.zeros([SLICE_G, 128], tl.float32)
        for k in tl.static_range(SPLIT):
            if k == mine:
                x = s
            else:
                ko, km, _, _ = _group_tile(k * SLICE_G, SLICE_G, 128, 128, N_GROUPS, SLICE_G)
                x = _load_sum(h_ptr, res_ptr, base, ko, km, "")
            acc = tl.fma(x, x, acc)
        ss = tl.sum(tl.sum(acc, axis=1), axis=0)
    elif MODE == 3:  # the other slices as one masked row tile (own lanes masked off) + own
        ro, rm, rg, _ = _group_tile(0, ROW_G, 128, 128, N_GROUPS, ROW_G)
        t = _load_sum(h_ptr, res_ptr, base, ro, rm & ((rg // SLICE_G) != mine)[:, None], "")
        ss = sum_sq(t) + sum_sq(s)
    elif MODE == 1:  # the other slices only, summed slice by slice in slice order
        ss = tl.sum(_slice_sums(h_ptr, res_ptr, base, mine, sum_sq(s), SLICE_G, SPLIT, SPLIT_P2, N_GROUPS))
    else:  # exchange the slices' sums through global memory; bounded wait, else MODE 1
        own = sum_sq(s)
        slot = tl.cast(row, tl.int64) * SPLIT_P2
        tl.store(part_ptr + slot + mine, own)
        tl.debug_barrier()
        n = tl.atomic_add(cnt_ptr + 2 * row, 1, sem="acq_rel", scope="gpu") + 1
        tries = 0
        while (n < SPLIT) & (tries < spin):
            n = tl.atomic_add(cnt_ptr + 2 * row, 0, sem="acquire", scope="gpu")
            tries += 1
        if n >= SPLIT:
            idx = tl.arange(0, SPLIT_P2)
            parts = tl.load(part_ptr + slot + idx, mask=idx < SPLIT, other=0.0, cache_modifier=".cg")
        else:
            tl.atomic_add(cnt_ptr + ERR_SLOT, 1)
            parts = _slice_sums(h_ptr, res_ptr, base, mine, own, SLICE_G, SPLIT, SPLIT_P2, N_GROUPS)
        ss = tl.sum(parts)
        left = tl.atomic_add(cnt_ptr + 2 * row + 1, 1, sem="acq_rel", scope="gpu")
        if left == SPLIT - 1:  # the row's last program out: the counters back to 0 for the next call
            tl.atomic_xchg(cnt_ptr + 2 * row, 0)
            tl.atomic_xchg(cnt_ptr + 2 * row + 1, 0)
    _finish_row(
        s,
        w,
        ss,
        row,
        offs,
        mask,
        g,
        gmask,
        eps,
        weight_offset,
        res_out_ptr,
        q_ptr,
        scale_ptr,
        scale_st,
        HIDDEN,
        QUANT_LEAN if LEAN else QUANT_SIGN_FIX,
        not EARLY_RES,
        FP8_MAX,
    )


SPLIT_SUM_MAX_ROWS = 4096
SPLIT_SUM_MAX_SPLIT = 128  # programs per row the workspace has slots for (1-group slices of a 16384 row)
_split_ws: dict = {}


def split_sum_workspace(device):
    """(partials [rows x SPLIT_SUM_MAX_SPLIT] float32, counters [2 x rows + 1] int32, zeroed;
    the last word counts waits that gave up), one per device."""
    key = str(device)
    if key not in _split_ws:
        _split_ws[key] = (
            torch.zeros(SPLIT_SUM_MAX_ROWS * SPLIT_SUM_MAX_SPLIT, dtype=torch.float32, device=device),
            torch.zeros(2 * SPLIT_SUM_MAX_ROWS + 1, dtype=torch.int32, device=device),
        )
    return _split_ws[key]


def split_sum(
    h,
    residual,
    weight,
    eps,
    *,
    slice_groups: int,
    num_warps: int,
    mode: int,
    lean: bool = False,
    reread_cg: bool = False,
    balanced: bool = False,
    early_res: bool = False,
    programs: int = 0,
    spin: int = 1 << 20,
    weight_offset=1.0,
    quant_dtype=torch.float8_e4m3fn,
    outputs=None,
):
    """(q, scale, residual, None) of a split row (``slice_groups`` 128-groups per program;
    the padded row = one program per row) whose sum of squares is, with two programs or more
    per row: SS_REREAD, the whole row read again by every program (today's kernel; ``reread_cg``:
    those loads bypass L1); SS_OTHERS, only the other slices read, summed slice by slice;
    SS_EXCHANGE, the slices' sums exchanged through a workspace (each program waits for its
    row's others at most ``spin`` polls, else computes them as SS_OTHERS; the same bits either
    way); SS_OTHERS_TILE, the other slices as one masked row tile plus the own slice's sum
    (two reductions; a row's programs may differ in the sum's last bits); SS_SLICEWISE, the
    other slices read one slice-shaped tile at a time and their squares accumulated element by
    element into one tile in slice order (the own slice from registers), then one reduction
    (every program of a row: the same bits); SS_BUTTERFLY, the other slices loaded without a
    branch and the slices' squares summed element-wise as a butterfly (the local kernel's
    add_rmsnorm_quant.row_squares; the own slice from registers), then one reduction (every
    program of a row: the same bits). ``lean``: the quant as row_math.quant_tile (else as
    _quant_sign_fix, the same bytes). ``balanced``: the row's groups spread evenly over its
    programs (cdiv(groups, programs) each, in a tile of ``slice_groups`` rows; SS_REREAD and
    SS_BUTTERFLY only), instead of ``slice_groups`` each and the rest in the last.
    SS_OWN_ONLY_BOUND: a bound, not a candidate (outputs wrong: own slice's sum x SPLIT).
    ``early_res``: the residual stored right after the slice's loads, before the row's sum
    of squares (else with the other outputs after it). ``programs`` > 0: that many programs
    per row, balanced, each in a tile of the smallest power of two of groups that holds its
    slice (``slice_groups`` is then ignored)."""
    tokens, hidden = h.shape
    n_groups = hidden // 128
    row_g = triton.next_power_of_2(n_groups)
    if not 0 <= programs <= n_groups:
        raise ValueError(f"split_sum: programs must be 0 (from slice_groups) to {n_groups}, got {programs}")
    if programs:
        slice_groups, balanced = triton.next_power_of_2(triton.cdiv(n_groups, programs)), True
    split = programs or triton.cdiv(n_groups, slice_groups)
    if hidden % 128 or slice_groups & (slice_groups - 1) or slice_groups > row_g or tokens > SPLIT_SUM_MAX_ROWS:
        raise ValueError(f"split_sum: hidden {hidden}, slice_groups {slice_groups}, tokens {tokens}")
    split_p2 = triton.next_power_of_2(split)
    if balanced and mode not in (SS_REREAD, SS_BUTTERFLY):
        raise ValueError(f"split_sum: balanced slices are for SS_REREAD and SS_BUTTERFLY, got mode {mode}")
    slice_n = triton.cdiv(n_groups, split) if balanced else slice_groups
    parts, counters = split_sum_workspace(h.device)
    q, scale, res_out, _ = out = _outputs(h, quant_dtype, outputs)
    if tokens:
        _split_sum_kernel[(tokens * split,)](
            h,
            residual,
            weight,
            res_out,
            q,
            scale,
            parts,
            counters,
            float(eps),
            float(weight_offset),
            scale.stride(0),
            spin,
            HIDDEN=hidden,
            ROW_G=row_g,
            SLICE_G=slice_groups,
            SLICE_N=slice_n,
            SPLIT=split,
            SPLIT_P2=split_p2,
            MODE=mode,
            LEAN=lean,
            RE_CG=reread_cg,
            EARLY_RES=early_res,
            ERR_SLOT=2 * SPLIT_SUM_MAX_ROWS,
            FP8_MAX=float(torch.finfo(quant_dtype).max),
            num_warps=num_warps,
        )
    return out


def split_sum_gave_up(device) -> int:
    """Waits of SS_EXCHANGE that gave up so far on ``device`` (each then read the row itself)."""
    return int(split_sum_workspace(device)[1][-1].item())
