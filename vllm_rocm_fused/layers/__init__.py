"""vLLM glue layers (these modules import vLLM)."""
