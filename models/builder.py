"""Build a tiny Qwen3.5 checkpoint that vLLM loads with its real loader.

    build_tiny_model("dense-fp8", "/tmp/tiny", seed=0, overrides={"num_hidden_layers": 4})

writes, into ``out_dir``: ``config.json``, ``generation_config.json``,
``model.safetensors`` (random weights at sane scales, see ``weights.py``, or for a
``trained-*`` preset the committed weights in ``trained/<name>/`` that ``train.py``
wrote; for ``quantization: fp8`` every Linear weight outside
``modules_to_not_convert`` in block FP8, see ``quantize.py``), a BPE tokenizer with a
chat template (see ``tokenizer.py``; a trained model gets the tokenizer it was trained
with, ``trained/tokenizer.json``) and ``tiny_model.json``, the stamp saying what was
built (the demo rebuilds when it no longer matches). The build happens in a sibling
temporary folder renamed into place, so ``out_dir`` is either the old model or
the complete new one. Presets and overrides are checked before anything is
written (``PresetError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .recipe import PresetError, Recipe, resolve

# Bump when the same (preset, seed, overrides) would produce different files.
BUILDER_VERSION = 1
STAMP = "tiny_model.json"

# What the Qwen3.5 FP8 releases keep in bf16, entry for entry. The shape of the
# list is that of ``quantization_config.modules_to_not_convert`` in the
# Qwen/Qwen3.5-*-FP8 and Qwen/Qwen3.6-35B-A3B-FP8 config.json files (as quoted,
# for example, in public code that mirrors the Qwen3.6-35B-A3B-FP8 list to decide
# which GEMMs run in FP8): "lm_head", "model.embed_tokens", then for every decoder
# layer "model.language_model.layers.<i>." + input_layernorm,
# post_attention_layernorm, (MoE) mlp.gate and mlp.shared_expert_gate, and either
# linear_attn.{A_log, conv1d, dt_bias, in_proj_a, in_proj_b, in_proj_ba, norm}
# (GDN layers; ``in_proj_ba`` is the fused name inference engines build) or
# self_attn.{k_norm, q_norm} (attention layers); the MTP block's
# mtp.{fc, norm, pre_fc_norm_embedding, pre_fc_norm_hidden} and its layer's norms
# and gates; and the vision tower's linears. The releases spell the prefixes for
# their VL layout; we keep that spelling for the text-only layout too (vLLM maps
# "model.language_model." onto "model." for Qwen3_5ForCausalLM). The MTP entries
# are kept verbatim although these tiny checkpoints carry no MTP weights; the
# vision merger's two linears are listed here too (the tower is bf16 throughout).
_GDN_KEEP = ("A_log", "conv1d", "dt_bias", "in_proj_a", "in_proj_b", "in_proj_ba", "norm")
_ATTN_KEEP = ("k_norm", "q_norm")
_MTP_KEEP = (
    "mtp.fc",
    "mtp.layers.0.input_layernorm",
    "mtp.layers.0.post_attention_layernorm",
    "mtp.layers.0.self_attn.k_norm",
    "mtp.layers.0.self_attn.q_norm",
    "mtp.norm",
    "mtp.pre_fc_norm_embedding",
    "mtp.pre_fc_norm_hidden",
)
_MTP_MOE_KEEP = ("mtp.layers.0.mlp.gate", "mtp.layers.0.mlp.shared_expert_gate")

Progress = Callable[[str], None]


def modules_to_not_convert(recipe: Recipe) -> list[str]:
    """The FP8 release's bf16 module list for this recipe's layers (sorted, as released)."""
    mods = ["lm_head", "model.embed_tokens"]
    for i, layer_type in enumerate(recipe.layer_types()):
        layer = f"model.language_model.layers.{i}."
        mods += [layer + "input_layernorm", layer + "post_attention_layernorm"]
        if recipe.is_moe:
            mods += [layer + "mlp.gate", layer + "mlp.shared_expert_gate"]
        if layer_type == "linear_attention":
            mods += [layer + "linear_attn." + s for s in _GDN_KEEP]
        else:
            mods += [layer + "self_attn." + s for s in _ATTN_KEEP]
    mods += list(_MTP_KEEP) + (list(_MTP_MOE_KEEP) if recipe.is_moe else [])
    if recipe.is_vl:
        for i in range(recipe.config["vision_config"]["depth"]):
            block = f"model.visual.blocks.{i}."
            mods += [block + s for s in ("attn.proj", "attn.qkv", "mlp.linear_fc1", "mlp.linear_fc2")]
        mods += ["model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2"]
    return sorted(mods)


def quantization_config(recipe: Recipe) -> dict[str, Any]:
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": modules_to_not_convert(recipe),
    }


def _canonical_module(name: str) -> str:
    """A module's name as the release lists it (VL spelling of the language model)."""
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        name = "model.language_model." + name[len("model.") :]
    return name.replace("model.language_model.embed_tokens", "model.embed_tokens")


def quantized_modules(recipe: Recipe) -> set[str]:
    """Checkpoint names of the modules whose weights are stored in FP8."""
    from .weights import all_specs

    if recipe.quantization != "fp8":
        return set()
    keep = set(modules_to_not_convert(recipe))
    return {s.module for s in all_specs(recipe) if s.linear and _canonical_module(s.module) not in keep}


def trained_files(name: str) -> dict[str, Path]:
    """The committed files of trained checkpoint ``name``: weights, manifest, tokenizer."""
    from importlib import resources

    root = Path(str(resources.files(__package__).joinpath("trained")))
    return {
        "weights": root / name / "model.safetensors",
        "manifest": root / name / "manifest.json",
        "tokenizer": root / "tokenizer.json",
    }


def trained_manifest(name: str) -> dict[str, Any]:
    """The manifest of trained checkpoint ``name`` (how it was trained, what it scored)."""
    path = trained_files(name)["manifest"]
    if not path.is_file():
        raise PresetError(f"trained checkpoint {name!r} is not in this installation ({path.name} missing)")
    return json.loads(path.read_text())


def _trained_name(recipe: Recipe, name: str) -> str:
    """The name tensor ``name`` of ``recipe`` has in a trained checkpoint (the text
    layout: a VL recipe's ``model.language_model.`` is the checkpoint's ``model.``)."""
    if recipe.is_vl and name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def load_trained(recipe: Recipe) -> dict[str, Any]:
    """The trained tensors of ``recipe`` under the recipe's names, after checking them
    against the manifest's sha256 and the preset's tensor list (names, shapes, dtypes).
    A VL recipe takes the language model from the checkpoint (which holds the text
    layout); its vision tower, which text-only serving never runs, is not in it."""
    from safetensors.torch import load_file

    from .weights import all_specs

    name = recipe.trained
    if name is None:
        raise PresetError(f"preset {recipe.name!r} has random weights, no trained checkpoint")
    files, manifest = trained_files(name), trained_manifest(name)
    for key, path in (("model.safetensors", files["weights"]), ("tokenizer.json", files["tokenizer"])):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != manifest["sha256"][key]:
            raise PresetError(
                f"{path.name} of trained checkpoint {recipe.trained!r} does not match its "
                f"manifest (sha256 {digest[:12]}..., expected {manifest['sha256'][key][:12]}...)"
            )
    stored = load_file(str(files["weights"]))
    specs = [s for s in all_specs(recipe) if not s.name.startswith("model.visual.")]
    tensors = {s.name: stored[_trained_name(recipe, s.name)] for s in specs if _trained_name(recipe, s.name) in stored}
    names = {s.name for s in specs}
    if len(tensors) != len(names) or len(stored) != len(names):
        raise PresetError(
            f"trained checkpoint {recipe.trained!r} does not fit preset {recipe.name!r}: "
            f"missing {sorted(names - set(tensors))[:5]}, "
            f"extra {sorted(set(stored) - {_trained_name(recipe, n) for n in names})[:5]}"
        )
    for spec in specs:
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise PresetError(
                f"trained tensor {spec.name}: {tuple(t.shape)} {t.dtype}, preset expects {spec.shape} {spec.dtype}"
            )
    return tensors


def stamp_for(recipe: Recipe, seed: int) -> dict[str, Any]:
    """What identifies a build: equal stamps mean equal files."""
    corpus = recipe.builder.get("tokenizer_corpus")
    recipe_json = json.dumps({"config": recipe.config, "builder": recipe.builder}, sort_keys=True)
    trained = trained_manifest(recipe.trained)["sha256"] if recipe.trained else None
    return {
        "builder_version": BUILDER_VERSION,
        "preset": recipe.name,
        "seed": seed,
        "overrides": recipe.overrides,
        "recipe_sha256": hashlib.sha256(recipe_json.encode()).hexdigest(),
        "tokenizer_corpus_sha256": hashlib.sha256(Path(corpus).read_bytes()).hexdigest() if corpus else None,
        "trained_sha256": trained,
    }


def read_stamp(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / STAMP
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(out_dir: str | Path, preset: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> bool:
    """True if ``out_dir`` holds a complete build of exactly this (preset, seed, overrides)."""
    stamp = read_stamp(out_dir)
    if stamp is None or not (Path(out_dir) / "model.safetensors").is_file():
        return False
    try:
        expected = stamp_for(resolve(preset, overrides), seed)
    except (PresetError, OSError):
        return False
    return {k: stamp.get(k) for k in expected} == expected


def serve_args(out_dir: str | Path) -> list[str]:
    """Extra ``vllm serve`` arguments the built model needs (e.g. --language-model-only)."""
    stamp = read_stamp(out_dir) or {}
    return list(stamp.get("serve_args", []))


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PresetError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and read_stamp(out) is None:
        raise PresetError(
            f"--out {out} is a non-empty folder that does not hold a tiny model (no {STAMP}); refusing to overwrite it"
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_files(recipe: Recipe, seed: int, tmp: Path, progress: Progress) -> None:
    import torch
    from safetensors.torch import save_file

    from .quantize import quantize_block_fp8
    from .tokenizer import EOS_TOKEN, PAD_TOKEN, save_tokenizer, token_id, train_tokenizer
    from .weights import all_specs, make_tensor

    text = recipe.text
    trained = load_trained(recipe) if recipe.trained else None
    if trained is not None and recipe.trained is not None:
        from tokenizers import Tokenizer

        progress(f"using trained checkpoint {recipe.trained!r} and its tokenizer")
        tok = Tokenizer.from_file(str(trained_files(recipe.trained)["tokenizer"]))
    else:
        progress(f"training a {text['vocab_size']}-entry byte-level BPE tokenizer")
        tok = train_tokenizer(text["vocab_size"], recipe.builder.get("tokenizer_corpus"))
    save_tokenizer(tok, tmp, model_max_length=text["max_position_embeddings"])
    eos, pad = token_id(tok, EOS_TOKEN), token_id(tok, PAD_TOKEN)

    config = json.loads(json.dumps(recipe.config))
    target = config["text_config"] if recipe.is_vl else config
    target.update({"bos_token_id": pad, "eos_token_id": pad, "pad_token_id": None})
    if recipe.is_vl:
        config.update(
            {
                name: token_id(tok, tok_text)
                for name, tok_text in (
                    ("image_token_id", "<|image_pad|>"),
                    ("video_token_id", "<|video_pad|>"),
                    ("vision_start_token_id", "<|vision_start|>"),
                    ("vision_end_token_id", "<|vision_end|>"),
                )
            }
        )
    if recipe.quantization == "fp8":
        config["quantization_config"] = quantization_config(recipe)
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", {"bos_token_id": pad, "eos_token_id": [eos, pad], "pad_token_id": pad})

    specs = all_specs(recipe)
    fp8 = quantized_modules(recipe)
    source = f"trained checkpoint {recipe.trained!r}" if trained is not None else f"seed {seed}"
    progress(
        f"writing {len(specs)} tensors ({source})" + (f", {len(fp8)} linear weights in block FP8" if fp8 else ", bf16")
    )
    tensors: dict[str, torch.Tensor] = {}
    for spec in specs:
        value = trained[spec.name] if trained is not None and spec.name in trained else make_tensor(spec, seed)
        if spec.module in fp8:
            q, scale_inv = quantize_block_fp8(value)
            tensors[spec.name] = q
            tensors[spec.module + ".weight_scale_inv"] = scale_inv
        else:
            tensors[spec.name] = value
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    stamp = stamp_for(recipe, seed)
    stamp.update(
        {
            "serve_args": recipe.builder.get("serve_args", []),
            "architecture": config["architectures"][0],
            "quantization": recipe.quantization,
            "parameters": sum(t.numel() for t in tensors.values() if t.dim() >= 1),
        }
    )
    _write_json(tmp / STAMP, stamp)


def build_tiny_model(
    preset: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    *,
    progress: Progress | None = None,
) -> Path:
    """Build the tiny model ``preset`` (with ``overrides``) into ``out_dir``; return its path.

    Raises ``PresetError`` (a ``ValueError``) for an unknown preset, an unknown
    override key, or sizes vLLM cannot serve at the preset's TP sizes, before
    anything is written. Deterministic: the same arguments give the same files.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PresetError(f"seed must be a non-negative integer, got {seed!r}")
    recipe = resolve(preset, overrides)
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)
    report = progress or (lambda msg: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_files(recipe, seed, tmp, report)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"wrote {out}")
    return out
