"""Presets (``presets/<name>.json``), ``--set`` overrides and the checks that run
before anything is written.

A preset is ``{"description", "builder": {...}, "config": {...}}`` (or
``{"extends": "<preset>", "description", "builder": {...}}``: the named preset with
these builder options changed) where
``config`` is a ``config.json`` of the real Qwen3.5 family minus what the builder
derives (``layer_types`` from ``full_attention_interval``, the token ids, the
vision tower's ``out_hidden_size``, ``quantization_config``). For the VL layout
(``Qwen3_5ForConditionalGeneration``) the language model's keys live under
``config.text_config`` as in the releases.

Builder options:
  quantization      "fp8" (block FP8 like the releases) or "none" (bf16)
  tp_sizes          tensor-parallel sizes every partition is checked for (x128)
  tokenizer_corpus  a UTF-8 text file to learn the BPE merges from (default: built-in text)
  serve_args        extra ``vllm serve`` arguments this layout needs (e.g. --language-model-only)
  weights           "random" (seeded random values, ``weights.py``) or the name of a trained
                    checkpoint shipped in ``trained/`` (its config keys cannot be overridden)
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

PARTITION = 128  # every TP partition of every projection is a multiple of this (FP8 blocks)
BUILDER_KEYS = ("quantization", "tp_sizes", "tokenizer_corpus", "serve_args", "weights")
QUANTIZATIONS = ("fp8", "none")
LAYER_TYPES = ("linear_attention", "full_attention")


class PresetError(ValueError):
    """A preset or an override the builder cannot build (raised before writing anything)."""


@dataclass
class Recipe:
    """A preset with overrides applied: what the builder builds."""

    name: str
    config: dict[str, Any]  # config.json as it will be written, minus token ids
    builder: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def is_vl(self) -> bool:
        return "text_config" in self.config

    @property
    def text(self) -> dict[str, Any]:
        """The language model's config (``text_config`` for the VL layout)."""
        return self.config["text_config"] if self.is_vl else self.config

    @property
    def is_moe(self) -> bool:
        return int(self.text.get("num_experts", 0) or 0) > 0

    @property
    def quantization(self) -> str:
        return self.builder["quantization"]

    @property
    def trained(self) -> str | None:
        """The trained checkpoint this recipe ships (``trained/<name>``), or None (random)."""
        weights = self.builder.get("weights", "random")
        return None if weights == "random" else weights

    def layer_types(self) -> list[str]:
        return list(self.text["layer_types"])


def list_presets() -> list[str]:
    folder = resources.files(__package__).joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    names = list_presets()
    if name not in names:
        raise PresetError(f"unknown preset {name!r}; presets: {', '.join(names)}")
    text = resources.files(__package__).joinpath("presets").joinpath(f"{name}.json").read_text()
    preset = json.loads(text)
    base_name = preset.pop("extends", None)
    if base_name is not None:
        base = load_preset(base_name)
        base["builder"] = {**base.get("builder", {}), **preset.get("builder", {})}
        base["description"] = preset.get("description", base.get("description", ""))
        preset = base
    return preset


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are JSON when they parse (numbers,
    lists, true/false/null), else strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PresetError(f"override {item!r} is not of the form key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _known_keys(preset: dict[str, Any]) -> list[str]:
    cfg = preset["config"]
    text = cfg.get("text_config", cfg)
    keys = [k for k in text if k not in ("architectures", "model_type")] + ["layer_types"]
    if "vision_config" in cfg:
        keys += [f"vision_config.{k}" for k in cfg["vision_config"] if k != "model_type"]
    return sorted(set(keys)) + list(BUILDER_KEYS)


def resolve(preset_name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a preset, apply overrides, derive ``layer_types`` and check everything."""
    preset = load_preset(preset_name)
    config = copy.deepcopy(preset["config"])
    builder = {
        "quantization": "none",
        "tp_sizes": [1, 2],
        "tokenizer_corpus": None,
        "serve_args": [],
        "weights": "random",
    }
    builder.update(copy.deepcopy(preset.get("builder", {})))
    overrides = dict(overrides or {})
    known = _known_keys(preset)
    text = config.get("text_config", config)
    explicit_layer_types = "layer_types" in text
    for key, value in overrides.items():
        if key not in known:
            raise PresetError(f"unknown key {key!r} for preset {preset_name!r}; known keys: {', '.join(known)}")
        if builder.get("weights", "random") != "random" and key not in ("quantization", "tp_sizes", "serve_args"):
            raise PresetError(
                f"preset {preset_name!r} ships trained weights: {key!r} cannot be changed "
                "(only quantization, tp_sizes and serve_args can)"
            )
        if key in BUILDER_KEYS:
            builder[key] = value
        elif key.startswith("vision_config."):
            config["vision_config"][key.split(".", 1)[1]] = value
        else:
            text[key] = value
            explicit_layer_types |= key == "layer_types"
    if not explicit_layer_types:
        interval = text.get("full_attention_interval", 4)
        layers = text.get("num_hidden_layers")
        if isinstance(interval, int) and interval > 0 and isinstance(layers, int) and layers > 0:
            text["layer_types"] = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
            ]
    if "vision_config" in config:
        config["vision_config"]["out_hidden_size"] = text.get("hidden_size")
    recipe = Recipe(name=preset_name, config=config, builder=builder, overrides=overrides)
    problems = check(recipe)
    if problems:
        raise PresetError(
            f"preset {preset_name!r}"
            + (f" with overrides {overrides}" if overrides else "")
            + " cannot be built:\n  - "
            + "\n  - ".join(problems)
        )
    return recipe


# --- checks --------------------------------------------------------------------------


def _positive_int(text: dict, key: str, problems: list[str]) -> int:
    """``text[key]`` if it is a positive integer; else a problem is recorded and 0
    returned (callers return the problems before they use any value)."""
    value = text.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(f"{key} must be a positive integer, got {value!r}")
        return 0
    return value


def _partition(problems: list[str], what: str, size: int, tp: int) -> None:
    if size % tp or (size // tp) % PARTITION:
        problems.append(f"{what} = {size} gives a TP={tp} partition of {size / tp:g}, not a multiple of {PARTITION}")


def check(recipe: Recipe) -> list[str]:
    """Every reason this recipe cannot be built and served at its tp_sizes (empty: fine)."""
    problems: list[str] = []
    b, t = recipe.builder, recipe.text
    if b.get("quantization") not in QUANTIZATIONS:
        problems.append(f"quantization must be one of {QUANTIZATIONS}, got {b.get('quantization')!r}")
    tps = b.get("tp_sizes")
    if not isinstance(tps, list) or not tps or not all(isinstance(x, int) and x > 0 for x in tps):
        problems.append(f"tp_sizes must be a non-empty list of positive integers, got {tps!r}")
        tps = [1]
    corpus = b.get("tokenizer_corpus")
    if corpus is not None and (not isinstance(corpus, str) or not os.path.isfile(corpus)):
        problems.append(f"tokenizer_corpus must be an existing text file, got {corpus!r} (file not found)")
    weights = b.get("weights", "random")
    if not isinstance(weights, str) or not weights or "/" in weights or weights.startswith("."):
        problems.append(f"weights must be 'random' or the name of a trained checkpoint, got {weights!r}")
    if not isinstance(b.get("serve_args"), list):
        problems.append(f"serve_args must be a list of strings, got {b.get('serve_args')!r}")

    ints = {
        k: _positive_int(t, k, problems)
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "max_position_embeddings",
        )
    }
    mlp_keys = (
        ("moe_intermediate_size", "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok")
        if recipe.is_moe
        else ("intermediate_size",)
    )
    ints.update({k: _positive_int(t, k, problems) for k in mlp_keys})
    if problems:
        return problems

    h, layers = ints["hidden_size"], ints["num_hidden_layers"]
    layer_types = t.get("layer_types")
    if not isinstance(layer_types, list) or len(layer_types) != layers:
        problems.append(f"layer_types must list {layers} entries (num_hidden_layers), got {layer_types!r}")
    elif any(x not in LAYER_TYPES for x in layer_types):
        problems.append(f"layer_types entries must be one of {LAYER_TYPES}, got {layer_types!r}")
    if ints["vocab_size"] < 512:
        problems.append(f"vocab_size must be >= 512 (bytes + special tokens + merges), got {ints['vocab_size']}")
    rotary = t.get("partial_rotary_factor", 0.25) * ints["head_dim"]
    if rotary != int(rotary) or int(rotary) % 2:
        problems.append(f"head_dim * partial_rotary_factor = {rotary:g} must be an even integer")
    nh, nkv, hd = ints["num_attention_heads"], ints["num_key_value_heads"], ints["head_dim"]
    nk, nv = ints["linear_num_key_heads"], ints["linear_num_value_heads"]
    kd, vd = nk * ints["linear_key_head_dim"], nv * ints["linear_value_head_dim"]
    if nh % nkv:
        problems.append(f"num_attention_heads ({nh}) must be a multiple of num_key_value_heads ({nkv})")
    if nv % nk:
        problems.append(f"linear_num_value_heads ({nv}) must be a multiple of linear_num_key_heads ({nk})")
    if h % PARTITION:
        problems.append(f"hidden_size = {h} must be a multiple of {PARTITION} (FP8 blocks, fused-op groups)")
    for tp in tps:
        for what, heads in (
            ("num_attention_heads", nh),
            ("num_key_value_heads", nkv),
            ("linear_num_key_heads", nk),
            ("linear_num_value_heads", nv),
        ):
            if heads % tp:
                problems.append(f"{what} = {heads} does not split across TP={tp}")
        _partition(problems, "q_proj rows (2 * num_attention_heads * head_dim, query + gate)", 2 * nh * hd, tp)
        _partition(problems, "k_proj/v_proj rows (num_key_value_heads * head_dim)", nkv * hd, tp)
        _partition(problems, "o_proj columns (num_attention_heads * head_dim)", nh * hd, tp)
        _partition(problems, "GDN key dim (linear_num_key_heads * linear_key_head_dim)", kd, tp)
        _partition(problems, "GDN value dim (linear_num_value_heads * linear_value_head_dim)", vd, tp)
        if recipe.is_moe:
            _partition(problems, "moe_intermediate_size", ints["moe_intermediate_size"], tp)
            _partition(problems, "shared_expert_intermediate_size", ints["shared_expert_intermediate_size"], tp)
            if ints["num_experts"] < tp:
                problems.append(f"num_experts = {ints['num_experts']} is fewer than TP={tp}")
        else:
            _partition(problems, "intermediate_size", ints["intermediate_size"], tp)
    if recipe.is_moe and ints["num_experts_per_tok"] > ints["num_experts"]:
        problems.append(
            f"num_experts_per_tok ({ints['num_experts_per_tok']}) exceeds num_experts ({ints['num_experts']})"
        )
    if recipe.is_vl:
        problems += _check_vision(recipe.config["vision_config"])
    if not problems:
        problems += _check_with_transformers(recipe)
    return problems


def _check_vision(v: dict) -> list[str]:
    problems: list[str] = []
    ints = {
        k: _positive_int(v, k, problems)
        for k in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "patch_size",
            "spatial_merge_size",
            "temporal_patch_size",
            "in_channels",
            "num_position_embeddings",
        )
    }
    if problems:
        return [f"vision_config: {p}" for p in problems]
    if ints["hidden_size"] % ints["num_heads"]:
        problems.append("vision_config: hidden_size must be a multiple of num_heads")
    side = round(ints["num_position_embeddings"] ** 0.5)
    if side * side != ints["num_position_embeddings"]:
        problems.append("vision_config: num_position_embeddings must be a square (a grid of positions)")
    return problems


def _check_with_transformers(recipe: Recipe) -> list[str]:
    """Let transformers' own (strict) config classes validate the config, as
    vLLM will when it loads it. Skipped where transformers is not installed."""
    try:
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - transformers comes with vLLM
        return []
    cfg = copy.deepcopy(recipe.config)
    model_type = cfg.pop("model_type")
    try:
        AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises several types
        return [f"transformers rejects the config ({type(e).__name__}): {e}"]
    return []
