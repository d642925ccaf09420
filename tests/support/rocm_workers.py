"""Rank bodies for the multi-rank ROCm backend tests (importable by spawned children):
the fake aiter on a fake ROCm box, reducing over a real gloo group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .op_workers import rank_inputs


def functional_op_rocm_rank(rank, world_size, port, generation, cases):
    """The functional op with ``group=`` a plain (gloo) process group: the ROCm
    backend builds aiter's CustomAllreduce for it on the first call."""
    from support import fake_aiter
    from vllm_rocm_fused.ops import backends, fused_allreduce_rmsnorm_quant

    fake = fake_aiter.install(generation, "gfx950")
    backends.get_backend("rocm").set_environment(fake_aiter.FakeRocmEnv("gfx950"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = []
        for i, (t, h, layout, emit, quantize) in enumerate(cases):
            x, residual, weight = rank_inputs(rank, t, h, seed=i)
            backends.reset_counters()
            out = fused_allreduce_rmsnorm_quant(
                x,
                residual,
                weight,
                1e-6,
                group=dist.group.WORLD,
                weight_offset=1.0,
                emit_bf16=emit,
                scale_layout=layout,
                quant_dtype=torch.float8_e4m3fn,
                quantize=quantize,
            )
            results.append((tuple(out), backends.backend_counters()))
        return results, len(fake.calls("CustomAllreduce.__init__")), list(fake.violations)
    finally:
        dist.destroy_process_group()
