"""Portable block-FP8 linear kernel: FP8 checkpoints (128x128 weight blocks, dynamic
1x128 activations) on platforms where vLLM has no block-FP8 kernel (x86 CPUs
without AMX).

Numerics follow the GPU kernels: the activation is quantized per 1x128 group to
FP8 with a float32 scale (the same ``group_quant_reference`` the fused op uses, so an
activation quantized by the fused norm and one quantized here are bit-identical),
then ``out = sum_k (A_q * As) (W_q * Ws)^T`` rounded to the output dtype once.
The sum runs in float64, where every dequantized value is exact: GPU kernels
accumulate in float32, but a float32 CPU GEMM rounds differently with the batch
shape, and a model served on CPU must give a request the same greedy output
whether it runs alone or in a batch. In float64 the order of the sum no longer
shows after the final rounding. It also accepts an already-quantized activation through
vLLM's ``QuantizedActivation`` contract (key ``kFp8Dynamic128Sym``, row-major
``[M, K/128]`` float32 scales), skipping its own quant.

Registered by its own ``vllm.general_plugins`` entry point, appended after vLLM's
CPU kernels: on a CPU with AMX vLLM's kernels still win.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel import (
    Fp8BlockScaledMMLinearKernel,
)
from vllm.model_executor.layers.fusion.quant_activation import (
    QuantizedActivation,
    as_quantized_activation,
)
from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8Dynamic128Sym
from vllm.platforms import current_platform

from ..ops.reference import group_quant_reference

BLOCK = 128


class PortableFp8BlockScaledMMKernel(Fp8BlockScaledMMLinearKernel):
    """W8A8 block-FP8 GEMM in plain torch, summed in float64 (see the module docstring)."""

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        if not current_platform.is_cpu():
            return False, "the portable kernel is registered for the CPU platform only"
        return True, None

    @classmethod
    def can_implement(cls, config) -> tuple[bool, str | None]:
        act = config.activation_quant_key.scale
        if act.static:
            return False, "needs dynamic activation scales"
        if tuple(act.group_shape) != (1, BLOCK):
            return False, f"needs 1x{BLOCK} activation groups, got {tuple(act.group_shape)}"
        weight_groups = tuple(config.weight_quant_key.scale.group_shape)
        if weight_groups != (BLOCK, BLOCK):
            return False, f"needs {BLOCK}x{BLOCK} weight blocks, got {weight_groups}"
        return True, None

    def input_quant_key(self):
        return kFp8Dynamic128Sym

    def apply_weights(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor | QuantizedActivation,
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        params = self._get_layer_params(layer)
        weight, weight_scale = params.weight, params.block_scale
        qa = as_quantized_activation(x, self.input_quant_key())
        if qa is not None:
            k = qa.data.shape[-1]
            q_input = qa.data.reshape(-1, k)
            input_scale = qa.scale.reshape(-1, k // BLOCK)
            orig_shape, out_dtype = qa.orig_shape, qa.orig_dtype
        else:
            assert isinstance(x, torch.Tensor)  # a QuantizedActivation of another key is not handed here
            k = x.shape[-1]
            q_input, input_scale = group_quant_reference(x.reshape(-1, k), BLOCK, weight.dtype)
            orig_shape, out_dtype = x.shape, x.dtype
        if self.config.out_dtype is not None:
            out_dtype = self.config.out_dtype
        output = self.apply_block_scaled_mm(A=q_input, B=weight, As=input_scale, Bs=weight_scale)
        if bias is not None:
            output = output + bias.to(output.dtype)
        return output.to(out_dtype).view(*orig_shape[:-1], weight.shape[0])

    def apply_block_scaled_mm(self, A, B, As, Bs) -> torch.Tensor:
        """A [M, K] fp8, As [M, K/128] fp32, B [N, K] fp8, Bs [ceil(N/128), K/128] fp32
        -> [M, N] float64 (see the module docstring)."""
        return block_fp8_matmul(A, As, B, Bs)


def dequant_blocks(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] fp8 with [ceil(N/128), ceil(K/128)] block scales -> float64 [N, K] (exact)."""
    n, k = w.shape
    s = scale.to(torch.float64).repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return w.to(torch.float64) * s


def block_fp8_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """(A_q * As) @ (W_q * Ws)^T in float64 for 1x128-group activations and 128x128-block
    weights: A_q [M, K], As [M, K/128], W_q [N, K], Ws [ceil(N/128), K/128] -> [M, N]."""
    k = a_q.shape[-1]
    a = a_q.to(torch.float64) * a_scale.to(torch.float64).repeat_interleave(BLOCK, dim=1)[:, :k]
    return a @ dequant_blocks(w, w_scale).t()


def install() -> None:
    """Append the kernel to vLLM's CPU block-FP8 candidates, after vLLM's own (idempotent)."""
    from vllm.model_executor.kernels import linear as linear_kernels
    from vllm.platforms import PlatformEnum

    candidates = linear_kernels._POSSIBLE_FP8_BLOCK_KERNELS.setdefault(PlatformEnum.CPU, [])
    if PortableFp8BlockScaledMMKernel not in candidates:
        candidates.append(PortableFp8BlockScaledMMKernel)
