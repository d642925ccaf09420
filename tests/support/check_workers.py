"""Rank bodies for the rank-consistency and self-check tests (importable by spawned
children): test backends that fail on one rank only, over real gloo groups."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vllm_rocm_fused.ops.backend_api import PATH_FUSED_1, Backend, CallSpec
from vllm_rocm_fused.ops.comm import Communicator

from .op_workers import rank_inputs

FAIL_RANK = 1


class OneRankBackend(Backend):
    """A "fast" backend whose collective is not the portable path's: it sums by
    all-gather (as a fused kernel's handshake differs from NCCL's all-reduce), so a
    rank that ran it while another ran native would hang or fail, not agree by luck.
    ``failure`` says where rank FAIL_RANK fails: "prepare" (a workspace that cannot grow
    on that GPU), "eligible" (a host check that answers differently there), "after"
    (an output check after its kernel finished), "later" (the second call of a size
    the group already agreed on)."""

    name = "one-rank"
    priority = 500

    def __init__(self, failure: str, rank: int) -> None:
        self.failure = failure
        self.rank = rank
        self.calls = 0

    def ineligible_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        if self.failure == "eligible" and self.rank == FAIL_RANK:
            return "this rank's host check says no"
        return None

    def prepare(self, spec: CallSpec, comm: Communicator | None) -> None:
        if self.failure == "prepare" and self.rank == FAIL_RANK:
            raise torch.OutOfMemoryError("cannot grow the workspace on this GPU")

    def run(self, x, residual, weight, eps, comm, spec):
        from vllm_rocm_fused.ops.reference import norm_quant_reference

        self.calls += 1
        assert comm is not None
        parts = [torch.empty_like(x, dtype=torch.float32) for _ in range(comm.world_size)]
        dist.all_gather(parts, x.to(torch.float32), group=comm.process_group)
        h = torch.stack(parts).sum(0)
        if self.rank == FAIL_RANK and (
            (self.failure == "after" and self.calls == 1) or (self.failure == "later" and self.calls == 2)
        ):
            raise RuntimeError("unexpected output layout from the kernel")
        out = norm_quant_reference(
            h,
            residual,
            weight,
            eps,
            out_dtype=x.dtype,
            group_size=spec.group_size,
            weight_offset=spec.weight_offset,
            emit_bf16=spec.emit_bf16,
            scale_layout=spec.scale_layout,
            quant_dtype=spec.quant_dtype,
            quantize=spec.quantize,
        )
        return tuple(out), PATH_FUSED_1


def one_rank_failure_rank(rank, world_size, port, scenarios):
    """Per scenario (failure, calls): a fresh registry with OneRankBackend(failure)
    registered, then ``calls`` calls (tokens, hidden) of the functional op; per call,
    the outputs (or the error's text) and the backend counters."""
    from vllm_rocm_fused.ops import backends, fused_allreduce_rmsnorm_quant

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        per_scenario = []
        for failure, calls in scenarios:
            backends.reset_decisions()
            backends.register_backend(OneRankBackend(failure, rank))
            results = []
            for i, (t, h) in enumerate(calls):
                x, residual, weight = rank_inputs(rank, t, h, seed=i)
                backends.reset_counters()
                try:
                    out = fused_allreduce_rmsnorm_quant(
                        x, residual, weight, 1e-6, group=dist.group.WORLD, weight_offset=1.0
                    )
                    results.append((tuple(out), backends.backend_counters()))
                except RuntimeError as e:
                    results.append((str(e), backends.backend_counters()))
                    break  # this rank's process would end here; the others finished this call
            backends.unregister_backend(OneRankBackend.name)
            per_scenario.append(results)
            dist.barrier()
        return per_scenario
    finally:
        dist.destroy_process_group()


def vllm_site_self_check_rank(rank, world_size, port, fault, modes, tokens):
    """vLLM's layer on CPU over a gloo TP group, with the fault-injected backend registered
    and the self-check configured as in a server (VLLM_ROCM_FUSED_VALIDATE = each of
    ``modes`` in turn, the registry and the check reset between them): the site's first
    call checks it. Per mode: the site's outputs for ``tokens`` (or the error's text),
    the disabled (backend, bucket) pairs, the check's summary and the site call's
    backend counters."""
    import os

    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    from vllm.config import DeviceConfig, SchedulerConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    from vllm_rocm_fused.ops import backends, self_check
    from vllm_rocm_fused.ops.fault_injection import FaultInjectedBackend

    config = VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=64, max_num_seqs=16, max_model_len=64, is_encoder_decoder=False
        ),
    )
    with set_current_vllm_config(config):
        parallel_state.init_distributed_environment(world_size, rank, f"tcp://127.0.0.1:{port}", rank, backend="gloo")
        parallel_state.initialize_model_parallel(world_size)
        try:
            from vllm_rocm_fused.layers.fused_norm import FusedAllReduceRMSNormQuant

            per_mode = []
            for mode in modes:
                backends.reset_decisions()
                self_check.reset()
                backends.register_backend(FaultInjectedBackend(fault))
                os.environ["VLLM_ROCM_FUSED_VALIDATE"] = mode
                h = 256
                x, residual, weight = rank_inputs(rank, tokens, h, seed=3)
                layer = FusedAllReduceRMSNormQuant(h, 1e-6, weight_offset=1.0, scale_layout="row")
                layer.weight.weight_loader(layer.weight, weight)
                backends.reset_counters()
                try:
                    out = tuple(layer(x, residual, tag="attn_input"))
                except RuntimeError as e:
                    out = str(e)
                per_mode.append(
                    (
                        out,
                        [(name, key.bucket) for name, key, _ in backends.disabled_paths()],
                        self_check.summary_lines(),
                        backends.backend_counters(),
                    )
                )
                backends.unregister_backend(FaultInjectedBackend.name)
            return per_mode
        finally:
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


def selftest_rocm_rank(rank, world_size, port, cases, hidden, tokens):
    """``selftest``'s per-rank work (checks and eager timings) over a real gloo group, on a
    fake ROCm box, once per (aiter generation, arch) in ``cases``: per case, the rows."""
    from support import fake_aiter
    from vllm_rocm_fused.cli import selftest
    from vllm_rocm_fused.ops import backends

    cfg = selftest.Config(
        hiddens=[hidden],
        sites={hidden: selftest.sites_for_hidden(world_size)},
        tp=world_size,
        tokens=tokens,
        device="cpu",
        scale_layout="row",
        repeats=1,
        replays=1,
    )
    ctx = selftest.rank_context(rank, world_size, port, cfg)
    try:
        per_case = []
        for generation, arch in cases:
            fake_aiter.install(generation, arch)
            backends.get_backend("rocm").set_environment(fake_aiter.FakeRocmEnv(arch))
            backends.reset_decisions()
            ctx["comm"].extras.clear()  # the CustomAllreduce the last generation built for the group
            ctx["quant_dtype"] = fake_aiter.ARCH_FP8[arch]
            per_case.append((selftest.rank_rows(cfg, ctx), list(fake_aiter.base.STATE.violations)))
            fake_aiter.uninstall()
        return per_case
    finally:
        dist.destroy_process_group()
