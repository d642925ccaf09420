"""Host-side helpers shared by the kernel launchers: tile shapes, warps, outputs.

torch + Triton only; no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..platform_info import fp8_max

# Largest row tile (NG_P2 * GS elements) a program holds in registers: hidden sizes up
# to 16384 with 128-groups (Qwen3.5: 2048, 4096, 5120).
MAX_TILE = 16384


@dataclass(frozen=True)
class RowTile:
    """How a row of ``hidden`` elements is laid out as a [ng_p2, gs] tile."""

    group: int  # elements per tile row (the quant group, or a norm-only width)
    gs: int  # group rounded up to a power of two
    n_groups: int
    ng_p2: int

    @property
    def elements(self) -> int:
        return self.ng_p2 * self.gs

    @property
    def num_warps(self) -> int:
        return 4 if self.elements <= 2048 else (8 if self.elements <= 8192 else 16)

    @property
    def quant_num_warps(self) -> int:
        """Warps of the one-shot kernels when they quantize: one warp per 256 elements
        (8 per thread), 4 to 16. The quant doubles the per-row tail, and more warps keep
        more of it in flight: at TP=2 on H200, 8 instead of 4 warps took hidden 2048 x 1024
        tokens from 37 to 26 us, 16 instead of 8 hidden 4096 x 8192 tokens from 468 to 253
        (benchmarks/results/h200_tp2_grid_sweep.json)."""
        return min(16, max(4, self.elements // 256))


def row_tile(hidden: int, group: int) -> RowTile:
    gs = triton.next_power_of_2(group)
    n_groups = hidden // group
    return RowTile(group, gs, n_groups, triton.next_power_of_2(n_groups))


def tile_reason(hidden: int, group: int) -> str | None:
    """Why a row of ``hidden`` in groups of ``group`` does not fit a program's register tile
    (None = it fits); every fused kernel's ``fits`` starts here."""
    if row_tile(hidden, group).elements > MAX_TILE:
        return f"a row of {hidden} in groups of {group} exceeds the {MAX_TILE}-element register tile"
    return None


def norm_tile(hidden: int) -> RowTile:
    """A tile for the norm-only kernels: rows of the largest power of two <= 128 that
    divides hidden (any multiple of 16 works without padding inside a tile row)."""
    width = 128
    while hidden % width:
        width //= 2
    return row_tile(hidden, width)


def scale_strides(scale: torch.Tensor) -> tuple[int, int]:
    return scale.stride(0), scale.stride(1)


def empty_outputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, *,
                  group_size: int, quantize: bool, emit_normed: bool, scale_layout: str,
                  quant_dtype: torch.dtype):
    """(q, scale, residual, normed) as the op returns them (None where not asked).
    ``normed`` is allocated when emit_normed or not quantize (then it is the output)."""
    residual = torch.empty((tokens, hidden), dtype=dtype, device=device)
    normed = torch.empty_like(residual) if (emit_normed or not quantize) else None
    if not quantize:
        return None, None, residual, normed
    q = torch.empty((tokens, hidden), dtype=quant_dtype, device=device)
    groups = hidden // group_size
    if scale_layout == "col":
        scale = torch.empty((groups, tokens), dtype=torch.float32, device=device).t()
    else:
        scale = torch.empty((tokens, groups), dtype=torch.float32, device=device)
    return q, scale, residual, normed


def quant_constants(quant_dtype: torch.dtype) -> float:
    return fp8_max(quant_dtype)


@dataclass(frozen=True)
class SymmPeers:
    """A symmetric workspace as the multi-GPU kernels take it: per-rank views of every
    rank's buffer regions (index = rank), this rank's control tensor, the capacities.
    Built by the CUDA backend's workspace, or by tests that emulate ranks on one device.

    stage:   W flat tensors of 2 * stage_cap elements (x dtype): the input staging, two halves
    flags:   W int32 tensors of max_grid * W barrier flags
    ctl:     local int32 control words (row_math.CTL_*), max_grid epochs after them
    out_*:   two-shot only: W flat tensors, 2 * out_cap elements each (q: fp8, res/normed:
             x dtype) and 2 * (out_cap // 16) float32 scales; None when not allocated
    ll:      LL kernel only: W int64 tensors of 2 halves x W source slots x ll_cap words
             (a word carries two 16-bit elements and a flag); None when not allocated
    """

    rank: int
    world_size: int
    stage: tuple
    flags: tuple
    ctl: torch.Tensor
    stage_cap: int
    max_grid: int
    out_q: tuple | None = None
    out_res: tuple | None = None
    out_normed: tuple | None = None
    out_scale: tuple | None = None
    out_cap: int = 0
    ll: tuple | None = None
    ll_cap: int = 0

    @property
    def scale_cap(self) -> int:
        return self.out_cap // 16

    def grid(self, rows: int) -> int:
        """Programs for a launch over ``rows`` rows: at most max_grid (see the workspace)."""
        return max(1, min(rows, self.max_grid))
