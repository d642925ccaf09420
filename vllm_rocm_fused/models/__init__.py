"""Qwen3.5 layer overrides (vLLM glue)."""
