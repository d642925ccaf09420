"""Qwen3.5 architectures with fused norm sites: vLLM's classes, built as vLLM
builds them, then rewired by ``fusion.install`` (nothing of their code copied).

Registered by the plugin under vLLM's own architecture names, so any Qwen3.5
checkpoint (dense or MoE, text or VL arch, and the MTP drafts) picks them up.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
)
from vllm.model_executor.models.qwen3_5_mtp import Qwen3_5MoeMTP, Qwen3_5MTP
from vllm.model_executor.models.utils import PPMissingLayer

from . import fusion


def _fuse_decoder(model, vllm_config: VllmConfig, where: str) -> fusion.FusionReport:
    """``model`` is a Qwen3_5Model (the decoder stack of every arch)."""
    pp = get_pp_group()
    layers = list(model.layers[model.start_layer : model.end_layer])
    owner = model if not isinstance(model.norm, PPMissingLayer) else None
    return fusion.install(
        vllm_config=vllm_config,
        layers=layers,
        final_norm_owner=owner,
        where=where,
        last_output_reduced=not pp.is_last_rank,
    )


class FusedQwen3_5ForCausalLM(Qwen3_5ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fusion_report = _fuse_decoder(self.model, vllm_config, "Qwen3_5ForCausalLM")


class FusedQwen3_5MoeForCausalLM(Qwen3_5MoeForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fusion_report = _fuse_decoder(self.model, vllm_config, "Qwen3_5MoeForCausalLM")


class FusedQwen3_5ForConditionalGeneration(Qwen3_5ForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fusion_report = _fuse_decoder(self.language_model.model, vllm_config, "Qwen3_5ForConditionalGeneration")


class FusedQwen3_5MoeForConditionalGeneration(Qwen3_5MoeForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fusion_report = _fuse_decoder(self.language_model.model, vllm_config, "Qwen3_5MoeForConditionalGeneration")


def _fuse_mtp(mtp, vllm_config: VllmConfig, where: str) -> fusion.FusionReport:
    """MTP drafts: each draft layer runs alone, from the (reduced) ``fc`` output to
    the predictor's final norm."""
    predictor = mtp.model
    return fusion.install(
        vllm_config=vllm_config,
        layers=list(predictor.layers),
        final_norm_owner=predictor,
        where=where,
        independent_layers=True,
    )


class FusedQwen3_5MTP(Qwen3_5MTP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fusion_report = _fuse_mtp(self, vllm_config, "Qwen3_5MTP")


class FusedQwen3_5MoeMTP(Qwen3_5MoeMTP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fusion_report = _fuse_mtp(self, vllm_config, "Qwen3_5MoeMTP")
