"""A Communicator over vLLM's tensor-parallel group."""

from __future__ import annotations

import torch

from ..ops.comm import Communicator, group_max, register_communicator


class VllmGroupCommunicator(Communicator):
    """Reduces through a vLLM ``GroupCoordinator`` (custom all-reduce, pynccl,
    CPU shared memory, ... whatever vLLM picked), so the portable path sums the
    same way the unfused model does.

    Fast backends find vLLM's handles here: ``process_group`` (the device group,
    for torch symmetric memory) and ``coordinator`` (for aiter's custom
    all-reduce object on ROCm).
    """

    def __init__(self, coordinator) -> None:
        super().__init__(
            name=f"vllm:{coordinator.unique_name}",
            world_size=coordinator.world_size,
            rank=coordinator.rank_in_group,
        )
        self.coordinator = coordinator

    @property
    def process_group(self):
        return self.coordinator.device_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        # vLLM's CPU communicator reduces in place; the fused op promises not to
        # touch its input, so reduce a copy there.
        if x.device.type == "cpu":
            x = x.clone()
        return self.coordinator._all_reduce_out_place(x)

    def agree_max(self, values: list[int]) -> list[int]:
        # vLLM's CPU (gloo) group of the same ranks: agreeing costs no device sync
        return group_max(self.coordinator.cpu_group, values)


def tp_communicator_name() -> str | None:
    """Register (once) and name the communicator of vLLM's TP group; None when
    there is no TP group or it has one rank."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tp_group()
    if group.world_size == 1:
        return None
    comm = VllmGroupCommunicator(group)
    return register_communicator(comm)
