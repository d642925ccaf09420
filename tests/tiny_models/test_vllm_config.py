"""vLLM reads the tiny checkpoints' configs as it reads the releases' (no engine:
config classes and the FP8 quantization config only)."""

import json

import pytest

pytest.importorskip("vllm")


@pytest.mark.parametrize(
    "name, arch, text_type",
    [
        ("dense-fp8", "Qwen3_5ForCausalLM", "qwen3_5_text"),
        ("dense-bf16", "Qwen3_5ForCausalLM", "qwen3_5_text"),
        ("moe-fp8", "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
        ("vl-fp8", "Qwen3_5ForConditionalGeneration", "qwen3_5_text"),
    ],
)
def test_vllm_model_config(built, name, arch, text_type):
    from vllm.config import ModelConfig

    extra = {"language_model_only": True} if name.startswith("vl") else {}
    mc = ModelConfig(model=str(built(name)), max_model_len=512, **extra)
    assert mc.architectures == [arch]
    assert mc.hf_text_config.model_type == text_type
    assert mc.quantization == ("fp8" if name.endswith("fp8") else None)
    assert mc.hf_text_config.layer_types.count("full_attention") == 2


@pytest.mark.parametrize(
    "name, model_cls, lm",
    [
        ("dense-fp8", "Qwen3_5ForCausalLM", "model."),
        ("moe-fp8", "Qwen3_5MoeForCausalLM", "model."),
        ("vl-fp8", "Qwen3_5ForConditionalGeneration", "language_model.model."),
    ],
)
def test_release_module_list_maps_onto_vllm_modules(built, name, model_cls, lm):
    # The list keeps the releases' spelling ("model.language_model.layers.N...");
    # vLLM's weight-name mapper must turn it into its own module names, and the
    # fused modules (in_proj_ba, qkv_proj, gate_up_proj) must resolve shard by shard.
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
    from vllm.model_executor.models import qwen3_5

    cls = getattr(qwen3_5, model_cls)
    qc = Fp8Config.from_config(json.loads((built(name) / "config.json").read_text())["quantization_config"])
    qc.apply_vllm_mapper(cls.hf_to_vllm_mapper)
    skipped = lambda prefix: is_layer_skipped(prefix, qc.ignored_layers, cls.packed_modules_mapping)  # noqa: E731
    assert skipped(f"{lm}layers.0.linear_attn.in_proj_ba")
    assert not skipped(f"{lm}layers.0.linear_attn.in_proj_qkvz")
    assert not skipped(f"{lm}layers.0.linear_attn.out_proj")
    assert not skipped(f"{lm}layers.3.self_attn.qkv_proj")
    assert not skipped(f"{lm}layers.3.self_attn.o_proj")
    if "Moe" in model_cls:
        assert skipped(f"{lm}layers.1.mlp.gate")
        assert skipped(f"{lm}layers.1.mlp.shared_expert_gate")
        assert not skipped(f"{lm}layers.1.mlp.shared_expert.gate_up_proj")
    else:
        assert not skipped(f"{lm}layers.1.mlp.gate_up_proj")
