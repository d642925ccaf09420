"""Every tensor of a tiny Qwen3.5 checkpoint: its Hugging Face name, shape, dtype
and initializer, and the deterministic random values.

Names and shapes are those of the releases (``transformers``' Qwen3.5 modules
and vLLM's loader read them): the language model under ``model.`` (text layout)
or ``model.language_model.`` (VL layout), ``lm_head`` at the top, the vision tower
under ``model.visual.``; MoE experts one tensor per expert
(``mlp.experts.<e>.{gate,up,down}_proj``), as in the FP8 releases.

Values: each tensor draws from its own generator, seeded from (seed, the tensor's
layout-independent name), so a tensor's values do not depend on which other
tensors exist or their order: the bf16 and FP8 builds of one seed, and the text
and VL layouts, hold the same language-model weights.

Scales (why the activations stay O(1) through the depth, and the logits are
neither flat nor one-hot): input projections ~ N(0, 1/fan_in) keep a normalized
input's RMS; output projections (o_proj, out_proj, down_proj) ~ N(0, 0.25/fan_in),
so each residual branch adds a fraction of what the stream holds (the hidden RMS
grows from 1.0 to about 1.45 over 8 layers; full-size branches make the model so
chaotic that FP8 rounding flips most greedy tokens); norms are (1 + w) with
w ~ N(0, 0.1^2) (a zero-centred Gemma norm that is not the identity); the GDN
decay follows Mamba's init (A in [1, 16], dt in [1e-3, 1e-1]); lm_head gives
logits with a standard deviation of about 3.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .recipe import Recipe

LOGIT_STD = 3.0
RESIDUAL_OUT_GAIN = 0.5  # std multiplier of o_proj / out_proj / down_proj


@dataclass(frozen=True)
class TensorSpec:
    key: str  # layout-independent name ("layers.3.self_attn.q_proj.weight")
    name: str  # name in the checkpoint
    shape: tuple[int, ...]
    init: str  # see _INITS
    std: float = 0.0
    dtype: torch.dtype = torch.bfloat16
    linear: bool = False  # the weight of a Linear (quantizable) module

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def _gen(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"vllm-rocm-fused/tiny/{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _values(spec: TensorSpec, seed: int) -> torch.Tensor:
    g = _gen(seed, spec.key)
    if spec.init == "normal":
        t = torch.randn(spec.shape, generator=g) * spec.std
    elif spec.init == "one_plus_normal":  # plain-scale norms (x * w)
        t = 1.0 + torch.randn(spec.shape, generator=g) * spec.std
    elif spec.init == "A_log":  # A ~ U[1, 16], stored as log(A)
        t = torch.log(1.0 + 15.0 * torch.rand(spec.shape, generator=g))
    elif spec.init == "dt_bias":  # softplus^-1(dt), dt log-uniform in [1e-3, 1e-1]
        dt = torch.exp(math.log(1e-3) + (math.log(1e-1) - math.log(1e-3)) * torch.rand(spec.shape, generator=g))
        t = dt + torch.log(-torch.expm1(-dt))
    else:  # pragma: no cover - specs only use the kinds above
        raise ValueError(f"unknown init {spec.init!r}")
    return t.to(spec.dtype)


def make_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    return _values(spec, seed)


# --- the tensor list -------------------------------------------------------------------


def _lin(
    key: str, name: str, out_f: int, in_f: int, *, residual_out: bool = False, std: float | None = None
) -> TensorSpec:
    if std is None:
        std = (RESIDUAL_OUT_GAIN if residual_out else 1.0) / in_f**0.5
    return TensorSpec(key, name, (out_f, in_f), "normal", std, linear=True)


def _norm(key: str, name: str, size: int, *, gemma: bool = True) -> TensorSpec:
    # Gemma-style norms compute x * (1 + w): w is stored near 0. The GDN's gated
    # norm computes x * w: w is stored near 1.
    return TensorSpec(key, name, (size,), "normal" if gemma else "one_plus_normal", 0.1)


def language_model_specs(recipe: Recipe) -> list[TensorSpec]:
    t = recipe.text
    lm = "model.language_model." if recipe.is_vl else "model."
    h, v = t["hidden_size"], t["vocab_size"]
    specs = [
        TensorSpec("embed_tokens.weight", f"{lm}embed_tokens.weight", (v, h), "normal", 1.0),
        _norm("norm.weight", f"{lm}norm.weight", h),
        _lin("lm_head.weight", "lm_head.weight", v, h, std=LOGIT_STD / h**0.5),
    ]
    for i, layer_type in enumerate(recipe.layer_types()):
        specs += _decoder_layer_specs(recipe, f"layers.{i}.", f"{lm}layers.{i}.", layer_type)
    specs += mtp_specs(recipe)
    return specs


def _decoder_layer_specs(recipe: Recipe, k: str, n: str, layer_type: str) -> list[TensorSpec]:
    """One decoder layer's tensors: key prefix ``k``, checkpoint prefix ``n``."""
    t = recipe.text
    h = t["hidden_size"]
    nh, nkv, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    nk, nv = t["linear_num_key_heads"], t["linear_num_value_heads"]
    dk, dv = t["linear_key_head_dim"], t["linear_value_head_dim"]
    kd, vd, kernel = nk * dk, nv * dv, t["linear_conv_kernel_dim"]
    specs = [
        _norm(k + "input_layernorm.weight", n + "input_layernorm.weight", h),
        _norm(k + "post_attention_layernorm.weight", n + "post_attention_layernorm.weight", h),
    ]
    if layer_type == "linear_attention":
        a, an = k + "linear_attn.", n + "linear_attn."
        specs += [
            _lin(a + "in_proj_qkv.weight", an + "in_proj_qkv.weight", 2 * kd + vd, h),
            _lin(a + "in_proj_z.weight", an + "in_proj_z.weight", vd, h),
            _lin(a + "in_proj_b.weight", an + "in_proj_b.weight", nv, h),
            _lin(a + "in_proj_a.weight", an + "in_proj_a.weight", nv, h),
            TensorSpec(a + "conv1d.weight", an + "conv1d.weight", (2 * kd + vd, 1, kernel), "normal", kernel**-0.5),
            TensorSpec(a + "dt_bias", an + "dt_bias", (nv,), "dt_bias"),
            TensorSpec(a + "A_log", an + "A_log", (nv,), "A_log", dtype=torch.float32),
            _norm(a + "norm.weight", an + "norm.weight", dv, gemma=False),
            _lin(a + "out_proj.weight", an + "out_proj.weight", h, vd, residual_out=True),
        ]
    else:
        a, an = k + "self_attn.", n + "self_attn."
        specs += [
            # query and output gate interleaved per head: [head0 q | head0 gate | head1 q | ...]
            _lin(a + "q_proj.weight", an + "q_proj.weight", 2 * nh * hd, h),
            _lin(a + "k_proj.weight", an + "k_proj.weight", nkv * hd, h),
            _lin(a + "v_proj.weight", an + "v_proj.weight", nkv * hd, h),
            _lin(a + "o_proj.weight", an + "o_proj.weight", h, nh * hd, residual_out=True),
            _norm(a + "q_norm.weight", an + "q_norm.weight", hd),
            _norm(a + "k_norm.weight", an + "k_norm.weight", hd),
        ]
    m, mn = k + "mlp.", n + "mlp."
    if recipe.is_moe:
        ie, ish = t["moe_intermediate_size"], t["shared_expert_intermediate_size"]
        specs.append(_lin(m + "gate.weight", mn + "gate.weight", t["num_experts"], h))
        for e in range(t["num_experts"]):
            x, xn = f"{m}experts.{e}.", f"{mn}experts.{e}."
            specs += [
                _lin(x + "gate_proj.weight", xn + "gate_proj.weight", ie, h),
                _lin(x + "up_proj.weight", xn + "up_proj.weight", ie, h),
                _lin(x + "down_proj.weight", xn + "down_proj.weight", h, ie, residual_out=True),
            ]
        s, sn = m + "shared_expert.", mn + "shared_expert."
        specs += [
            _lin(s + "gate_proj.weight", sn + "gate_proj.weight", ish, h),
            _lin(s + "up_proj.weight", sn + "up_proj.weight", ish, h),
            _lin(s + "down_proj.weight", sn + "down_proj.weight", h, ish, residual_out=True),
            _lin(m + "shared_expert_gate.weight", mn + "shared_expert_gate.weight", 1, h),
        ]
    else:
        inter = t["intermediate_size"]
        specs += [
            _lin(m + "gate_proj.weight", mn + "gate_proj.weight", inter, h),
            _lin(m + "up_proj.weight", mn + "up_proj.weight", inter, h),
            _lin(m + "down_proj.weight", mn + "down_proj.weight", h, inter, residual_out=True),
        ]
    return specs


def mtp_specs(recipe: Recipe) -> list[TensorSpec]:
    """The multi-token-prediction block of the releases (``mtp_num_hidden_layers`` > 0):
    ``mtp.fc`` (2 * hidden -> hidden, over [normed embedding of the next token | normed
    hidden state]), its two pre-fc norms, full-attention decoder layers ``mtp.layers.N``
    (MoE when the model is) and ``mtp.norm``. It shares the model's embedding and lm_head."""
    t = recipe.text
    layers = int(t.get("mtp_num_hidden_layers", 0) or 0)
    if not layers:
        return []
    h = t["hidden_size"]
    specs = [
        _lin("mtp.fc.weight", "mtp.fc.weight", h, 2 * h),
        _norm("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_embedding.weight", h),
        _norm("mtp.pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_hidden.weight", h),
        _norm("mtp.norm.weight", "mtp.norm.weight", h),
    ]
    for i in range(layers):
        specs += _decoder_layer_specs(recipe, f"mtp.layers.{i}.", f"mtp.layers.{i}.", "full_attention")
    return specs


def vision_specs(recipe: Recipe) -> list[TensorSpec]:
    """The vision tower (never run here: the VL preset is served text-only)."""
    vc = recipe.config["vision_config"]
    h, inter, out = vc["hidden_size"], vc["intermediate_size"], vc["out_hidden_size"]
    p, tp, c = vc["patch_size"], vc["temporal_patch_size"], vc["in_channels"]
    merged = h * vc["spatial_merge_size"] ** 2

    def bias(key: str, size: int) -> TensorSpec:
        return TensorSpec(key, "model." + key, (size,), "normal", 0.02)

    def lin(key: str, out_f: int, in_f: int) -> list[TensorSpec]:
        return [_lin(key + ".weight", f"model.{key}.weight", out_f, in_f), bias(key + ".bias", out_f)]

    def layer_norm(key: str, size: int) -> list[TensorSpec]:
        return [
            TensorSpec(key + ".weight", f"model.{key}.weight", (size,), "one_plus_normal", 0.1),
            bias(key + ".bias", size),
        ]

    specs = [
        TensorSpec(
            "visual.patch_embed.proj.weight",
            "model.visual.patch_embed.proj.weight",
            (h, c, tp, p, p),
            "normal",
            (c * tp * p * p) ** -0.5,
        ),
        bias("visual.patch_embed.proj.bias", h),
        TensorSpec(
            "visual.pos_embed.weight",
            "model.visual.pos_embed.weight",
            (vc["num_position_embeddings"], h),
            "normal",
            0.02,
        ),
    ]
    for i in range(vc["depth"]):
        b = f"visual.blocks.{i}."
        specs += layer_norm(b + "norm1", h) + layer_norm(b + "norm2", h)
        specs += lin(b + "attn.qkv", 3 * h, h) + lin(b + "attn.proj", h, h)
        specs += lin(b + "mlp.linear_fc1", inter, h) + lin(b + "mlp.linear_fc2", h, inter)
    specs += layer_norm("visual.merger.norm", h)
    specs += lin("visual.merger.linear_fc1", merged, merged) + lin("visual.merger.linear_fc2", out, merged)
    return specs


def all_specs(recipe: Recipe) -> list[TensorSpec]:
    specs = language_model_specs(recipe)
    if recipe.is_vl:
        specs += vision_specs(recipe)
    return specs
