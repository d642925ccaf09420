"""The portable backend: the communicator's all-reduce, then the reference math.

Runs anywhere torch runs (CPU included) and is the last step of every fallback
chain (the registry, ``backends.py``, registers it). On a GPU it costs one
collective plus a handful of torch kernels.
"""

from __future__ import annotations

import torch

from .backend_api import PATH_GENERIC, Backend, CallSpec, Outputs
from .comm import Communicator
from .reference import norm_quant_reference


class NativeBackend(Backend):
    name = "native"
    priority = -1000

    def ineligible_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        return None

    def describe(self, spec: CallSpec, comm: Communicator | None) -> str:
        return PATH_GENERIC

    def run(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        comm: Communicator | None,
        spec: CallSpec,
    ) -> tuple[Outputs, str]:
        h = x
        if comm is not None and comm.world_size > 1 and spec.num_tokens > 0:
            h = comm.all_reduce(x)
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
        q, scale, residual_out, normed = out
        return (q, scale, residual_out, normed), PATH_GENERIC


__all__ = ["NativeBackend"]
