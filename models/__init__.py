"""Ships as ``vllm_rocm_fused.tiny_models``: tiny Qwen3.5 test checkpoints, not plugin code
(the Qwen3.5 overrides the plugin installs into vLLM are ``vllm_rocm_fused/models/``).

Checkpoints that vLLM loads with its real loader: recipes (``presets/*.json``), the builder,
the block-FP8 quantizer, the tokenizer, the tiny-gsm8k task, the training script and the
trained checkpoints (``trained/``). ``vllm-rocm-fused tiny-model`` is the CLI."""

from .builder import BUILDER_VERSION, build_tiny_model, is_current, modules_to_not_convert, serve_args
from .recipe import PresetError, list_presets, parse_overrides, resolve

__all__ = [
    "BUILDER_VERSION",
    "PresetError",
    "build_tiny_model",
    "is_current",
    "list_presets",
    "modules_to_not_convert",
    "parse_overrides",
    "resolve",
    "serve_args",
]
