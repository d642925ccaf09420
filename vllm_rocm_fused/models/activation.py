"""What a fused norm site hands its consumer, beyond vLLM's QuantizedActivation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.fusion.quant_activation import QuantizedActivation


@dataclass
class FusedInputActivation(QuantizedActivation):
    """(bf16, fp8, scale) for a GDN layer: ``in_proj_qkvz`` (FP8) reads the
    quantized part through vLLM's contract, ``in_proj_ba`` (bf16 weights) reads
    ``bf16``. It answers ``size()``, ``shape``, ``dtype`` and ``device`` like the
    bf16 activation, which is all the GDN layer asks of its input otherwise."""

    # Always set by the fused site; the default keeps the dataclass valid whatever
    # defaults a vLLM version gives the base class's fields.
    bf16: torch.Tensor | None = None

    def _bf16(self) -> torch.Tensor:
        if self.bf16 is None:
            raise ValueError("FusedInputActivation.bf16 is not set")
        return self.bf16

    def size(self, dim: int | None = None):
        return self._bf16().size() if dim is None else self._bf16().size(dim)

    @property
    def shape(self) -> torch.Size:
        return self._bf16().shape

    @property
    def dtype(self) -> torch.dtype:
        return self._bf16().dtype

    @property
    def device(self) -> torch.device:
        return self._bf16().device


_bf16_view_classes: dict[type, type] = {}


def accept_fused_input(linear: torch.nn.Module) -> None:
    """Make a bf16 linear (``in_proj_ba``) take a ``FusedInputActivation`` by
    reading its bf16 part. The module keeps its parameters and every behaviour;
    only ``forward`` learns to unwrap."""
    base = type(linear)
    if base in _bf16_view_classes.values():
        return
    cls = _bf16_view_classes.get(base)
    if cls is None:

        def forward(self, input_, _base=base):
            if isinstance(input_, FusedInputActivation):
                input_ = input_.bf16
            return _base.forward(self, input_)

        cls = type(f"{base.__name__}TakingFusedInput", (base,), {"forward": forward})
        _bf16_view_classes[base] = cls
    linear.__class__ = cls
