"""Presets, --set overrides, and the checks that run before anything is written."""

import json

import pytest

from vllm_rocm_fused.tiny_models import PresetError, build_tiny_model, list_presets, parse_overrides, resolve
from vllm_rocm_fused.tiny_models.recipe import PARTITION, load_preset


def test_presets_exist():
    assert {"dense-fp8", "dense-bf16", "moe-fp8", "vl-fp8"} <= set(list_presets())


@pytest.mark.parametrize("name", ["dense-fp8", "dense-bf16", "moe-fp8", "vl-fp8"])
def test_every_tp2_partition_is_a_multiple_of_128(name):
    r = resolve(name)
    t = r.text
    assert 2 in r.builder["tp_sizes"]
    sizes = [
        2 * t["num_attention_heads"] * t["head_dim"],
        t["num_key_value_heads"] * t["head_dim"],
        t["num_attention_heads"] * t["head_dim"],
        t["linear_num_key_heads"] * t["linear_key_head_dim"],
        t["linear_num_value_heads"] * t["linear_value_head_dim"],
    ]
    sizes += (
        [t["moe_intermediate_size"], t["shared_expert_intermediate_size"]] if r.is_moe else [t["intermediate_size"]]
    )
    for size in sizes:
        assert size % 2 == 0 and (size // 2) % PARTITION == 0, (name, size)
    assert t["hidden_size"] % PARTITION == 0


@pytest.mark.parametrize("name", ["dense-fp8", "dense-bf16", "moe-fp8", "vl-fp8"])
def test_layer_pattern_is_three_gdn_to_one_attention(name):
    types = resolve(name).layer_types()
    assert 4 <= len(types) <= 8
    assert types == ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(len(types))]


def test_fp8_and_bf16_dense_presets_differ_only_in_quantization():
    fp8, bf16 = load_preset("dense-fp8"), load_preset("dense-bf16")
    assert fp8["config"] == bf16["config"]
    assert (fp8["builder"]["quantization"], bf16["builder"]["quantization"]) == ("fp8", "none")


def test_vl_preset_nests_the_dense_language_model():
    vl, dense = resolve("vl-fp8"), resolve("dense-fp8")
    assert vl.config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    text = dict(vl.text)
    assert text.pop("rope_parameters")["mrope_section"] == [11, 11, 10]
    ref = dict(dense.text)
    ref.pop("rope_parameters"), ref.pop("architectures")
    assert text == ref
    assert vl.config["vision_config"]["out_hidden_size"] == vl.text["hidden_size"]
    assert "--language-model-only" in vl.builder["serve_args"]


def test_overrides_parse_json_values():
    assert parse_overrides(
        ["num_hidden_layers=4", "quantization=none", "tp_sizes=[1,2,4]", "rms_norm_eps=1e-5", "attn_output_gate=true"]
    ) == {
        "num_hidden_layers": 4,
        "quantization": "none",
        "tp_sizes": [1, 2, 4],
        "rms_norm_eps": 1e-5,
        "attn_output_gate": True,
    }
    with pytest.raises(PresetError, match="key=value"):
        parse_overrides(["hidden_size"])


def test_override_changes_depth_and_layer_types():
    r = resolve("dense-fp8", {"num_hidden_layers": 4})
    assert r.layer_types() == ["linear_attention"] * 3 + ["full_attention"]
    r = resolve("moe-fp8", {"num_hidden_layers": 2, "layer_types": ["full_attention", "linear_attention"]})
    assert r.layer_types() == ["full_attention", "linear_attention"]
    r = resolve("vl-fp8", {"hidden_size": 512, "vision_config.depth": 2})
    assert r.text["hidden_size"] == 512 and r.config["vision_config"]["out_hidden_size"] == 512
    assert r.config["vision_config"]["depth"] == 2


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("dense-fp8", {"hidden_size": 320}, "hidden_size = 320 must be a multiple of 128"),
        ("dense-fp8", {"intermediate_size": 1152}, "intermediate_size = 1152 gives a TP=2 partition of 576"),
        ("dense-fp8", {"num_key_value_heads": 1}, "num_key_value_heads = 1 does not split across TP=2"),
        ("dense-fp8", {"linear_value_head_dim": 96}, "GDN value dim .* partition of 192"),
        ("moe-fp8", {"moe_intermediate_size": 384}, "moe_intermediate_size = 384 gives a TP=2 partition of 192"),
        ("moe-fp8", {"num_experts_per_tok": 9}, "exceeds num_experts"),
        ("dense-fp8", {"tp_sizes": [1, 2, 4]}, "TP=4"),
        ("dense-fp8", {"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ("dense-fp8", {"layer_types": ["linear_attention"]}, "layer_types must list 8 entries"),
        ("dense-fp8", {"quantization": "int4"}, "quantization must be one of"),
        ("dense-fp8", {"rms_norm_eps": "small"}, "transformers rejects the config"),
        ("vl-fp8", {"vision_config.num_position_embeddings": 50}, "must be a square"),
    ],
)
def test_bad_overrides_are_rejected_before_writing(tmp_path, preset, overrides, message):
    out = tmp_path / "model"
    with pytest.raises(PresetError, match=message.replace("[", r"\[")):
        build_tiny_model(preset, out, overrides=overrides)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_key_and_preset_are_named(tmp_path):
    with pytest.raises(PresetError, match=r"unknown key 'hiden_size'.*known keys: .*hidden_size"):
        build_tiny_model("dense-fp8", tmp_path / "m", overrides={"hiden_size": 512})
    with pytest.raises(PresetError, match=r"unknown preset 'dense-fp4'; presets: .*dense-fp8"):
        build_tiny_model("dense-fp4", tmp_path / "m")
    with pytest.raises(PresetError, match="seed must be a non-negative integer"):
        build_tiny_model("dense-fp8", tmp_path / "m", seed=-1)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_tiny_model(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PresetError, match="refusing to overwrite"):
        build_tiny_model("dense-bf16", tmp_path, overrides={"num_hidden_layers": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_presets_are_valid_json_with_known_sections():
    for name in list_presets():
        preset = load_preset(name)
        assert set(preset) == {"description", "builder", "config"}, name
        json.dumps(preset)
