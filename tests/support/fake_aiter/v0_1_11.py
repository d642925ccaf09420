"""Fake aiter v0.1.11 - v0.1.11.post1: the fused all-reduce + RMSNorm API of
v0.1.13, but before ``IPCBufferPool`` (v0.1.12) and with the kernels of that
time: the one-stage kernel is a template for hidden 512, 1024, 2048 and 4096
only (other sizes silently take the two-stage kernel), the second stage runs
only for rows of a multiple of 1 KiB from 1 to 32 KiB and otherwise leaves the
outputs unwritten (``FIXED_HIDDEN``), and the two-stage kernel races
(``TWO_STAGE_RACES``), base.kernel_verdict. The backend must not use it.

Traced to ROCm/aiter @ v0.1.11.post1:
  aiter/dist/device_communicators/custom_all_reduce.py
    L53  CustomAllreduce.__init__(self, group, device, max_size=8192 * 1024 * 8 * 2,
         enable_register_for_capturing=True)
    L266 CustomAllreduce.should_custom_ar(self, inp)      # no prefill_support; <= max_size / 2
    L414 CustomAllreduce.fused_ar_rms(...)                # as v0.1.13
    L466 CustomAllreduce.custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage)
    (no IPCBufferPool: vLLM's AiterCustomAllreduce.supports_dynamic_hidden_dim is False)
  csrc/include/custom_all_reduce.cuh L2369 dispatchFusedAllReduceRMSNorm
  aiter/dist/communication_op.py L37 tensor_model_parallel_fused_allreduce_rmsnorm(input_,
    residual_inp_, weight_, eps, prefill_support=False)
"""

from . import base, v0_1_13

VERSION = "0.1.11.post1"


class CustomAllreduce(v0_1_13.CustomAllreduce):
    FIXED_HIDDEN = True

    def should_custom_ar(self, inp):
        if self.disabled:
            return False
        size = inp.numel() * inp.element_size()
        if size % 16 or not inp.is_contiguous():
            return False
        if self.world_size == 2 or self.fully_connected:
            return size <= self.max_size / 2
        return False


def modules():
    return base.package(
        VERSION,
        CustomAllreduce,
        {
            "tensor_model_parallel_fused_allreduce_rmsnorm": v0_1_13.tensor_model_parallel_fused_allreduce_rmsnorm,
            "tensor_model_parallel_fused_allreduce_rmsnorm_quant": v0_1_13.tensor_model_parallel_fused_allreduce_rmsnorm_quant,
        },
        ca_module={},
    )
