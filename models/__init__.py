"""Tiny Qwen3.5 test-model recipes and their builder (installed as vllm_rocm_fused.tiny_models)."""
