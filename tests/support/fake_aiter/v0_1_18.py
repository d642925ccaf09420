"""Fake aiter v0.1.18 - v0.1.19.post1: like v0.1.17, except that the per-group
methods of CustomAllreduce lost ``transpose_scale`` again while
``communication_op`` still takes it and passes it on (so asking for it there
raises TypeError at the method).

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

from . import base
from . import v0_1_17

VERSION = "0.1.18"


class CustomAllreduce(base.CustomAllreduceBase):
    fused_ar_rms = v0_1_17.CustomAllreduce.fused_ar_rms
    custom_fused_ar_rms = v0_1_17.CustomAllreduce.custom_fused_ar_rms

    def fused_ar_rms_per_group_quant(self, inp, res_inp, *, w, eps, group_size=128, registered=False,
                                     use_1stage=False, emit_bf16=False):
        return self._per_group("CustomAllreduce.fused_ar_rms_per_group_quant", inp, res_inp, w, eps,
                               group_size=group_size, registered=registered, use_1stage=use_1stage,
                               emit_bf16=emit_bf16)

    def custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps, group_size=128,
                                            use_1stage=False, emit_bf16=False):
        return self._graph_aware(
            input,
            lambda reg: self._per_group("CustomAllreduce.custom_fused_ar_rms_per_group_quant", input,
                                        residual_inp, weight, eps, group_size=group_size, registered=reg,
                                        use_1stage=use_1stage, emit_bf16=emit_bf16),
            lambda: None,
        )


def modules():
    return base.package(VERSION, CustomAllreduce, dict(v0_1_17.COMM_OP))
