"""Triton kernels and their launchers (torch + Triton only; no vLLM)."""
