"""Every environment variable the plugin reads, in one place.

Values are read when asked for (not at import), so a test or a launcher can set
them after import. The README's table is generated from ``ENV_VARS`` by hand:
keep the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("VLLM_ROCM_FUSED_DISABLE", "0",
           "1: the plugin registers nothing (vLLM runs as if it were not installed)."),
    EnvVar("VLLM_ROCM_FUSED_DISABLE_AR_QUANT", "0",
           "1: keep the all-reduce + add + RMSNorm fusion, drop the FP8 quant handoff "
           "(consumer GEMMs quantize their own input)."),
    EnvVar("VLLM_ROCM_FUSED_DISABLE_PORTABLE_FP8", "0",
           "1: do not register the portable block-FP8 linear kernel (CPU without AMX)."),
    EnvVar("VLLM_ROCM_FUSED_BACKEND", "auto",
           "Force a backend for the fused op: auto, native, or a registered fast backend "
           "(cuda, rocm). An ineligible forced backend still falls back to native."),
    EnvVar("VLLM_ROCM_FUSED_MAX_TOKENS", "8192",
           "Largest token count the symmetric-memory buffers of the CUDA backend are sized for; "
           "larger calls use the split path."),
    EnvVar("VLLM_ROCM_FUSED_CACHE_DIR", "~/.cache/vllm-rocm-fused",
           "Where `vllm-rocm-fused demo` keeps the tiny models it builds."),
    EnvVar("VLLM_ROCM_FUSED_GSM8K_DIR", "",
           "Folder with GSM8K's train.jsonl and test.jsonl: `vllm-rocm-fused eval gsm8k` reads "
           "them offline when --data-dir is not given (empty: lm-eval's stock task, from the Hub)."),
)

_BY_NAME = {v.name: v for v in ENV_VARS}


def _raw(name: str) -> str:
    return os.environ.get(name, _BY_NAME[name].default)


def _flag(name: str) -> bool:
    value = _raw(name).strip().lower()
    return value not in ("", "0", "false", "no", "off")


def plugin_disabled() -> bool:
    return _flag("VLLM_ROCM_FUSED_DISABLE")


def ar_quant_disabled() -> bool:
    return _flag("VLLM_ROCM_FUSED_DISABLE_AR_QUANT")


def portable_fp8_disabled() -> bool:
    return _flag("VLLM_ROCM_FUSED_DISABLE_PORTABLE_FP8")


def forced_backend() -> str:
    return _raw("VLLM_ROCM_FUSED_BACKEND").strip().lower() or "auto"


def max_tokens() -> int:
    raw = _raw("VLLM_ROCM_FUSED_MAX_TOKENS")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"VLLM_ROCM_FUSED_MAX_TOKENS must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"VLLM_ROCM_FUSED_MAX_TOKENS must be >= 1, got {value}")
    return value


def cache_dir() -> str:
    return os.path.expanduser(_raw("VLLM_ROCM_FUSED_CACHE_DIR"))


def gsm8k_dir() -> str | None:
    value = _raw("VLLM_ROCM_FUSED_GSM8K_DIR").strip()
    return os.path.expanduser(value) if value else None


def snapshot() -> dict[str, str]:
    """The effective value of every variable (for doctor and reports)."""
    return {v.name: _raw(v.name) for v in ENV_VARS}
