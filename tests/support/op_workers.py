"""Rank bodies for the multi-rank op tests (importable by spawned children)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_inputs(rank, t, h, seed):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    shared = torch.Generator().manual_seed(seed)
    residual = (torch.randn(t, h, generator=shared) * 2).to(torch.bfloat16)
    weight = (torch.randn(h, generator=shared) * 0.3).to(torch.bfloat16)
    return x, residual, weight


def functional_op_rank(rank, world_size, port, cases):
    from vllm_rocm_fused.ops import fused_allreduce_rmsnorm_quant

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # a subgroup too, to exercise group resolution by name (not only WORLD)
        sub = dist.new_group(list(range(world_size)))
        results = []
        for i, (t, h, layout, emit, offset) in enumerate(cases):
            x, residual, weight = rank_inputs(rank, t, h, seed=i)
            out = fused_allreduce_rmsnorm_quant(
                x,
                residual,
                weight,
                1e-6,
                group=sub if i % 2 else dist.group.WORLD,
                weight_offset=offset,
                emit_bf16=emit,
                scale_layout=layout,
            )
            results.append(tuple(out))
        return results
    finally:
        dist.destroy_process_group()


def vllm_custom_op_rank(rank, world_size, port, cases):
    import os

    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    from vllm_rocm_fused import ops
    from vllm_rocm_fused.layers.fused_norm import FusedAllReduceRMSNormQuant

    config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(config):
        parallel_state.init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", rank, backend="gloo")
        parallel_state.initialize_model_parallel(world_size)
        try:
            results = []
            for i, (t, h, layout, emit, quantize) in enumerate(cases):
                x, residual, weight = rank_inputs(rank, t, h, seed=i)
                layer = FusedAllReduceRMSNormQuant(
                    h, 1e-6, weight_offset=1.0, quantize=quantize, emit_bf16=emit, scale_layout=layout
                )
                layer.weight.data.copy_(weight)
                x_before = x.clone()
                ops.reset_counters()
                out = layer(x, residual)
                assert torch.equal(x, x_before), "the op modified its input"
                results.append((tuple(out), ops.path_counters(), layer._forward_method.__name__))
            return results
        finally:
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


def forget_group_rank(rank, world_size, port):
    """A group's communicator before and after ``comm.forget_group``: (registered name,
    still registered after forgetting, a later lookup makes a new one)."""
    from vllm_rocm_fused.ops import comm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        first = comm.communicator_for_group(dist.group.WORLD)
        comm.forget_group(dist.group.WORLD)
        try:
            comm.get_communicator(first.name)
            still_registered = True
        except KeyError:
            still_registered = False
        again = comm.communicator_for_group(dist.group.WORLD)
        comm.forget_group(dist.group.WORLD)
        return first.name, still_registered, again is not first
    finally:
        dist.destroy_process_group()
