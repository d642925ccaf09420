"""Fake aiter v0.1.18 - v0.1.19.post1: like v0.1.17, except that the per-group
methods of CustomAllreduce lost ``transpose_scale`` again while
``communication_op`` still takes it and always passes it on: the method's
TypeError is swallowed by the communicator, so every module-level per-group
call runs fused AR+RMSNorm + per_1x128 quant (two kernels).

From this release ``should_custom_ar`` honours ``AITER_CUSTOM_AR_MAX_SIZE`` and
``AITER_CUSTOM_AR_MIN_SIZE`` (``SizeSwitches``; v0.1.20.post1 and main the same).

Signatures traced to ROCm/aiter @ v0.1.18:
  aiter/dist/device_communicators/custom_all_reduce.py
    L1358 CustomAllreduce.fused_ar_rms(..., out_hidden_dim=0, gemma_norm=False, emit_bf16=False)
    L1610 CustomAllreduce.fused_ar_rms_per_group_quant(self, inp, res_inp, *, w, eps, group_size=128,
          registered=False, use_1stage=False, emit_bf16=False)            # no transpose_scale
    L1918 CustomAllreduce.custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps,
          group_size=128, use_1stage=False, emit_bf16=False)               # no transpose_scale
    L71  _CAR_MAX_SIZE_ENV = "AITER_CUSTOM_AR_MAX_SIZE"; L81 _CAR_MIN_SIZE_ENV = "AITER_CUSTOM_AR_MIN_SIZE"
    L84  _resolve_car_max_size(pool_size): unset/empty/not an int/negative -> 64 MiB; 0 -> 0 (custom AR
         off); above pool_size -> 64 MiB (warned); else the value
    L146 _resolve_car_min_size(): unset/empty/not an int/negative -> 0; else the value
    L1031 CustomAllreduce._fits_custom_ar_size(inp, prefill_support=False): disabled -> False; bytes % 16;
          _car_max_size <= 0 -> False; bytes <= _car_min_size -> False; (world size 2 or fully
          connected) and bytes <= _car_max_size (prefill: also <= max_size / 2)
    L1057 CustomAllreduce.should_custom_ar = _fits_custom_ar_size and is_weak_contiguous
    (__init__ resolves both once: self._car_max_size, self._car_min_size)
  aiter/dist/communication_op.py
    L173 tensor_model_parallel_fused_allreduce_rmsnorm_quant(..., emit_bf16=False, transpose_scale=False,
         gemma_norm=False)
"""

import os

from . import base, v0_1_14, v0_1_17

VERSION = "0.1.18"
DEFAULT_MAX = 8192 * 8192


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _resolve_car_max_size(pool_size: int) -> int:
    v = _env_int("AITER_CUSTOM_AR_MAX_SIZE")
    if v is None or v < 0 or v > pool_size:
        return DEFAULT_MAX
    return v


def _resolve_car_min_size() -> int:
    v = _env_int("AITER_CUSTOM_AR_MIN_SIZE")
    return 0 if v is None or v < 0 else v


class SizeSwitches:
    """aiter's custom all-reduce size window, resolved once at construction."""

    def __init__(self, group, device, max_size=1024 * 1024 * 1024, enable_register_for_capturing=True):
        super().__init__(group, device, max_size, enable_register_for_capturing)
        self._car_max_size = _resolve_car_max_size(max_size)
        self._car_min_size = _resolve_car_min_size()

    def should_custom_ar(self, inp, prefill_support=False):
        if self.disabled:
            return False
        size = inp.numel() * inp.element_size()
        if size % 16 or self._car_max_size <= 0 or size <= self._car_min_size:
            return False
        if not (self.world_size == 2 or self.fully_connected) or not inp.is_contiguous():
            return False
        return size <= (min(self._car_max_size, self.max_size / 2) if prefill_support else self._car_max_size)


class CustomAllreduce(SizeSwitches, base.CustomAllreduceBase):
    ONE_STAGE_ONE_BLOCK_PER_TOKEN = False
    fused_ar_rms = v0_1_17.CustomAllreduce.fused_ar_rms
    custom_fused_ar_rms = v0_1_17.CustomAllreduce.custom_fused_ar_rms
    # the per-group methods as v0.1.14-v0.1.16 had them (no transpose_scale)
    fused_ar_rms_per_group_quant = v0_1_14.CustomAllreduce.fused_ar_rms_per_group_quant
    custom_fused_ar_rms_per_group_quant = v0_1_14.CustomAllreduce.custom_fused_ar_rms_per_group_quant


CA_MODULE = {
    "IPCBufferPool": base.IPCBufferPool,
    "_resolve_car_max_size": _resolve_car_max_size,
    "_resolve_car_min_size": _resolve_car_min_size,
}


def modules():
    return base.package(VERSION, CustomAllreduce, dict(v0_1_17.COMM_OP), ca_module=CA_MODULE)
