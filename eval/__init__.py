"""GSM8K accuracy check, fused vs baseline (installed as vllm_rocm_fused.eval)."""
