"""Availability (aiter missing, raising at import, too old) and what doctor says."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from support.fake_aiter import import_error
from vllm_rocm_fused.backends.rocm.aiter_api import RocmEnvironment
from vllm_rocm_fused.cli import doctor


def doctor_text(world_size=2, tokens=(1, 64, 8192)) -> str:
    args = argparse.Namespace(json=False, world_size=world_size, hidden=4096, tokens=list(tokens), dtype="bfloat16")
    return doctor.render(doctor.collect(args))


def site_block(text: str, title: str) -> str:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {title}:"))
    ends = [i for i in range(start + 1, len(lines)) if not lines[i].startswith("      ")]
    end = ends[0] if ends else len(lines)
    return "\n".join(lines[start:end])


def test_no_rocm_torch_is_explained_plainly(rocm):
    rocm.backend.set_environment(RocmEnvironment())
    if torch.version.hip is not None:
        pytest.skip("this torch is a ROCm build")
    reason = rocm.backend.unavailable_reason()
    assert "not a ROCm build" in reason and "torch.version.hip is None" in reason
    assert "aiter" not in sys.modules  # never imported on a non-ROCm box
    text = doctor_text()
    assert "rocm: unavailable: torch" in site_block(text, "attention input")
    assert "backend rocm: aiter: not probed (torch is not a ROCm build)" in text


def test_import_raising_runtime_error_is_unavailable_with_reason(rocm):
    rocm.use("import_error")
    assert "aiter" not in sys.modules  # the import is lazy...
    reason = rocm.backend.unavailable_reason()  # ...and any exception is "unavailable"
    assert reason == f"aiter import failed: RuntimeError: {import_error.MESSAGE}"
    text = doctor_text()
    assert f"rocm: unavailable: aiter import failed: RuntimeError: {import_error.MESSAGE}" in text
    assert "backend rocm: aiter: import failed: RuntimeError" in text


def test_aiter_without_any_fused_api_is_unavailable(rocm):
    rocm.use("ancient")
    reason = rocm.backend.unavailable_reason()
    assert "aiter 0.1.7 has no fused all-reduce + RMSNorm API" in reason
    assert "rocm: unavailable: aiter 0.1.7 has no fused" in doctor_text()


def test_old_aiter_without_per_group_uses_two_kernels(rocm):
    rocm.use("v0_1_13", "gfx950")
    text = doctor_text()
    block = site_block(text, "attention input")
    assert "-> rocm (fused-2 one-stage via CustomAllreduce.fused_ar_rms + get_hip_quant(per_1x128)" in block
    assert "not fused-1: aiter 0.1.13 has no per-group fused API" in block
    assert (
        "backend rocm: aiter: 0.1.13: API generation 0.1.12 - 0.1.13-like (no per-group kernel); "
        "no per-group fused API" in text
    )


def test_gfx942_uses_two_kernels_and_says_why(rocm, monkeypatch):
    rocm.use("v0_1_17", "gfx942")
    # doctor asks the platform for its FP8 type; on the (fake) MI300 that is e4m3fnuz
    monkeypatch.setattr(doctor.platform_info, "default_fp8_dtype", lambda device=None: torch.float8_e4m3fnuz)
    block = site_block(doctor_text(), "GDN input")
    assert "-> rocm (fused-2" in block
    assert "not fused-1: the one-kernel per-group dispatch is used on gfx950 (MI355) only; this GPU is gfx942" in block


def test_gfx950_per_site_steps(rocm):
    rocm.use("v0_1_20", "gfx950")
    text = doctor_text(tokens=(1, 64, 81, 1024, 8192))
    attn = site_block(text, "attention input")
    assert "tokens 1,64 -> rocm (fused-1 one-stage via CustomAllreduce.fused_ar_rms_per_group_quant" in attn
    assert "tokens 81,1024 -> rocm (fused-1 split via" in attn  # vLLM's 80-token cap; > 512 KiB
    assert "tokens 8192 -> native (generic)" in attn
    assert "rocm: ineligible: input 64 MiB >= 64 MiB, aiter's fused-path limit (from tokens 8192)" in attn
    assert "(1 + w) rounded to bfloat16" in attn
    moe = site_block(text, "post-attention (MoE)")
    assert "tokens 1,64 -> rocm (fused-1 one-stage via CustomAllreduce.fused_ar_rms (gemma_norm))" in moe
    assert "tokens 81,1024 -> rocm (fused-1 two-stage via CustomAllreduce.fused_ar_rms (gemma_norm))" in moe
    assert (
        "backend rocm: aiter: 0.1.20: API generation 0.1.17 / >= 0.1.19.post2-like; per-group: "
        "CustomAllreduce.fused_ar_rms_per_group_quant(emit_bf16, transpose_scale)"
    ) in text
    assert (
        "backend rocm: ROCm: torch HIP 7.0.51831; aiter builds with the hipcc of ROCM_HOME=/opt/rocm "
        "(HIP 7.0.51831): clang >= 20"
    ) in text
    assert "backend rocm: kernel choice: one-stage where vLLM picks it (<= 80 tokens" in text


def test_old_rocm_keeps_bf16_per_group_calls_on_safe_kernels(rocm):
    """ROCm 6 (clang < 20): the multi-stage per-group kernels would add bf16 as
    integers, so doctor shows fused-2 where vLLM's rule picks them, and says why."""
    rocm.use("v0_1_20", "gfx950", hip="6.4.43482")
    text = doctor_text(world_size=8, tokens=(1, 64, 1024))
    attn = site_block(text, "attention input")
    assert "tokens 1,64 -> rocm (fused-1 one-stage" in attn  # <= 80 tokens: one-stage is safe
    assert "tokens 1024 -> rocm (fused-2 two-stage via CustomAllreduce.fused_ar_rms + get_hip_quant" in attn
    assert "not fused-1: the multi-stage per-group kernels add bf16 residuals as integers" in attn
    assert "backend rocm: ROCm: torch HIP 6.4.43482; aiter builds with the hipcc of ROCM_HOME=/opt/rocm" in text
    assert "(HIP 6.4.43482): clang < 20 (ROCm < 7)" in text


@pytest.mark.parametrize(
    "gen,name",
    [
        ("v0_1_14", "0.1.14 - 0.1.16-like (one-stage kernels: one block per token)"),
        ("v0_1_16", "0.1.14 - 0.1.16-like (one-stage kernels: one block per token)"),
        ("v0_1_17", "0.1.17 / >= 0.1.19.post2-like"),
        ("v0_1_18", "0.1.18 - 0.1.19.post1-like (per-group methods without transpose_scale)"),
        ("v0_1_20", "0.1.17 / >= 0.1.19.post2-like"),
    ],
)
def test_doctor_names_the_api_generation(rocm, gen, name):
    rocm.use(gen, "gfx950")
    assert f"API generation {name}" in doctor_text(tokens=(1,))


def test_small_hidden_is_explained(rocm):
    rocm.use("v0_1_20", "gfx950")
    args = argparse.Namespace(json=False, world_size=2, hidden=256, tokens=[1, 100], dtype="bfloat16")
    text = doctor.render(doctor.collect(args))
    moe = site_block(text, "post-attention (MoE)")
    assert "tokens 1 -> rocm (fused-1 one-stage" in moe and "tokens 100 -> native (generic)" in moe
    assert "'n too small'" in moe


def test_world_size_six_is_explained(rocm):
    rocm.use("v0_1_17", "gfx950")
    assert "rocm: ineligible: world size 6: aiter's fused kernels take 2, 4 or 8 ranks" in doctor_text(world_size=6)
