"""The kinds of norm site a Qwen3.5 decoder has, and what each hands its consumer.

Shared by the model overrides (startup report) and ``doctor`` (what each site
kind would run here), so both speak of the same sites.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteKind:
    key: str
    title: str
    quantize: bool  # hands (fp8, scale) to an FP8 block GEMM
    emit_bf16: bool  # also hands the bf16 activation (GDN in_proj_ba)
    consumer: str


ATTENTION_INPUT = SiteKind("attn_input", "attention input", True, False, "self_attn.qkv_proj (FP8 block GEMM)")
GDN_INPUT = SiteKind("gdn_input", "GDN input", True, True, "linear_attn.in_proj_qkvz (FP8) + in_proj_ba (bf16)")
POST_ATTN_DENSE = SiteKind(
    "post_attn_dense", "post-attention (dense MLP)", True, False, "mlp.gate_up_proj (FP8 block GEMM)"
)
POST_ATTN_MOE = SiteKind("post_attn_moe", "post-attention (MoE)", False, False, "router + experts (bf16 input)")
FINAL_NORM = SiteKind("final_norm", "final norm", False, False, "lm_head (bf16)")

SITE_KINDS: tuple[SiteKind, ...] = (ATTENTION_INPUT, GDN_INPUT, POST_ATTN_DENSE, POST_ATTN_MOE, FINAL_NORM)
