"""Per-group (1 x group_size) dynamic symmetric FP8 quant of a [T, H] activation.

Algorithm: program (t, c) loads groups [c * CHUNK, (c + 1) * CHUNK) of row t as a
[CHUNK, GS] tile (GS = group_size rounded up to a power of two, padding masked; CHUNK the
largest power of two dividing the group count, at most 8192 / GS, so no tile is padded:
hidden 5120 in 128-groups is 5 programs of 8 groups per row), then
scale = max(amax, 1e-10) / fp8_max and q = clamp(x / scale) per group, as
ops/reference.group_quant_reference does (NaN-propagating amax, IEEE divisions).

Memory traffic: reads x once (2 bytes/element for bf16), writes q (1 byte/element) and
one float32 scale per group. This is the second kernel of the 2-kernel path and the
third kernel of the unfused chain in the benchmark.

Limits: any group_size dividing H; x contiguous [T, H]; scale in either layout.
Graph safety: plain loads/stores only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..platform_info import fp8_max
from .row_math import quant_tile

# Most elements a program holds.
_TILE = 8192


@triton.jit(do_not_specialize=["scale_st", "scale_sg"])
def _group_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    hidden,
    n_groups,
    scale_st,
    scale_sg,
    CHUNK: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    j = tl.arange(0, GS)
    offs = g[:, None] * GROUP + j[None, :]
    mask = (g[:, None] < n_groups) & (j[None, :] < GROUP)
    base = tl.cast(row, tl.int64) * hidden
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
    q, scale = quant_tile(x, FP8_MAX)
    tl.store(q_ptr + base + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g * scale_sg, scale, mask=g < n_groups)


def group_quant(
    x: torch.Tensor,
    *,
    group_size: int = 128,
    scale_layout: str = "row",
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
):
    """(q [T, H] quant_dtype, scale [T, H // group_size] float32) of a contiguous [T, H] x."""
    tokens, hidden = x.shape
    if hidden % group_size:
        raise ValueError(f"hidden {hidden} is not a multiple of group_size {group_size}")
    groups = hidden // group_size
    q = torch.empty((tokens, hidden), dtype=quant_dtype, device=x.device)
    if scale_layout == "col":
        scale = torch.empty((groups, tokens), dtype=torch.float32, device=x.device).t()
    else:
        scale = torch.empty((tokens, groups), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return q, scale
    gs = triton.next_power_of_2(group_size)
    chunk = min(groups & -groups, max(1, _TILE // gs))
    _group_quant_kernel[(tokens, triton.cdiv(groups, chunk))](
        x,
        q,
        scale,
        hidden,
        groups,
        scale.stride(0),
        scale.stride(1),
        CHUNK=chunk,
        GS=gs,
        GROUP=group_size,
        FP8_MAX=fp8_max(quant_dtype),
        num_warps=4 if chunk * gs <= 2048 else 8,
    )
    return q, scale
