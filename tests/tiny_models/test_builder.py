"""The builder's checkpoints: real names and shapes, block FP8 from the bf16
originals, the releases' bf16 module list, determinism, the stamp."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vllm_rocm_fused.tiny_models import build_tiny_model, builder, is_current, modules_to_not_convert, resolve
from vllm_rocm_fused.tiny_models.quantize import BLOCK, dequantize_block_fp8


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def _hf_state_shapes(folder):
    """Parameter names and shapes of transformers' own model for this config (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3_5ForConditionalGeneration

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        if cfg.architectures[0] == "Qwen3_5ForConditionalGeneration":
            model = Qwen3_5ForConditionalGeneration(cfg)
        else:
            model = AutoModelForCausalLM.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["dense-bf16", "moe-bf16", "vl-fp8"])
def test_names_and_shapes_are_transformers_own(built, name):
    folder = built(name)
    ours = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if not key.endswith("weight_scale_inv"):
                ours[key] = tuple(f.get_slice(key).get_shape())
    hf = _hf_state_shapes(folder)
    cfg = resolve(*{"dense-bf16": ("dense-bf16",), "moe-bf16": ("moe-fp8",), "vl-fp8": ("vl-fp8",)}[name]).text
    if "num_experts" in cfg:
        # transformers fuses the routed experts into 3-D tensors; the FP8 releases
        # (and we) store one 2-D tensor per expert, which vLLM's loader takes too.
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp.experts."
            e, inter, h = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
            assert hf.pop(p + "gate_up_proj") == (e, 2 * inter, h)
            assert hf.pop(p + "down_proj") == (e, h, inter)
            for j in range(e):
                assert ours.pop(f"{p}{j}.gate_proj.weight") == (inter, h)
                assert ours.pop(f"{p}{j}.up_proj.weight") == (inter, h)
                assert ours.pop(f"{p}{j}.down_proj.weight") == (h, inter)
    assert ours == hf


def test_gdn_and_attention_tensors_have_the_release_names(built):
    names = set(_tensors(built("dense-bf16")))
    for suffix in (
        "in_proj_qkv.weight",
        "in_proj_z.weight",
        "in_proj_b.weight",
        "in_proj_a.weight",
        "conv1d.weight",
        "A_log",
        "dt_bias",
        "norm.weight",
        "out_proj.weight",
    ):
        assert f"model.layers.0.linear_attn.{suffix}" in names
    for suffix in (
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "q_norm.weight",
        "k_norm.weight",
    ):
        assert f"model.layers.3.self_attn.{suffix}" in names
    vl = set(_tensors(built("vl-fp8")))
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in vl
    assert "model.visual.blocks.0.attn.qkv.weight" in vl and "lm_head.weight" in vl


def test_dtypes_follow_the_releases(built):
    t = _tensors(built("dense-bf16"))
    assert t["model.layers.0.linear_attn.A_log"].dtype == torch.float32
    assert {v.dtype for k, v in t.items() if not k.endswith("A_log")} == {torch.bfloat16}


@pytest.mark.parametrize("fp8_name, bf16_name", [("dense-fp8", "dense-bf16"), ("moe-fp8", "moe-bf16")])
def test_fp8_weights_dequantize_to_the_bf16_originals(built, fp8_name, bf16_name):
    fp8, ref = _tensors(built(fp8_name)), _tensors(built(bf16_name))
    quantized = [k for k, v in fp8.items() if v.dtype == torch.float8_e4m3fn]
    assert quantized, "no FP8 tensor"
    assert set(fp8) == set(ref) | {k + "_scale_inv" for k in quantized}
    for key in quantized:
        q, s, w = fp8[key], fp8[key + "_scale_inv"], ref[key].float()
        n, k = q.shape
        assert s.dtype == torch.bfloat16 and tuple(s.shape) == (-(-n // BLOCK), -(-k // BLOCK)), key
        assert bool((s.float() > 0).all()), key
        sx = s.float().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
        bound = w.abs() * 2.0**-4 + sx * 2.0**-10  # half an e4m3 step
        err = (dequantize_block_fp8(q, s) - w).abs()
        assert bool((err <= bound).all()), (key, float((err / bound.clamp_min(1e-30)).max()))
        rel = float((err.norm() / w.norm()))
        assert 0 < rel < 0.04, (key, rel)  # FP8 rounding happened, and only that
    for key in set(ref) - set(quantized):
        assert torch.equal(fp8[key], ref[key]), key


def _canonical(module):
    if module.startswith("model.") and not module.startswith(("model.language_model.", "model.visual.")):
        module = "model.language_model." + module[len("model.") :]
    return module.replace("model.language_model.embed_tokens", "model.embed_tokens")


@pytest.mark.parametrize("name", ["dense-fp8", "moe-fp8", "vl-fp8"])
def test_fp8_exactly_where_the_release_quantizes(built, name):
    folder = built(name)
    t = _tensors(folder)
    keep = set(_config(folder)["quantization_config"]["modules_to_not_convert"])
    for key, v in t.items():
        if key.endswith("weight_scale_inv"):
            continue
        module = key.rsplit(".", 1)[0]
        if v.dtype == torch.float8_e4m3fn:
            assert _canonical(module) not in keep, key
            assert key.endswith(".weight") and v.dim() == 2
        elif v.dim() == 2 and key.endswith(".weight") and "embed" not in key and "pos_embed" not in key:
            # every bf16 matrix of a Linear module is one the release keeps in bf16
            assert _canonical(module) in keep, key


def test_modules_to_not_convert_is_the_release_list():
    # The Qwen3.5/3.6 FP8 release list, for a 4-layer MoE (3 GDN + 1 attention),
    # spelled out: sorted, VL prefixes, the fused in_proj_ba name, MTP entries.
    got = modules_to_not_convert(resolve("moe-fp8", {"num_hidden_layers": 4}))
    layer = "model.language_model.layers."
    gdn = ["A_log", "conv1d", "dt_bias", "in_proj_a", "in_proj_b", "in_proj_ba", "norm"]
    want = ["lm_head", "model.embed_tokens"]
    for i in range(4):
        want += [
            f"{layer}{i}.input_layernorm",
            f"{layer}{i}.mlp.gate",
            f"{layer}{i}.mlp.shared_expert_gate",
            f"{layer}{i}.post_attention_layernorm",
        ]
        want += (
            [f"{layer}{i}.linear_attn.{s}" for s in gdn]
            if i < 3
            else [f"{layer}{i}.self_attn.k_norm", f"{layer}{i}.self_attn.q_norm"]
        )
    want += [
        "mtp.fc",
        "mtp.layers.0.input_layernorm",
        "mtp.layers.0.mlp.gate",
        "mtp.layers.0.mlp.shared_expert_gate",
        "mtp.layers.0.post_attention_layernorm",
        "mtp.layers.0.self_attn.k_norm",
        "mtp.layers.0.self_attn.q_norm",
        "mtp.norm",
        "mtp.pre_fc_norm_embedding",
        "mtp.pre_fc_norm_hidden",
    ]
    assert got == sorted(want)
    dense = modules_to_not_convert(resolve("dense-fp8", {"num_hidden_layers": 4}))
    assert not any(m.endswith(("mlp.gate", "shared_expert_gate")) for m in dense)
    vl = modules_to_not_convert(resolve("vl-fp8"))
    assert "model.visual.blocks.0.attn.qkv" in vl and "model.visual.merger.linear_fc2" in vl


def test_quantization_config_is_the_releases(built):
    qc = _config(built("dense-fp8"))["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "modules_to_not_convert"} == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert "quantization_config" not in _config(built("dense-bf16"))


def test_vl_and_text_layouts_hold_the_same_language_model(built):
    text, vl = _tensors(built("dense-fp8")), _tensors(built("vl-fp8"))
    for key, v in text.items():
        other = key if key.startswith("lm_head") else "model.language_model." + key[len("model.") :]
        assert torch.equal(
            v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
            vl[other].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else vl[other],
        ), key


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_deterministic_for_a_seed(built, tmp_path):
    first = built("dense-fp8")
    again = build_tiny_model("dense-fp8", tmp_path / "again", seed=0)
    assert _digest(first) == _digest(again)
    other = build_tiny_model("dense-fp8", tmp_path / "other", seed=1)
    d0, d1 = _digest(first), _digest(other)
    assert d0["model.safetensors"] != d1["model.safetensors"]
    assert d0["tokenizer.json"] == d1["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_stamp_tracks_what_was_built(built, monkeypatch):
    folder = built("dense-fp8")
    assert is_current(folder, "dense-fp8", 0)
    assert not is_current(folder, "dense-fp8", 1)
    assert not is_current(folder, "dense-fp8", 0, {"num_hidden_layers": 4})
    assert not is_current(folder, "dense-bf16", 0)
    monkeypatch.setattr(builder, "BUILDER_VERSION", builder.BUILDER_VERSION + 1)
    assert not is_current(folder, "dense-fp8", 0)
    stamp = json.loads((folder / "tiny_model.json").read_text())
    assert stamp["architecture"] == "Qwen3_5ForCausalLM" and stamp["quantization"] == "fp8"
    assert builder.serve_args(built("vl-fp8")) == ["--language-model-only"]


def test_rebuild_replaces_a_previous_tiny_model(tmp_path):
    out = tmp_path / "m"
    build_tiny_model("dense-bf16", out, overrides={"num_hidden_layers": 4})
    build_tiny_model("dense-bf16", out, overrides={"num_hidden_layers": 5})
    assert _config(out)["num_hidden_layers"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


def test_configs_load_with_transformers_config_classes(built):
    from transformers import AutoConfig, Qwen3_5Config, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    assert isinstance(AutoConfig.from_pretrained(built("dense-fp8")), Qwen3_5TextConfig)
    assert isinstance(AutoConfig.from_pretrained(built("moe-fp8")), Qwen3_5MoeTextConfig)
    vl = AutoConfig.from_pretrained(built("vl-fp8"))
    assert isinstance(vl, Qwen3_5Config) and vl.text_config.hidden_size == 256
    assert vl.image_token_id is not None and vl.text_config.layer_types[3] == "full_attention"
