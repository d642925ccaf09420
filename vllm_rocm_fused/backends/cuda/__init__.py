"""NVIDIA backend (Triton over torch symmetric memory). Importable with torch + Triton
alone, and on any machine: without a CUDA GPU or Triton it registers and reports itself
unavailable (``doctor`` shows why); the kernels are imported on first use."""

from ...ops.backends import register_backend
from .backend import CudaBackend

register_backend(CudaBackend())

__all__ = ["CudaBackend"]
