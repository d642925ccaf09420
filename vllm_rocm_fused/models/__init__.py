"""Qwen3.5 layer overrides (vLLM glue). The tiny test models are another folder, the
top-level ``models/``, shipped as ``vllm_rocm_fused.tiny_models``.

``ARCHITECTURES`` maps each vLLM architecture name the plugin overrides to the
class in ``vllm_rocm_fused.models.qwen3_5`` (registered lazily by name, so the
plugin entry point imports no model code).
"""

ARCHITECTURES: dict[str, str] = {
    "Qwen3_5ForCausalLM": "FusedQwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM": "FusedQwen3_5MoeForCausalLM",
    "Qwen3_5ForConditionalGeneration": "FusedQwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration": "FusedQwen3_5MoeForConditionalGeneration",
    "Qwen3_5MTP": "FusedQwen3_5MTP",
    "Qwen3_5MoeMTP": "FusedQwen3_5MoeMTP",
}
