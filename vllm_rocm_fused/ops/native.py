"""The portable backend: the communicator's all-reduce, then the reference math.

Runs anywhere torch runs (CPU included) and is the last step of every fallback
chain. On a GPU it costs one collective plus a handful of torch kernels.
"""

from __future__ import annotations

from .backends import PATH_GENERIC, Backend, CallSpec, register_backend
from .comm import Communicator
from .reference import norm_quant_reference


class NativeBackend(Backend):
    name = "native"
    priority = -1000

    def ineligible_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        return None

    def describe(self, spec: CallSpec, comm: Communicator | None) -> str:
        return PATH_GENERIC

    def run(self, x, residual, weight, eps, comm, spec):
        h = x
        if comm is not None and comm.world_size > 1 and spec.num_tokens > 0:
            h = comm.all_reduce(x)
        out = norm_quant_reference(
            h, residual, weight, eps,
            out_dtype=x.dtype,
            group_size=spec.group_size,
            weight_offset=spec.weight_offset,
            emit_bf16=spec.emit_bf16,
            scale_layout=spec.scale_layout,
            quant_dtype=spec.quant_dtype,
            quantize=spec.quantize,
        )
        return tuple(out), PATH_GENERIC


register_backend(NativeBackend())

__all__ = ["NativeBackend"]
