"""Consumer side of the (fp8, scale) handoff: which linear layers can take a
pre-quantized activation, in which scale layout, and how.

vLLM's block-FP8 kernels all quantize their input inside ``apply_weights``
(``Fp8BlockScaledMMLinearKernel``) with a ``QuantFP8`` whose flags say the
layout its GEMM reads: row-major ``[M, K/128]`` (Triton, aiter), column-major
(CUTLASS, DeepGEMM), optionally TMA-aligned or power-of-two (UE8M0) scales
(DeepGEMM). The fused op produces float32 scales, row- or column-major; it does
not produce padded, TMA-aligned or power-of-two scales, so those consumers (and
ones that take bf16 input, like FlashInfer's) keep bf16 input, with the reason
reported.

``enable_handoff`` makes a capable kernel accept vLLM's ``QuantizedActivation``
(key ``kFp8Dynamic128Sym``) by routing it straight to the kernel's own
``apply_block_scaled_mm`` — the exact GEMM call the kernel makes after its own
quant — and records the capability on the layer (``_input_quant_key``, vLLM's
contract attribute).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from vllm.model_executor.layers.fusion.quant_activation import (
    QuantizedActivation,
    as_quantized_activation,
)
from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8Dynamic128Sym

GROUP = 128


@dataclass(frozen=True)
class Handoff:
    """How a consumer takes the fused op's output: ``layout`` is "row"/"col", or
    None for bf16 input, with ``reason`` saying why."""

    layout: str | None
    reason: str
    kernel: str


def _block_kernel(linear: torch.nn.Module):
    quant_method = getattr(linear, "quant_method", None)
    return getattr(quant_method, "fp8_linear", None)


def inspect_consumer(linear: torch.nn.Module) -> Handoff:
    """Can ``linear`` take (fp8, scale) from the fused op, and in which layout?"""
    from vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel import (
        Fp8BlockScaledMMLinearKernel,
    )

    if getattr(linear, "requires_unquantized_input", False):
        return Handoff(None, "the layer needs its unquantized input (LoRA)", type(linear).__name__)
    kernel = _block_kernel(linear)
    if kernel is None:
        method = type(getattr(linear, "quant_method", None)).__name__
        return Handoff(None, f"not an FP8 block-quantized layer ({method})", method)
    name = type(kernel).__name__
    if not isinstance(kernel, Fp8BlockScaledMMLinearKernel):
        return Handoff(None, f"{name} is not a block-FP8 kernel", name)
    if kernel.input_quant_key() == kFp8Dynamic128Sym:
        return Handoff("row", f"{name} consumes kFp8Dynamic128Sym", name)
    if not getattr(kernel, "apply_input_quant", True):
        return Handoff(None, f"{name} takes bf16 input (quantizes inside its GEMM)", name)
    if type(kernel).apply_weights is not Fp8BlockScaledMMLinearKernel.apply_weights:
        return Handoff(None, f"{name} overrides apply_weights; its input handling is unknown", name)
    quant = getattr(kernel, "quant_fp8", None)
    if quant is None or getattr(quant, "group_size", GROUP) != GROUP or getattr(quant, "static", False):
        return Handoff(None, f"{name} does not quantize its input per 1x{GROUP} group", name)
    if getattr(quant, "use_ue8m0", False):
        return Handoff(None, f"{name} wants power-of-two (UE8M0) scales, which the fused op does not produce", name)
    if getattr(quant, "tma_aligned_scales", False):
        return Handoff(None, f"{name} wants TMA-aligned scales, which the fused op does not produce", name)
    if getattr(quant, "num_token_padding", None):
        return Handoff(None, f"{name} pads the token dimension of its input", name)
    layout = "col" if getattr(quant, "column_major_scales", False) else "row"
    return Handoff(layout, f"{name} reads {'column' if layout == 'col' else 'row'}-major float32 scales", name)


def _apply_weights_with_handoff(self, layer, x, bias=None, **kwargs):
    """Bound onto a block-FP8 kernel instance: a QuantizedActivation goes straight
    to the GEMM, anything else takes the kernel's own path."""
    qa = as_quantized_activation(x, kFp8Dynamic128Sym)
    if qa is None:
        return type(self).apply_weights(self, layer, x, bias, **kwargs)
    params = self._get_layer_params(layer)
    k = qa.data.shape[-1]
    output = self.apply_block_scaled_mm(
        A=qa.data.reshape(-1, k),
        B=params.weight,
        As=qa.scale.reshape(-1, k // GROUP) if qa.scale.is_contiguous() else qa.scale,
        Bs=params.block_scale,
    )
    if bias is not None:
        output = output + bias
    out_dtype = self.config.out_dtype or qa.orig_dtype
    return output.to(dtype=out_dtype).view(*qa.orig_shape[:-1], params.weight.shape[0])


def _input_quant_key(self):
    return kFp8Dynamic128Sym


def enable_handoff(linear: torch.nn.Module, handoff: Handoff) -> None:
    """Let ``linear`` accept a ``QuantizedActivation`` in ``handoff.layout``."""
    if handoff.layout is None:
        raise ValueError(f"consumer cannot take a quantized activation: {handoff.reason}")
    kernel = _block_kernel(linear)
    if kernel.input_quant_key() != kFp8Dynamic128Sym:
        kernel.apply_weights = types.MethodType(_apply_weights_with_handoff, kernel)
        kernel.input_quant_key = types.MethodType(_input_quant_key, kernel)
    # Plain attributes on the module (setattr: nn.Module's typing only knows tensors and modules).
    setattr(linear, "_input_quant_key", kFp8Dynamic128Sym)
    setattr(linear, "_rocm_fused_scale_layout", handoff.layout)


__all__ = ["Handoff", "QuantizedActivation", "enable_handoff", "inspect_consumer"]
