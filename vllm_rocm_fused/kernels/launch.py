"""Host-side helpers shared by the kernel launchers: tile shapes, warps, outputs, and the
preamble every row-kernel launcher starts with (``prepare_rows``).

torch + Triton only; no vLLM.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from .. import envs
from ..ops.backend_api import Outputs
from ..platform_info import fp8_max
from . import local_launch_table

try:  # Triton 3.4 on, NVIDIA: programmatic dependent launch (pdl_launch; the local kernel calls them)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # the local kernel is then compiled with PDL = False only
    gdc_launch_dependents = gdc_wait = None

# Largest row (groups rounded up to whole parts, x the group rounded up to a power of two)
# a program holds in registers: any multiple of 128 up to 16384 in 128-groups. (The local
# kernel's tile, the group count rounded up to a power of two, fits exactly when the parts
# do: the limit over gs is a power of two.)
MAX_TILE = 16384
# Parts a row's groups are split into (row_math.py): four cover every group count whose
# binary form has at most four ones (every multiple of 128 Qwen3.5 uses: 16, 20, 24, 32, 40
# groups ...); beyond, the last part is padded.
MAX_PARTS = 4


def row_parts(n_groups: int) -> tuple[int, int, int, int]:
    """``n_groups`` as at most MAX_PARTS powers of two, largest first, 0-padded to four:
    40 -> (32, 8, 0, 0). With more binary ones than parts, the last part is the rest rounded
    up to a power of two (its surplus groups are masked): 127 -> (64, 32, 16, 16)."""
    parts: list[int] = []
    rest = n_groups
    while rest:
        if len(parts) == MAX_PARTS - 1:
            parts.append(triton.next_power_of_2(rest))
            break
        top = 1 << (rest.bit_length() - 1)
        parts.append(top)
        rest -= top
    p0, p1, p2, p3 = parts + [0] * (MAX_PARTS - len(parts))
    return p0, p1, p2, p3


@dataclass(frozen=True)
class RowTile:
    """How a row of ``hidden`` elements is laid out: ``n_groups`` groups of ``group`` elements
    (each a tile row of ``gs`` lanes, ``group`` rounded up to a power of two), in the
    power-of-two parts ``parts`` of the multi-GPU kernels (row_math.py; the local kernel
    holds the groups as one tile of n_groups rounded up to a power of two instead)."""

    group: int  # elements per tile row (the quant group, or a norm-only width)
    gs: int  # group rounded up to a power of two
    n_groups: int
    parts: tuple[int, int, int, int]

    @property
    def elements(self) -> int:
        """Register lanes per row (= hidden unless a group or the last part is padded)."""
        return sum(self.parts) * self.gs

    @property
    def num_warps(self) -> int:
        """Warps of the multi-GPU kernels' norm-only launches: about one warp per 512 lanes
        (16 per thread), 4 to 16."""
        return min(16, max(4, _pow2_floor(self.elements // 512)))

    @property
    def quant_num_warps(self) -> int:
        """Warps of the one-shot kernels when they quantize: about one warp per 256 lanes
        (8 per thread), 4 to 16. The quant doubles the per-row tail, and more warps keep
        more of it in flight: at TP=2 on H200, 8 instead of 4 warps took hidden 2048 x 1024
        tokens from 37 to 26 us, 16 instead of 8 hidden 4096 x 8192 tokens from 468 to 253
        (benchmarks/results/h200_tp2_grid_sweep.json)."""
        return min(16, max(4, _pow2_floor(self.elements // 256)))

    def constexprs(self) -> dict:
        """The kernels' compile-time row layout arguments."""
        p0, p1, p2, p3 = self.parts
        return dict(GS=self.gs, GROUP=self.group, P0=p0, P1=p1, P2=p2, P3=p3)


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def row_tile(hidden: int, group: int) -> RowTile:
    n_groups = hidden // group
    return RowTile(group, triton.next_power_of_2(group), n_groups, row_parts(n_groups))


def tile_reason(hidden: int, group: int) -> str | None:
    """Why a row of ``hidden`` in groups of ``group`` does not fit a program's registers
    (None = it fits); the launchers' and the CUDA dispatch's shape checks start here."""
    lanes = row_tile(hidden, group).elements
    if lanes > MAX_TILE:
        return (
            f"a row of {hidden} in groups of {group} takes {lanes} register lanes, "
            f"more than the {MAX_TILE}-element register tile"
        )
    return None


def norm_tile(hidden: int) -> RowTile:
    """A tile for the norm-only kernels: rows of the largest power of two <= 128 that
    divides hidden (any multiple of 16 works without padding inside a tile row)."""
    width = 128
    while hidden % width:
        width //= 2
    return row_tile(hidden, width)


@dataclass(frozen=True)
class LocalLaunch:
    """Launch shape of the local add + RMSNorm + quant kernel (add_rmsnorm_quant.py)."""

    num_warps: int
    slice_groups: int  # groups per program: the row's group count rounded up to a power of two = one program per row
    measured: bool  # from local_launch_table.TABLE (else the default rule)


def local_launch(hidden: int, tokens: int, tile: RowTile) -> LocalLaunch:
    """The measured launch shape for ``tokens`` rows of ``hidden`` in 128-groups
    (local_launch_table.py: the first entry whose max_tokens >= tokens); for a hidden size
    or a group width the table does not have, one program per row with 4 warps up to 1024
    lanes, 8 up to 8192 (8 was the fastest one-program-per-row shape from 1024 tokens at
    every measured hidden size, benchmarks/results/h200_tp1_decode_explore.json) and 16
    above (at most 32 lanes per thread)."""
    row_g = triton.next_power_of_2(tile.n_groups)
    entries = local_launch_table.TABLE.get(hidden) if tile.group == 128 else None
    if entries:
        for max_tokens, warps, slice_groups in entries:
            if max_tokens is None or tokens <= max_tokens:
                return LocalLaunch(warps, min(slice_groups, row_g), True)
    lanes = row_g * tile.gs
    return LocalLaunch(4 if lanes <= 1024 else 8 if lanes <= 8192 else 16, row_g, False)


def pdl_launch(device: torch.device) -> bool:
    """Whether the local kernel is launched on ``device`` with programmatic dependent launch
    (PDL): an NVIDIA GPU of compute capability 9.0 or more (Hopper on), a Triton with
    ``griddepcontrol`` (3.4 on), not the Triton interpreter, and VLLM_ROCM_FUSED_DISABLE_PDL
    not set. With PDL the GPU may start the kernel's programs while the kernel before it in
    the stream is still finishing; the kernel's first instruction waits until that kernel's
    writes are visible (``griddepcontrol.wait``), so its loads and stores are ordered as
    without PDL, and what is saved is part of the launch gap: on an H200 at 1-64 tokens,
    0.2-0.66 us a call after a GEMM (23 of 24 points) and 0.3-0.6 back to back
    (benchmarks/results/h200_tp1_split_sum_explore12.json, 13.json)."""
    if device.type != "cuda" or torch.version.hip is not None or envs.pdl_disabled():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" or not _gdc_available():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _gdc_available() -> bool:
    return gdc_wait is not None and gdc_launch_dependents is not None


def local_rule() -> str:
    """The local kernel's launch rule in words (doctor's TP=1 line), from the measured table."""
    head = "one fused add + RMSNorm + quant kernel"
    pdl = (
        "; launched without programmatic dependent launch (VLLM_ROCM_FUSED_DISABLE_PDL)"
        if envs.pdl_disabled()
        else "; launched with programmatic dependent launch on NVIDIA Hopper and newer"
    )
    table = local_launch_table.TABLE
    if not table:
        return head + ", one program per token row (no measured launch table)" + pdl
    split = []
    for hidden, entries in sorted(table.items()):
        row_g = triton.next_power_of_2(hidden // 128)
        up_to = [m for m, _, g in entries if g < row_g and m is not None]
        if up_to:
            split.append(f"{hidden} up to {max(up_to)}")
    text = head + "; at small batches a token row is split over several programs (each computes the row's"
    text += " sum of squares, then its slice's norm and quant), above one program per row; measured on "
    text += f"{local_launch_table.GPU}: split at hidden " + (", ".join(split) if split else "none") + " tokens"
    return text + "; other hidden sizes: one program per row" + pdl


def empty_outputs(
    tokens: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    group_size: int,
    quantize: bool,
    emit_bf16: bool,
    scale_layout: str,
    quant_dtype: torch.dtype,
) -> Outputs:
    """(q, scale, residual, normed) as the op returns them (None where not asked).
    ``normed`` is allocated when emit_bf16 or not quantize (then it is the output)."""
    residual = torch.empty((tokens, hidden), dtype=dtype, device=device)
    normed = torch.empty_like(residual) if (emit_bf16 or not quantize) else None
    if not quantize:
        return None, None, residual, normed
    q = torch.empty((tokens, hidden), dtype=quant_dtype, device=device)
    groups = hidden // group_size
    if scale_layout == "col":
        scale = torch.empty((groups, tokens), dtype=torch.float32, device=device).t()
    else:
        scale = torch.empty((tokens, groups), dtype=torch.float32, device=device)
    return q, scale, residual, normed


@dataclass(frozen=True)
class RowLaunch:
    """What a row-kernel launcher passes its kernel besides the inputs."""

    outputs: Outputs  # (q, scale, residual, normed), None where not asked
    tile: RowTile  # the quant groups' tile, or the norm-only tile without quant
    scale_st: int  # scale strides (token, group); 0 without quant
    scale_sg: int
    fp8_max: float  # the quant dtype's largest value; 1.0 without quant


def prepare_rows(
    tokens: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    group_size: int,
    quantize: bool,
    emit_bf16: bool,
    scale_layout: str,
    quant_dtype: torch.dtype,
    outputs: Outputs | None = None,
) -> RowLaunch:
    """The launchers' common preamble: ``outputs`` (allocated by ``empty_outputs`` when None),
    the row's tile, the scale's strides and the FP8 max. Checks nothing: each launcher checks
    the shape against its own limits."""
    if outputs is None:
        outputs = empty_outputs(
            tokens,
            hidden,
            dtype,
            device,
            group_size=group_size,
            quantize=quantize,
            emit_bf16=emit_bf16,
            scale_layout=scale_layout,
            quant_dtype=quant_dtype,
        )
    scale = outputs[1]
    if not quantize or scale is None:
        return RowLaunch(outputs, norm_tile(hidden), 0, 0, 1.0)
    return RowLaunch(outputs, row_tile(hidden, group_size), scale.stride(0), scale.stride(1), fp8_max(quant_dtype))


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
