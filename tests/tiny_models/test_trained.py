"""The committed trained checkpoints: their manifests, the builder's trained presets,
and (transformers, CPU) that the weights know tiny-gsm8k."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_rocm_fused.tiny_models import PresetError, build_tiny_model, builder, resolve, tiny_gsm8k
from vllm_rocm_fused.tiny_models.train import make_task_tokenizer

CHECKPOINTS = {"dense": "trained-dense", "moe": "trained-moe"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_manifest_describes_the_committed_files(name):
    files, manifest = builder.trained_files(name), builder.trained_manifest(name)
    assert manifest["sha256"] == {
        "model.safetensors": _sha(files["weights"]),
        "tokenizer.json": _sha(files["tokenizer"]),
    }
    assert manifest["preset"] == f"{CHECKPOINTS[name]}-bf16"
    assert manifest["command"].startswith("python -m vllm_rocm_fused.tiny_models.train ")
    assert f"--steps {manifest['steps']}" in manifest["command"] and not manifest["stopped_early"]
    assert manifest["data_seed"] == tiny_gsm8k.DEFAULT_SEED
    assert manifest["final_loss"] < 0.05
    assert manifest["teacher_forced_check"]["exact_match"] >= 0.9


def test_committed_weights_stay_small():
    total = sum(builder.trained_files(name)["weights"].stat().st_size for name in CHECKPOINTS)
    assert total <= 25 * 2**20, total


def test_the_tokenizer_is_the_one_the_builder_makes_from_the_task():
    tok = make_task_tokenizer(resolve("trained-dense-bf16").text["vocab_size"])
    committed = json.loads(builder.trained_files("dense")["tokenizer"].read_text())
    assert json.loads(tok.to_str()) == committed


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = build_tiny_model(preset, root / preset)
        return cache[preset]

    return get


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_bf16_build_holds_the_committed_tensors(built, name):
    out = built(f"{CHECKPOINTS[name]}-bf16")
    committed = load_file(str(builder.trained_files(name)["weights"]))
    written = load_file(str(out / "model.safetensors"))
    assert written.keys() == committed.keys()
    assert all(torch.equal(written[k], committed[k]) for k in committed)
    assert _sha(out / "tokenizer.json") == _sha(builder.trained_files(name)["tokenizer"])
    stamp = json.loads((out / "tiny_model.json").read_text())
    assert stamp["trained_sha256"] == builder.trained_manifest(name)["sha256"]


def test_vl_build_holds_the_trained_language_model(built):
    """The trained VL presets: the committed dense language model under the release's
    VL names (``model.language_model.``), a vision tower of seeded random values beside
    it, the trained tokenizer, served text-only."""
    out = built("trained-vl-bf16")
    committed = load_file(str(builder.trained_files("dense")["weights"]))
    written = load_file(str(out / "model.safetensors"))
    renamed = {
        ("model.language_model." + k[len("model.") :] if k.startswith("model.") else k): v for k, v in committed.items()
    }
    assert {k for k in written if not k.startswith("model.visual.")} == renamed.keys()
    assert all(torch.equal(written[k], renamed[k]) for k in renamed)
    assert any(k.startswith("model.visual.") for k in written)
    assert builder.serve_args(out) == ["--language-model-only"]
    assert _sha(out / "tokenizer.json") == _sha(builder.trained_files("dense")["tokenizer"])
    fp8 = load_file(str(built("trained-vl-fp8") / "model.safetensors"))
    assert fp8["model.language_model.layers.3.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn


def test_fp8_build_quantizes_the_trained_weights(built):
    out = built("trained-dense-fp8")
    committed = load_file(str(builder.trained_files("dense")["weights"]))
    written = load_file(str(out / "model.safetensors"))
    name = "model.layers.3.self_attn.q_proj.weight"
    q, scale = written[name], written[name.replace(".weight", ".weight_scale_inv")]
    assert q.dtype == torch.float8_e4m3fn
    deq = q.float() * scale.float().repeat_interleave(128, 0).repeat_interleave(128, 1)
    ref = committed[name].float()
    assert ((deq - ref).norm() / ref.norm()).item() < 0.05  # e4m3 rounding, not a different tensor
    assert written["mtp.fc.weight"].dtype == torch.bfloat16  # kept bf16, as in the releases
    assert written["mtp.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    config = json.loads((out / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 1 and "mtp.fc" in config["quantization_config"]["modules_to_not_convert"]


def test_trained_presets_refuse_shape_changes_but_take_quantization():
    with pytest.raises(PresetError, match="ships trained weights: 'num_hidden_layers' cannot be changed"):
        resolve("trained-dense-fp8", {"num_hidden_layers": 8})
    assert resolve("trained-dense-fp8", {"quantization": "none"}).quantization == "none"


def test_a_checkpoint_that_does_not_match_its_manifest_is_refused(tmp_path, monkeypatch):
    files = builder.trained_files("dense")
    fake = {k: tmp_path / v.name for k, v in files.items()}
    for k, v in files.items():
        shutil.copy(v, fake[k])
    data = bytearray(fake["weights"].read_bytes())
    data[-1] ^= 1
    fake["weights"].write_bytes(bytes(data))
    monkeypatch.setattr(builder, "trained_files", lambda name: fake)
    with pytest.raises(PresetError, match="does not match its manifest"):
        build_tiny_model("trained-dense-bf16", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_the_trained_weights_know_the_task(built):
    """transformers' own Qwen3.5 on the built bf16 checkpoint, teacher forced on 8 unseen
    5-shot test questions: greedy decoding would write every reference answer."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    out = built("trained-dense-bf16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train, test = tiny_gsm8k.split()
    right = 0
    for i, item in enumerate(test[:8]):
        prompt = tok.encode(tiny_gsm8k.fewshot_prompt(item["question"], train[5 * i : 5 * i + 5])).ids
        answer = tok.encode(" " + item["answer"]).ids
        ids = torch.tensor([prompt + answer])
        pred = model(ids).logits[0, len(prompt) - 1 : -1].argmax(-1)
        right += torch.equal(pred, ids[0, len(prompt) :])
    assert right >= 7, right
