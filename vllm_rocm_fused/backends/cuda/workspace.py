"""The symmetric-memory workspace of one communicator: allocation, rendezvous, layout.

One ``torch.distributed._symmetric_memory`` allocation per communicator (P2P peer
mappings only; multicast is never requested), carved into 256-byte aligned regions:

    flags      int32 [max_grid * W]          barrier flags peers write into
    ll         2 halves x W slots x ll_words  LL receive buffer (int64 words: data + flag)
    stage      2 halves x stage_bytes         input staging (call parity picks the half)
    out_q      2 x out_elems bytes            two-shot outputs of the owned rows
    out_res    2 x out_elems x 2 bytes
    out_normed 2 x out_elems x 2 bytes
    out_scale  2 x out_elems / 16 x 4 bytes

plus a local int32 control tensor (kernels/row_math.CTL_*). Sizes are fixed at creation
from the declared max token count (VLLM_ROCM_FUSED_MAX_TOKENS) and the dispatch table, so
creation happens once, eagerly (the first non-capturing call on the group, e.g. vLLM's
profile or warm-up run), never under CUDA-graph capture. Creation is collective: every
rank of the group must make the same calls, which the op's contract already requires.
A workspace that has to grow is replaced, the old one kept alive for graphs that captured it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ...kernels.launch import SymmPeers
from ...log import get_logger
from . import dispatch

logger = get_logger("cuda.workspace")

ALIGN = 256
MAX_GRID = 1024  # upper bound on programs per launch (flags are sized for it)
_ELEM = 2  # staging element bytes (bf16/fp16)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Layout:
    world_size: int
    max_grid: int
    stage_bytes: int  # per half
    out_elems: int  # per half; 0 = no two-shot region
    ll_words: int  # per half and source rank; 0 = no LL region
    flags_off: int
    ll_off: int
    stage_off: int
    out_q_off: int
    out_res_off: int
    out_normed_off: int
    out_scale_off: int
    total_bytes: int

    def stage_elems(self, elem_bytes: int = _ELEM) -> int:
        return self.stage_bytes // elem_bytes


def layout(
    world_size: int, stage_bytes: int, *, max_grid: int, with_twoshot: bool, ll_bytes: int = 0, max_hidden: int = 16384
) -> Layout:
    """Offsets and total size. The two-shot region holds ceil(T / W) rows for any T whose
    input fits the staging half: stage_elems / W + max_hidden elements. The LL region
    takes inputs of up to ll_bytes (16-bit elements, two per 8-byte word)."""
    if not 2 <= world_size <= 8:
        raise ValueError(f"world_size must be in [2, 8], got {world_size}")
    if not 1 <= max_grid <= MAX_GRID:
        raise ValueError(f"max_grid must be in [1, {MAX_GRID}], got {max_grid}")
    stage_bytes = _align(max(stage_bytes, ALIGN))
    out_elems = _align(stage_bytes // _ELEM // world_size + max_hidden) if with_twoshot else 0
    ll_words = _align(ll_bytes) // 4 if ll_bytes > 0 else 0
    off = 0
    flags_off = off
    off += _align(max_grid * world_size * 4)
    ll_off = off
    off += 2 * world_size * ll_words * 8
    stage_off = off
    off += 2 * stage_bytes
    out_q_off = off
    off += 2 * out_elems
    out_res_off = off
    off += 2 * out_elems * _ELEM
    out_normed_off = off
    off += 2 * out_elems * _ELEM
    out_scale_off = off
    off += _align(2 * (out_elems // 16) * 4)
    return Layout(
        world_size,
        max_grid,
        stage_bytes,
        out_elems,
        ll_words,
        flags_off,
        ll_off,
        stage_off,
        out_q_off,
        out_res_off,
        out_normed_off,
        out_scale_off,
        off,
    )


def stage_bytes_for(
    *, world_size: int, hidden: int, elem_bytes: int, max_tokens: int, symm_max_bytes: int, needed_bytes: int = 0
) -> int:
    """Staging half size: what the dispatch can route through symmetric memory, capped by
    the declared max token count, and at least what the current call needs."""
    want = min(symm_max_bytes, max_tokens * hidden * elem_bytes)
    return _align(max(want, needed_bytes, hidden * elem_bytes))


@dataclass(frozen=True)
class WorkspaceSize:
    """What a workspace is created with: bytes per staging half, a two-shot output region or
    not, and the largest input (bytes) its LL region takes."""

    stage_bytes: int
    with_twoshot: bool
    ll_bytes: int

    def fits_in(self, lay: Layout) -> bool:
        """A workspace laid out as ``lay`` holds all of this."""
        return (
            lay.stage_bytes >= self.stage_bytes
            and (lay.out_elems > 0 or not self.with_twoshot)
            and 4 * lay.ll_words >= self.ll_bytes
        )

    def grown_over(self, lay: Layout) -> WorkspaceSize:
        """This, and at least everything ``lay`` had (a replacement workspace never shrinks)."""
        return WorkspaceSize(
            max(self.stage_bytes, lay.stage_bytes),
            self.with_twoshot or lay.out_elems > 0,
            max(self.ll_bytes, 4 * lay.ll_words),
        )

    def layout(self, world_size: int, *, max_grid: int) -> Layout:
        return layout(
            world_size, self.stage_bytes, max_grid=max_grid, with_twoshot=self.with_twoshot, ll_bytes=self.ll_bytes
        )


def size_for_call(*, world_size: int, hidden: int, elem_bytes: int, input_bytes: int, max_tokens: int) -> WorkspaceSize:
    """The workspace a call of ``input_bytes`` wants: room for every input the dispatch table
    sends through symmetric memory at this world size, capped by the declared max token count
    (VLLM_ROCM_FUSED_MAX_TOKENS), and at least this call's input when the table sends it there;
    a two-shot region where the table dispatches two-shot."""
    symm_max = dispatch.symm_max_bytes(world_size)
    stage = stage_bytes_for(
        world_size=world_size,
        hidden=hidden,
        elem_bytes=elem_bytes,
        max_tokens=max_tokens,
        symm_max_bytes=symm_max,
        needed_bytes=input_bytes if input_bytes <= symm_max else 0,
    )
    return WorkspaceSize(
        stage_bytes=stage,
        with_twoshot=dispatch.TWOSHOT_MAX_BYTES.get(world_size, 0) > 0,
        ll_bytes=min(dispatch.ll_max_bytes(world_size), max_tokens * hidden * elem_bytes),
    )


class SymmWorkspace:
    """A rendezvoused symmetric buffer and its per-dtype peer views."""

    def __init__(self, group, device: torch.device, lay: Layout, rank: int, buf, handle) -> None:
        self.group = group
        self.device = device
        self.layout = lay
        self.rank = rank
        self.world_size = lay.world_size
        self._buf = buf
        self._handle = handle
        self.ctl = torch.zeros(8 + lay.max_grid, dtype=torch.int32, device=device)
        self._peers: dict[torch.dtype, SymmPeers] = {}

    @classmethod
    def create(
        cls,
        group,
        device: torch.device,
        *,
        stage_bytes: int,
        with_twoshot: bool,
        ll_bytes: int = 0,
        blocks_per_sm: int = 1,
    ) -> "SymmWorkspace":
        """Collective: allocate, rendezvous, zero the flags and the LL region, agree on
        success and grid size. Raises RuntimeError (on every rank alike) if any rank failed.

        blocks_per_sm: the launch cap is this many programs per SM. The backend keeps 1, so
        every program of a launch is co-resident and the per-block cross-GPU barrier cannot
        wait on a program that has not started; more is for measurements only
        (benchmarks/sweep_grid.py), where progress then rests on the hardware starting
        blocks in index order."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        rank = dist.get_rank(group)
        world_size = dist.get_world_size(group)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        lay = layout(
            world_size,
            stage_bytes,
            max_grid=min(blocks_per_sm * sms, MAX_GRID),
            with_twoshot=with_twoshot,
            ll_bytes=ll_bytes,
        )
        error = None
        buf = handle = None
        try:
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    symm_mem.enable_symm_mem_for_group(group.group_name)
            buf = symm_mem.empty(lay.total_bytes, dtype=torch.uint8, device=device)
            handle = symm_mem.rendezvous(buf, group)
            buf[lay.flags_off : lay.stage_off].zero_()
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {e}"
        # One collective both agrees on success and orders every rank's zeroing before
        # any peer's first barrier write.
        status = torch.tensor([0 if error is None else 1, lay.max_grid], dtype=torch.int64, device=device)
        dist.all_reduce(status[:1], op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(status[1:], op=dist.ReduceOp.MIN, group=group)
        failed, grid = (int(v) for v in status.tolist())
        if failed:
            raise RuntimeError(error or "symmetric memory setup failed on another rank")
        if grid != lay.max_grid:  # a smaller grid only shrinks the (already zeroed) flag region
            lay = layout(world_size, lay.stage_bytes, max_grid=grid, with_twoshot=with_twoshot, ll_bytes=ll_bytes)
        logger.info(
            "vllm-rocm-fused: symmetric workspace of %.1f MiB on %s (TP=%d, %d staging bytes per half, "
            "LL inputs up to %d bytes%s)",
            lay.total_bytes / 2**20,
            device,
            world_size,
            lay.stage_bytes,
            4 * lay.ll_words,
            ", two-shot region" if with_twoshot else "",
        )
        return cls(group, device, lay, rank, buf, handle)

    def _views(self, offset: int, count: int, dtype: torch.dtype) -> tuple:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return tuple(self._handle.get_buffer(p, (count,), dtype, offset // itemsize) for p in range(self.world_size))

    def peers(self, dtype: torch.dtype) -> SymmPeers:
        """The kernels' view of this workspace for inputs of ``dtype`` (bf16/fp16)."""
        peers = self._peers.get(dtype)
        if peers is None:
            lay = self.layout
            stage_elems = lay.stage_elems()
            two = lay.out_elems > 0
            peers = SymmPeers(
                rank=self.rank,
                world_size=self.world_size,
                stage=self._views(lay.stage_off, 2 * stage_elems, dtype),
                flags=self._views(lay.flags_off, lay.max_grid * self.world_size, torch.int32),
                ctl=self.ctl,
                stage_cap=stage_elems,
                max_grid=lay.max_grid,
                out_q=self._views(lay.out_q_off, 2 * lay.out_elems, torch.float8_e4m3fn) if two else None,
                out_res=self._views(lay.out_res_off, 2 * lay.out_elems, dtype) if two else None,
                out_normed=self._views(lay.out_normed_off, 2 * lay.out_elems, dtype) if two else None,
                out_scale=self._views(lay.out_scale_off, 2 * (lay.out_elems // 16), torch.float32) if two else None,
                out_cap=lay.out_elems,
                ll=self._views(lay.ll_off, 2 * self.world_size * lay.ll_words, torch.int64) if lay.ll_words else None,
                ll_cap=lay.ll_words,
            )
            self._peers[dtype] = peers
        return peers

    def barrier_errors(self) -> int:
        """Barrier waits that gave up so far (syncs; for tests and benchmarks)."""
        return int(self.ctl[2].item())
