"""ROCm backend on aiter. Importable without aiter (aiter is probed lazily)."""
