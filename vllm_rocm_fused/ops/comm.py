"""Communicators: who the fused op sums over.

The torch.library op cannot take a ProcessGroup (torch.compile traces strings,
not groups), so callers register a ``Communicator`` under a name and pass the
name. Two kinds exist:

* ``ProcessGroupCommunicator`` wraps a torch.distributed group (the functional
  op's ``group=`` argument). Its portable all-reduce sums in float32.
* Glue code (the vLLM CustomOp) registers its own subclass that reduces through
  vLLM's TP group and carries handles the fast backends need (``extras``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist


class Communicator:
    """A group of ranks the fused op all-reduces over."""

    name: str
    world_size: int
    rank: int
    #: True for a stand-in that describes a group without creating it (doctor's):
    #: backends plan for it as for a ready group, and nothing ever runs on it.
    hypothetical: bool = False

    def __init__(self, name: str, world_size: int, rank: int) -> None:
        self.name = name
        self.world_size = world_size
        self.rank = rank
        # Backend-specific handles (symmetric-memory workspaces, aiter custom
        # all-reduce objects, ...), filled lazily by the backends themselves.
        self.extras: dict[str, Any] = {}

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Out-of-place sum of ``x`` over the group (the portable path's reduce)."""
        raise NotImplementedError

    def agree_max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of every rank's ``values`` (a handful of integers),
        returned on every rank: how the ranks agree on a path (ops.backends) and on the
        self-check's verdict. A small host-side collective; never under graph capture."""
        raise NotImplementedError(f"{type(self).__name__} cannot agree across ranks")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, world_size={self.world_size}, rank={self.rank})"


def _group_key(group: dist.ProcessGroup) -> str:
    """The registry name of a process group's communicator."""
    return f"pg:{group.group_name}"


class ProcessGroupCommunicator(Communicator):
    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__(
            name=_group_key(group),
            world_size=dist.get_world_size(group),
            rank=dist.get_rank(group),
        )
        self._group = group

    @property
    def process_group(self) -> dist.ProcessGroup:
        return self._group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32, copy=True)
        dist.all_reduce(h, op=dist.ReduceOp.SUM, group=self._group)
        return h

    def agree_max(self, values: list[int]) -> list[int]:
        return group_max(self._group, values)


def group_max(group: dist.ProcessGroup, values: list[int]) -> list[int]:
    """Element-wise max of ``values`` over ``group``: on the CPU for a gloo group, else
    on the current GPU (NCCL takes device tensors only; the .tolist() is a sync, which
    the callers accept: they agree on rare events only)."""
    device = "cpu" if "gloo" in str(dist.get_backend(group)).lower() else _current_device()
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


_registry: dict[str, Communicator] = {}
_lock = threading.Lock()


def register_communicator(comm: Communicator) -> str:
    with _lock:
        _registry[comm.name] = comm
    return comm.name


def get_communicator(name: str) -> Communicator:
    try:
        return _registry[name]
    except KeyError:
        raise KeyError(f"no communicator registered under {name!r}") from None


def forget_group(group: dist.ProcessGroup) -> None:
    """Drop the registered communicator of ``group``: call it before
    ``destroy_process_group``, so that nothing here keeps the destroyed group (and its
    gloo threads) alive until the interpreter exits, where tearing it down can abort."""
    name = _group_key(group)
    with _lock:
        if _is_communicator_of(_registry.get(name), group):
            del _registry[name]


def _is_communicator_of(comm: Communicator | None, group: dist.ProcessGroup) -> bool:
    """Whether ``comm`` (a registry entry) is ``group``'s own communicator: a destroyed
    group's name can be reused by a new group."""
    return isinstance(comm, ProcessGroupCommunicator) and comm.process_group is group


def communicator_for_group(group: dist.ProcessGroup | None) -> Communicator | None:
    """The registered communicator of ``group`` (created on first use); None for
    no group or a group of one rank (nothing to reduce)."""
    if group is None:
        return None
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if dist.get_world_size(group) == 1:
        return None
    name = _group_key(group)
    with _lock:
        comm = _registry.get(name)
        if not _is_communicator_of(comm, group):
            comm = ProcessGroupCommunicator(group)
            _registry[name] = comm
    return comm
