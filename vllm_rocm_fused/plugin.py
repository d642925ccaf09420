"""What the ``vllm.general_plugins`` entry points do.

vLLM calls them in every process it starts (API server, engine core, workers), maybe
more than once, so each runs once per process and is cheap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from . import envs
from .log import get_logger, log_once

logger = get_logger("plugin")
_lock = threading.Lock()
_done: set[str] = set()


def _once(key: str, fn: Callable[[], None]) -> None:
    with _lock:
        if key in _done:
            return
        _done.add(key)
        fn()


def _register_fusion() -> None:
    if envs.plugin_disabled():
        log_once(
            logger, logging.INFO, "disabled", "vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing"
        )
        return
    from vllm import ModelRegistry

    from .layers import fused_norm  # noqa: F401 - importing registers the CustomOp
    from .models import ARCHITECTURES

    for arch, cls_name in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"vllm_rocm_fused.models.qwen3_5:{cls_name}")
    log_once(
        logger,
        logging.INFO,
        "registered",
        "vllm-rocm-fused: registered the fused all-reduce + RMSNorm + FP8 quant op and Qwen3.5 overrides for %s",
        ", ".join(ARCHITECTURES),
    )


def _register_portable_fp8() -> None:
    if envs.portable_fp8_disabled():
        return
    from .layers import block_fp8_linear, portable_moe

    block_fp8_linear.install()
    portable_moe.install()


def register() -> None:
    """The fusion: the CustomOp and the Qwen3.5 overrides (nothing when
    VLLM_ROCM_FUSED_DISABLE=1, but one log line)."""
    _once("fusion", _register_fusion)


def register_portable_fp8() -> None:
    """Platform enablement: portable block-FP8 linear kernel and MoE experts where vLLM
    has none (not affected by VLLM_ROCM_FUSED_DISABLE; the unfused baseline needs them)."""
    _once("portable_fp8", _register_portable_fp8)
