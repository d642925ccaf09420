"""Fake aiter v0.1.18 - v0.1.19.post1: like v0.1.17, except that the per-group
methods of CustomAllreduce lost ``transpose_scale`` again while
``communication_op`` still takes it and always passes it on: the method's
TypeError is swallowed by the communicator, so every module-level per-group
call runs fused AR+RMSNorm + per_1x128 quant (two kernels).

Signatures traced to ROCm/aiter @ v0.1.18:
  aiter/dist/device_communicators/custom_all_reduce.py
    L1358 CustomAllreduce.fused_ar_rms(..., out_hidden_dim=0, gemma_norm=False, emit_bf16=False)
    L1610 CustomAllreduce.fused_ar_rms_per_group_quant(self, inp, res_inp, *, w, eps, group_size=128,
          registered=False, use_1stage=False, emit_bf16=False)            # no transpose_scale
    L1918 CustomAllreduce.custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps,
          group_size=128, use_1stage=False, emit_bf16=False)               # no transpose_scale
  aiter/dist/communication_op.py
    L173 tensor_model_parallel_fused_allreduce_rmsnorm_quant(..., emit_bf16=False, transpose_scale=False,
         gemma_norm=False)
"""

from . import base, v0_1_14, v0_1_17

VERSION = "0.1.18"


class CustomAllreduce(base.CustomAllreduceBase):
    ONE_STAGE_ONE_BLOCK_PER_TOKEN = False
    fused_ar_rms = v0_1_17.CustomAllreduce.fused_ar_rms
    custom_fused_ar_rms = v0_1_17.CustomAllreduce.custom_fused_ar_rms
    # the per-group methods as v0.1.14-v0.1.16 had them (no transpose_scale)
    fused_ar_rms_per_group_quant = v0_1_14.CustomAllreduce.fused_ar_rms_per_group_quant
    custom_fused_ar_rms_per_group_quant = v0_1_14.CustomAllreduce.custom_fused_ar_rms_per_group_quant


def modules():
    return base.package(VERSION, CustomAllreduce, dict(v0_1_17.COMM_OP))
