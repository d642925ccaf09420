"""The fused op, importable with torch alone."""

from .backend_api import CallSpec
from .backends import path_counters, reset_counters
from .fused import fused_allreduce_rmsnorm_quant
from .reference import FusedNormQuantOutput, norm_quant_reference

__all__ = [
    "CallSpec",
    "FusedNormQuantOutput",
    "fused_allreduce_rmsnorm_quant",
    "norm_quant_reference",
    "path_counters",
    "reset_counters",
]
