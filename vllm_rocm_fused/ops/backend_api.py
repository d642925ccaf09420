"""What a backend of the fused op is: the facts it gets about a call (``CallSpec``), the
class it implements (``Backend``), and the names of the paths it reports.

The registry (``backends.py``), the portable backend (``native.py``) and the fast
backends (``vllm_rocm_fused.backends.*``) all import this module; it imports none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch

from .comm import Communicator

PATH_FUSED_1 = "fused-1"  # one kernel: AR + add + RMSNorm + quant
PATH_FUSED_2 = "fused-2"  # two kernels: fused AR + add + RMSNorm, then group quant
PATH_GENERIC = "generic"  # portable torch ops
PATHS = (PATH_FUSED_1, PATH_FUSED_2, PATH_GENERIC)

# (q, scale, residual, normed), as ops.reference.FusedNormQuantOutput orders them; None
# where the call did not ask for it (q and scale without quantize, normed without emit_bf16).
Outputs = tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]


@dataclass(frozen=True)
class CallSpec:
    """Host-side facts about one call, enough to decide eligibility."""

    num_tokens: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    world_size: int
    group_size: int
    weight_offset: float
    emit_bf16: bool
    scale_layout: str
    quant_dtype: torch.dtype
    has_residual: bool
    quantize: bool = True
    capturing: bool = False

    @property
    def input_bytes(self) -> int:
        return self.num_tokens * self.hidden * self.dtype.itemsize


class Backend(ABC):
    """One implementation of the fused op."""

    #: registry key, what ``backend=`` and doctor call it
    name: str = ""
    #: higher wins under ``auto``
    priority: int = 0

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all (None = it can)."""
        return None

    @abstractmethod
    def ineligible_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        """Why this call cannot use this backend (None = it can). Host-side only."""

    def prepare(self, spec: CallSpec, comm: Communicator | None) -> None:
        """Host-side work a call needs before any rank launches it (create or grow a
        buffer, build a communicator object, compile); raise if this rank cannot run
        ``spec``. The registry calls it at the first call of each call key over a group,
        on every rank, and the ranks agree on the outcome before anyone launches: a
        failure here moves the whole group to another backend, where the same failure
        inside ``run`` could leave the other ranks waiting in the kernel. Default:
        nothing to prepare."""

    @abstractmethod
    def run(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        comm: Communicator | None,
        spec: CallSpec,
    ) -> tuple[Outputs, str]:
        """Returns ((q, scale, residual, normed), path) with path one of PATHS."""

    def describe(self, spec: CallSpec, comm: Communicator | None) -> str:
        """Which path this backend would take for ``spec`` (for doctor), when eligible."""
        return PATH_FUSED_1

    def details(self) -> dict[str, str]:
        """What doctor prints about this backend beyond per-call reasons (default: nothing)."""
        return {}

    def weight_updated(self, weight: torch.Tensor) -> None:
        """``weight`` (a norm weight) was just (re)loaded in place: refresh any copy
        derived from it (e.g. a precomputed ``1 + w``). Default: nothing kept."""
