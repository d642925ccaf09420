"""Every environment variable the plugin reads, in one place.

Values are read when asked for (not at import), so a test or a launcher can set
them after import. The README's table is generated from ``ENV_VARS`` by hand:
keep the two in step.

``problems()`` says which set values the plugin cannot use as given (``doctor``
reports them and exits 1; ``serving.VllmServer`` refuses to start a server with
them); ``unknown_names()`` points at likely misspellings.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "VLLM_ROCM_FUSED_"
# What a switch accepts; anything else is reported (read anyway, it counts as on).
SWITCH_OFF = ("", "0", "false", "no", "off")
SWITCH_ON = ("1", "true", "yes", "on")
# The backends VLLM_ROCM_FUSED_BACKEND can name (tests check this against the registry).
BACKEND_NAMES = ("auto", "native", "cuda", "rocm")
# VLLM_ROCM_FUSED_VALIDATE: what the startup self-check does (ops/self_check.py)
VALIDATE_MODES = ("off", "startup", "strict")
# VLLM_ROCM_FUSED_FAULT_INJECT: the deliberate faults of the test-only backend (ops/fault_injection.py)
FAULTS = ("scales", "layout")


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str
    # How problems() checks a set value: "switch", "backend", "positive int", "folder"
    # (created when missing, so only a file is wrong), "existing folder", "validate",
    # "fault", "text" (any).
    kind: str = "text"
    server: bool = True  # read inside the vLLM processes (False: by the CLI only)


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar(
        "VLLM_ROCM_FUSED_DISABLE",
        "0",
        "1: the plugin registers nothing (vLLM runs as if it were not installed).",
        "switch",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_DISABLE_AR_QUANT",
        "0",
        "1: keep the all-reduce + add + RMSNorm fusion, drop the FP8 quant handoff "
        "(consumer GEMMs quantize their own input).",
        "switch",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_DISABLE_PORTABLE_FP8",
        "0",
        "1: do not register the portable block-FP8 linear kernel (CPU without AMX).",
        "switch",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_DISABLE_PDL",
        "0",
        "1: launch the one-GPU kernel without programmatic dependent launch (NVIDIA Hopper on; "
        "with it the kernel's start overlaps the end of the kernel before it).",
        "switch",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_BACKEND",
        "auto",
        "Force a backend for the fused op: auto, native, or a registered fast backend "
        "(cuda, rocm). An ineligible forced backend still falls back to native.",
        "backend",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_MAX_TOKENS",
        "8192",
        "Largest token count the symmetric-memory buffers of the CUDA backend are sized for; "
        "larger calls use the split path.",
        "positive int",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_VALIDATE",
        "startup",
        "Startup self-check of the fast paths against the portable path, before serving: "
        "off; startup (a path that differs is disabled on every rank, with a warning); "
        "strict (a difference stops the server from starting).",
        "validate",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_FAULT_INJECT",
        "",
        "Tests only: registers a deliberately wrong backend that outranks the others "
        "(scales: doubled scales; layout: scales in the other memory order), for checking "
        "that the self-check catches it. Never set it when serving.",
        "fault",
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_CACHE_DIR",
        "~/.cache/vllm-rocm-fused",
        "Where `vllm-rocm-fused demo` keeps the tiny models it builds.",
        "folder",
        server=False,
    ),
    EnvVar(
        "VLLM_ROCM_FUSED_GSM8K_DIR",
        "",
        "Folder with GSM8K's train.jsonl and test.jsonl: `vllm-rocm-fused eval gsm8k` reads "
        "them offline when --data-dir is not given (empty: lm-eval's stock task, from the Hub).",
        "existing folder",
        server=False,
    ),
)

_BY_NAME = {v.name: v for v in ENV_VARS}


def _raw(name: str) -> str:
    return os.environ.get(name, _BY_NAME[name].default)


def _flag(name: str) -> bool:
    value = _raw(name).strip().lower()
    return value not in SWITCH_OFF


def plugin_disabled() -> bool:
    return _flag("VLLM_ROCM_FUSED_DISABLE")


def ar_quant_disabled() -> bool:
    return _flag("VLLM_ROCM_FUSED_DISABLE_AR_QUANT")


def portable_fp8_disabled() -> bool:
    return _flag("VLLM_ROCM_FUSED_DISABLE_PORTABLE_FP8")


def pdl_disabled() -> bool:
    return _flag("VLLM_ROCM_FUSED_DISABLE_PDL")


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


def validate_mode() -> str:
    """off, startup or strict; empty or an unknown value counts as startup (``problems``
    reports an unknown one)."""
    value = _raw("VLLM_ROCM_FUSED_VALIDATE").strip().lower()
    return value if value in VALIDATE_MODES else "startup"


def injected_fault() -> str | None:
    """The test-only fault to inject (scales, layout), or None; an unknown value injects none."""
    value = _raw("VLLM_ROCM_FUSED_FAULT_INJECT").strip().lower()
    return value if value in FAULTS else None


def cache_dir() -> str:
    return os.path.expanduser(_raw("VLLM_ROCM_FUSED_CACHE_DIR"))


def gsm8k_dir() -> str | None:
    value = _raw("VLLM_ROCM_FUSED_GSM8K_DIR").strip()
    return os.path.expanduser(value) if value else None


def snapshot() -> dict[str, str]:
    """The effective value of every variable (for doctor and reports)."""
    return {v.name: _raw(v.name) for v in ENV_VARS}


def _value_problem(var: EnvVar, raw: str) -> str | None:
    """Why ``raw`` is not a usable value of ``var`` (None: it is)."""
    value = raw.strip()
    if var.kind == "switch":
        if value.lower() not in SWITCH_OFF + SWITCH_ON:
            return "not a switch (use 0 or 1)"
    elif var.kind == "backend":
        if (value.lower() or "auto") not in BACKEND_NAMES:
            return f"not a backend (one of {', '.join(BACKEND_NAMES)})"
    elif var.kind == "validate":
        if value and value.lower() not in VALIDATE_MODES:
            return f"not a self-check mode (one of {', '.join(VALIDATE_MODES)})"
    elif var.kind == "fault":
        if value and value.lower() not in FAULTS:
            return f"not a fault (one of {', '.join(FAULTS)}, or empty)"
    elif var.kind == "positive int":
        try:
            if int(value) < 1:
                return "must be >= 1"
        except ValueError:
            return "not an integer"
    elif var.kind in ("folder", "existing folder") and value:
        path = os.path.expanduser(value)
        if os.path.exists(path) and not os.path.isdir(path):
            return "exists and is not a folder"
        if var.kind == "existing folder" and not os.path.isdir(path):
            return "no such folder"
    return None


def problems(environ: Mapping[str, str] | None = None, *, server_only: bool = False) -> list[str]:
    """One line per variable set in ``environ`` (default: this process's environment)
    to a value the plugin cannot use as given, ``NAME='value': why``. Empty: all fine.
    ``server_only``: only the variables the vLLM processes read."""
    environ = os.environ if environ is None else environ
    out = []
    for var in ENV_VARS:
        if var.name not in environ or (server_only and not var.server):
            continue
        why = _value_problem(var, environ[var.name])
        if why:
            out.append(f"{var.name}={environ[var.name]!r}: {why}")
    return out


def unknown_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``VLLM_ROCM_FUSED_*`` names in ``environ`` that the plugin does not read but that
    look like one it does (a misspelling), each with the name it resembles."""
    environ = os.environ if environ is None else environ
    known = {v.name[len(PREFIX) :]: v.name for v in ENV_VARS}
    out = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in _BY_NAME:
            continue
        close = difflib.get_close_matches(name[len(PREFIX) :], list(known), n=1, cutoff=0.8)
        if close:
            out.append(f"{name} is not a setting of the plugin (did you mean {known[close[0]]}?)")
    return out
