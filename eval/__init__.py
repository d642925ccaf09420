"""Ships as ``vllm_rocm_fused.eval``: the GSM8K accuracy check, fused vs baseline
(``vllm-rocm-fused eval gsm8k``)."""
