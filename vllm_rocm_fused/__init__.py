"""vllm-rocm-fused: fused all-reduce + residual add + RMSNorm + per-group FP8 quant
for Qwen3.5 on vLLM.

``import vllm_rocm_fused`` needs torch only; vLLM is imported by ``register``
(the ``vllm.general_plugins`` entry point) and the modules under ``layers`` and
``models``.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM plugin entry point (idempotent; a no-op but for one log line when
    VLLM_ROCM_FUSED_DISABLE=1)."""
    from .plugin import register as _register

    _register()


__all__ = ["__version__", "register"]
