"""NVIDIA backend (Triton over torch symmetric memory). Importable with torch + Triton alone."""
