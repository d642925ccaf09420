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


def register_portable_fp8() -> None:
    """Second vLLM plugin entry point: the portable block-FP8 linear kernel and MoE
    experts for platforms where vLLM has none. Not affected by VLLM_ROCM_FUSED_DISABLE
    (the unfused baseline needs it too); VLLM_ROCM_FUSED_DISABLE_PORTABLE_FP8=1 turns it off."""
    from .plugin import register_portable_fp8 as _register

    _register()


__all__ = ["__version__", "register", "register_portable_fp8"]
