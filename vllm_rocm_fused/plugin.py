"""What the ``vllm.general_plugins`` entry point does.

vLLM calls the entry point in every process it starts (API server, engine core,
workers), so registration is idempotent and cheap.
"""

from __future__ import annotations

import logging
import threading

from . import envs
from .log import get_logger, log_once

logger = get_logger("plugin")
_lock = threading.Lock()
_registered = False


def register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
        if envs.plugin_disabled():
            log_once(logger, logging.INFO, "disabled",
                     "vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing")
            return
        # Importing the CustomOp module registers it with vLLM.
        from vllm import ModelRegistry

        from .layers import fused_norm  # noqa: F401
        from .models import ARCHITECTURES

        for arch, cls_name in ARCHITECTURES.items():
            ModelRegistry.register_model(arch, f"vllm_rocm_fused.models.qwen3_5:{cls_name}")
        log_once(logger, logging.INFO, "registered",
                 "vllm-rocm-fused: registered the fused all-reduce + RMSNorm + FP8 quant op and "
                 "Qwen3.5 overrides for %s", ", ".join(ARCHITECTURES))


def is_registered() -> bool:
    return _registered
