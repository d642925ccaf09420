"""ROCm backend on aiter. Importable without aiter: aiter is imported on first
use (``RocmBackend.probe``), and any exception from that import only makes the
backend unavailable, with the reason kept for doctor."""

from ...ops.backends import register_backend
from .backend import RocmBackend

BACKEND = register_backend(RocmBackend())

__all__ = ["BACKEND", "RocmBackend"]
