"""Fake aiter v0.1.14 - v0.1.15: the per-group kernel arrives (aiter PR #2823),
with ``emit_bf16`` but no ``transpose_scale``; the module-level entry is the
``_per_group`` function. No Gemma flag anywhere. The per-group one-stage
launcher launches ``grid(m)`` against 80 signal slots (a hazard above 80
tokens, base.kernel_verdict).

Signatures traced to ROCm/aiter @ v0.1.14:
  aiter/dist/device_communicators/custom_all_reduce.py
    L675 CustomAllreduce.fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, scale_out=None,
         w, eps, registered=False, use_1stage=False, post_per_token_quant=False)
    L733 CustomAllreduce.custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage)
    L805 CustomAllreduce.fused_ar_rms_per_group_quant(self, inp, res_inp, *, w, eps, group_size=128,
         registered=False, use_1stage=False, emit_bf16=False) -> (out, res_out, scale_out[, bf16_out])
    L931 CustomAllreduce.custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps,
         group_size=128, use_1stage=False, emit_bf16=False)
  aiter/dist/communication_op.py
    L63 tensor_model_parallel_fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps, prefill_support=False)
    L76 tensor_model_parallel_fused_allreduce_rmsnorm_quant(input_, residual_inp_, weight_, eps,
        prefill_support=False)   # per-token only
    L93 tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group(input_, residual_inp_, weight_, eps,
        group_size=128, prefill_support=False, emit_bf16=False)
  (v0.1.16 adds quant_type/group_size/emit_bf16 to ..._quant and keeps ..._per_group.)
"""

from . import base
from .v0_1_13 import CustomAllreduce as _V13

VERSION = "0.1.14"


class CustomAllreduce(_V13):
    TWO_STAGE_RACES = False  # PR #2890 is in v0.1.14

    def fused_ar_rms_per_group_quant(
        self, inp, res_inp, *, w, eps, group_size=128, registered=False, use_1stage=False, emit_bf16=False
    ):
        return self._per_group(
            "CustomAllreduce.fused_ar_rms_per_group_quant",
            inp,
            res_inp,
            w,
            eps,
            group_size=group_size,
            registered=registered,
            use_1stage=use_1stage,
            emit_bf16=emit_bf16,
        )

    def custom_fused_ar_rms_per_group_quant(
        self, input, residual_inp, weight, eps, group_size=128, use_1stage=False, emit_bf16=False
    ):
        return self._graph_aware(
            input,
            lambda reg: self._per_group(
                "CustomAllreduce.custom_fused_ar_rms_per_group_quant",
                input,
                residual_inp,
                weight,
                eps,
                group_size=group_size,
                registered=reg,
                use_1stage=use_1stage,
                emit_bf16=emit_bf16,
            ),
            lambda: base.per_group_dummy(input, group_size, emit_bf16),
        )


def tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group(
    input_, residual_inp_, weight_, eps, group_size=128, prefill_support=False, emit_bf16=False
):
    base.STATE.record("communication_op.per_group_fn", group_size=group_size, emit_bf16=emit_bf16, weight=weight_)
    return base.communicator_per_group(input_, residual_inp_, weight_, eps, group_size, emit_bf16)


def modules():
    from .v0_1_13 import (
        tensor_model_parallel_fused_allreduce_rmsnorm,
        tensor_model_parallel_fused_allreduce_rmsnorm_quant,
    )

    return base.package(
        VERSION,
        CustomAllreduce,
        {
            "tensor_model_parallel_fused_allreduce_rmsnorm": tensor_model_parallel_fused_allreduce_rmsnorm,
            "tensor_model_parallel_fused_allreduce_rmsnorm_quant": tensor_model_parallel_fused_allreduce_rmsnorm_quant,
            "tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group": tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group,
        },
    )
