"""A deliberately wrong backend, for testing the startup self-check (never on by default).

``VLLM_ROCM_FUSED_FAULT_INJECT=scales|layout`` (or a test's ``register_backend``)
registers ``FaultInjectedBackend``: it outranks every other backend, runs the
portable path, then breaks its result the way a fast kernel could after an aiter
release or at a shape nobody ran:

* ``scales``: every scale doubled (the dequantized activation is twice too large);
* ``layout``: the scales written in the other memory order than the consumer asked
  for, under the requested strides (the values land on the wrong groups; invisible
  with one token or one group, where both orders are the same bytes).

It takes quantizing calls only (the faults are in the scales) and runs on any device.
"""

from __future__ import annotations

import torch

from .backend_api import PATH_FUSED_1, Backend, CallSpec, Outputs
from .comm import Communicator
from .native import NativeBackend

FAULTS = ("scales", "layout")


class FaultInjectedBackend(Backend):
    name = "fault-injected"
    priority = 1000

    def __init__(self, fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        self.fault = fault
        self._native = NativeBackend()

    def ineligible_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        return None if spec.quantize else "no scales to break (quantize=False)"

    def describe(self, spec: CallSpec, comm: Communicator | None) -> str:
        return f"{PATH_FUSED_1} (the portable path with its {self.fault} broken on purpose)"

    def run(self, x, residual, weight, eps, comm, spec) -> tuple[Outputs, str]:
        (q, scale, res, normed), _ = self._native.run(x, residual, weight, eps, comm, spec)
        assert scale is not None  # quantizing calls only
        if self.fault == "scales":
            scale = scale * 2
        else:
            scale = _other_order(scale, spec.scale_layout)
        return (q, scale, res, normed), PATH_FUSED_1


def _other_order(scale: torch.Tensor, layout: str) -> torch.Tensor:
    """The [T, G] scales' bytes laid out in the other order, under ``layout``'s strides."""
    tokens, groups = scale.shape
    if layout == "col":
        data = scale.contiguous().reshape(-1)  # row-major bytes
        return torch.as_strided(data, (tokens, groups), (1, tokens))
    data = scale.t().contiguous().reshape(-1)  # column-major bytes
    return torch.as_strided(data, (tokens, groups), (groups, 1))
