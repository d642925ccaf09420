"""The ``vllm-rocm-fused`` command line."""
