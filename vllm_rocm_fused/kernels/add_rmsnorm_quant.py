"""Fused residual add + RMSNorm + per-group dynamic FP8 quant on one GPU (no all-reduce).

Algorithm: a token row (already summed input ``h``, any float dtype), its residual and the
weight are held as one masked [ROW_G, GS] tile of groups (ROW_G = the row's group count
rounded up to a power of two, GS = the group rounded up to a power of two); s = h + residual
(float32), r = round(s), normed = round(s * rsqrt(mean(s^2) + eps) * (w + offset)), and per
group scale = max(amax, 1e-10) / fp8_max, q = clamp(normed / scale) (row_math.py).

A row may be split over SPLIT programs (the launch table's slice size: SPLIT > 1 at decode
sizes). Program p takes row p // SPLIT and its SLICE_G groups from (p % SPLIT) * SLICE_G:
it loads its slice (h, residual, weight), gets the whole row's sum of squares, then stores
the slice's residual, norm and quant. The sum of squares (every program of a row gets the
same bits):
  - SPLIT = 1: the slice is the row; nothing is read twice.
  - SPLIT 2-4 (BUTTERFLY_MAX_SPLIT): ``row_squares``: the row's other slices loaded from L2
    as slice-shaped tiles, every load issued before the first square, their squares and the
    own slice's summed element by element as a butterfly over the slices, then one
    reduction of that slice-shaped tile.
  - SPLIT > 4: the whole row read again from L2 as one masked [ROW_G, GS] tile and reduced.
Why split: at 1-64 tokens one program per row leaves most SMs idle and each row's tail
(norm, quant, stores) runs on one SM; spread over SPLIT programs it runs SPLIT times
shorter, at the price of each program reading the rest of the row once more
(benchmarks/results/h200_tp1_decode_explore.json: at hidden 5120 and 1 token, 2.14 us in 20
programs against 2.68 us in one). Why two forms: on an H200, at the same launch shapes, the
butterfly was 0.03-0.10 us faster on average than the re-read at 2-4 slices, mixed at 8,
and 0.14-1.8 us slower on average at 5-7 and 10 or more (its slices' separate loads, and the
masked slots up to the next power of two: benchmarks/results/h200_tp1_split_sum_explore4.json;
benchmarks/NOTES.md, issue 24, for the other ways of sharing the sum that were measured).

Memory traffic per row: reads h, residual (H elements each; SPLIT > 1: SPLIT times with the
butterfly, SPLIT + 1 with the re-read; the repeats from L2) and the weight (cache resident);
writes residual (H), q (H bytes), scale (H / group_size floats), normed (H, only when asked).
One pass: the unfused chain (add+norm kernel, then quant kernel) re-reads normed and writes
it once more.

Launch shape (warps, slice groups): measured per hidden size and token count
(launch.local_launch, local_launch_table.py).

Limits: hidden % group_size == 0 and ROW_G x GS <= 16384 elements (launch.MAX_TILE: any
multiple of 128 up to 16384 in 128-groups); any group_size (padded inside the tile);
x/residual contiguous [T, H]; scale in either layout (strides passed). With
``quantize=False`` it is the fused add + RMSNorm (the unfused chain's first kernel).

Graph safety: plain loads/stores, no host sync; outputs come from the caller or the
caching allocator. Used at TP=1 and after an NCCL all-reduce (the large-token path).

Launch: with programmatic dependent launch where launch.pdl_launch allows it (NVIDIA Hopper
on): the kernel may start while the previous kernel in the stream finishes, waits for that
kernel's writes before its first load (``gdc_wait``), and lets the next kernel start early
(``gdc_launch_dependents``; a kernel so started waits for this one's writes itself).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Outputs, gdc_launch_dependents, gdc_wait, local_launch, pdl_launch, prepare_rows, tile_reason
from .row_math import finish_part, inv_rms, sum_sq


@triton.jit
def _group_tile(
    g0, NG: tl.constexpr, GS: tl.constexpr, GROUP: tl.constexpr, N_GROUPS: tl.constexpr, N_VALID: tl.constexpr
):
    """The first N_VALID of NG groups of a row from group g0: (offsets in the row [NG, GS],
    their mask, the groups' indices [NG], their mask). Lanes past GROUP, N_VALID or N_GROUPS
    are masked (N_VALID = NG: no lane is masked for it, the test compiled out)."""
    g = g0 + tl.arange(0, NG)
    j = tl.arange(0, GS)[None, :]
    offs = g[:, None] * GROUP + j
    gmask = g < N_GROUPS
    if N_VALID < NG:
        gmask &= tl.arange(0, NG) < N_VALID
    mask = gmask[:, None] & (j < GROUP)
    return offs, mask, g, gmask


@triton.jit
def _load_sum(h_ptr, res_ptr, base, offs, mask, HAS_RES: tl.constexpr):
    """s = float32 h + residual over a tile (masked lanes 0)."""
    s = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return s


# Largest SPLIT whose programs sum the row's squares with row_squares (above: the row read
# again as one tile; module docstring).
BUTTERFLY_MAX_SPLIT: tl.constexpr = tl.constexpr(4)


@triton.jit
def row_squares(
    s,
    h_ptr,
    res_ptr,
    base,
    mine,
    D: tl.constexpr,
    N: tl.constexpr,
    SLICE_G: tl.constexpr,
    SLICE_N: tl.constexpr,
    SPLIT: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    N_GROUPS: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """Element-wise sum of the squares of the N slices ``mine ^ D`` .. ``mine ^ (D + N - 1)``
    of a row (N a power of two, D a multiple of N: the aligned block of N slices holding
    slice ``mine ^ D``) as one slice-shaped tile; call with D = 0 and N = SPLIT rounded up to
    a power of two for the whole row. Slice k is the SLICE_N groups from group k * SLICE_N,
    held as a [SLICE_G, GS] tile (SLICE_N <= SLICE_G; the local kernel's slices: SLICE_N =
    SLICE_G). Slice ``mine`` (this program's, D = 0) is ``s`` from registers; the others are
    loaded (slices past SPLIT: masked, no traffic), with no branch, so every load is issued
    before the first square.

    A block's value is (its half holding ``mine ^ D``) + (the other half): for every program
    of the row the same two halves, in an order that depends on the program, and an addition
    of two rounded float32 values commutes, so every program of the row gets the same bits
    (by induction from the squares, which are the same values in every program). A square
    is an explicit fma(x, x, +0), x * x rounded once, so that the compiler cannot contract it
    with the addition above it into a multiply-add, whose operand order would differ between
    the programs."""
    if N == 1:
        if D == 0:
            x = s
        else:
            k = mine ^ D
            offs, mask, _, _ = _group_tile(k * SLICE_N, SLICE_G, GS, GROUP, N_GROUPS, SLICE_N)
            x = _load_sum(h_ptr, res_ptr, base, offs, mask & (k < SPLIT), HAS_RES)
        return tl.fma(x, x, 0.0)
    else:
        half: tl.constexpr = N // 2
        a = row_squares(s, h_ptr, res_ptr, base, mine, D, half, SLICE_G, SLICE_N, SPLIT, GS, GROUP, N_GROUPS, HAS_RES)
        b = row_squares(
            s, h_ptr, res_ptr, base, mine, D + half, half, SLICE_G, SLICE_N, SPLIT, GS, GROUP, N_GROUPS, HAS_RES
        )
        return a + b


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
    SPLIT_P2: tl.constexpr,
    HAS_RES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // GROUP
    if PDL:  # launched with PDL: nothing is read or written before the previous kernel's writes are visible
        gdc_wait()
        gdc_launch_dependents()  # the next kernel may start; it waits for this one's writes itself
    pid = tl.program_id(0)
    row = pid // SPLIT
    mine = pid % SPLIT
    base = tl.cast(row, tl.int64) * HIDDEN
    # this program's slice first: its loads are in flight before the row's reduction
    offs, mask, g, gmask = _group_tile(mine * SLICE_G, SLICE_G, GS, GROUP, N_GROUPS, SLICE_G)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    s = _load_sum(h_ptr, res_ptr, base, offs, mask, HAS_RES)
    if SPLIT == 1:  # the slice is the row
        ss = sum_sq(s)
    elif SPLIT <= BUTTERFLY_MAX_SPLIT:
        squares = row_squares(
            s, h_ptr, res_ptr, base, mine, 0, SPLIT_P2, SLICE_G, SLICE_G, SPLIT, GS, GROUP, N_GROUPS, HAS_RES
        )
        ss = tl.sum(tl.sum(squares, axis=1), axis=0)
    else:  # the whole row again, as one masked tile
        row_offs, row_mask, _, _ = _group_tile(0, ROW_G, GS, GROUP, N_GROUPS, ROW_G)
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
    pdl = pdl_launch(h.device)
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
        SPLIT_P2=triton.next_power_of_2(split),
        HAS_RES=residual is not None,
        QUANT=quantize,
        EMIT=normed is not None,
        FP8_MAX=run.fp8_max,
        PDL=pdl,
        num_warps=num_warps or shape.num_warps,
        **({"launch_pdl": True} if pdl else {}),
    )
    return run.outputs
