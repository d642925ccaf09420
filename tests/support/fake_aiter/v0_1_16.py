"""Fake aiter v0.1.16 - v0.1.16.post6: v0.1.14's per-group methods (``emit_bf16``,
no ``transpose_scale``), ``out_hidden_dim`` on the AR+RMSNorm methods, and two
module-level per-group entries: the new ``quant_type=`` form of
``tensor_model_parallel_fused_allreduce_rmsnorm_quant`` (no ``transpose_scale``,
no ``gemma_norm``) and the ``_per_group`` function it keeps. One-stage
launchers still take one block per token.

Signatures traced to ROCm/aiter @ v0.1.16 (same @ v0.1.16.post6):
  aiter/dist/device_communicators/custom_all_reduce.py
    L805  CustomAllreduce.fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, scale_out=None, w, eps,
          registered=False, use_1stage=False, post_per_token_quant=False, out_hidden_dim=0)
    L882  CustomAllreduce.custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage, out_hidden_dim=0)
    L1019 CustomAllreduce.fused_ar_rms_per_group_quant(self, inp, res_inp, *, w, eps, group_size=128,
          registered=False, use_1stage=False, emit_bf16=False)
    L1213 CustomAllreduce.custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps,
          group_size=128, use_1stage=False, emit_bf16=False)
  aiter/dist/communication_op.py
    L63  tensor_model_parallel_fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps, prefill_support=False,
         x_pad_to_multiple=0)
    L82  tensor_model_parallel_fused_allreduce_rmsnorm_quant(input_, residual_inp_, weight_, eps,
         prefill_support=False, quant_type="per_token", group_size=128, emit_bf16=False)
    L112 tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group(input_, residual_inp_, weight_, eps,
         group_size=128, prefill_support=False, emit_bf16=False)
"""

from . import base, v0_1_14

VERSION = "0.1.16"


class CustomAllreduce(v0_1_14.CustomAllreduce):
    def fused_ar_rms(
        self,
        inp,
        res_inp,
        *,
        res_out=None,
        out=None,
        scale_out=None,
        w,
        eps,
        registered=False,
        use_1stage=False,
        post_per_token_quant=False,
        out_hidden_dim=0,
    ):
        if post_per_token_quant or out_hidden_dim:
            raise NotImplementedError("the fake has no per-token quant or padded output")
        return self._ar_rms(
            "CustomAllreduce.fused_ar_rms", inp, res_inp, w, eps, registered=registered, use_1stage=use_1stage
        )

    def custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage, out_hidden_dim=0):
        return self._graph_aware(
            input,
            lambda reg: self._ar_rms(
                "CustomAllreduce.custom_fused_ar_rms",
                input,
                residual_inp,
                weight,
                eps,
                registered=reg,
                use_1stage=use_1stage,
            ),
            lambda: base.ar_rms_dummy(input),
        )


def tensor_model_parallel_fused_allreduce_rmsnorm(
    input_, residual_inp_, weight_, eps, prefill_support=False, x_pad_to_multiple=0
):
    return base.communicator_ar_rms(input_, residual_inp_, weight_, eps)


def tensor_model_parallel_fused_allreduce_rmsnorm_quant(
    input_, residual_inp_, weight_, eps, prefill_support=False, quant_type="per_token", group_size=128, emit_bf16=False
):
    base.STATE.record(
        "communication_op.quant", quant_type=quant_type, group_size=group_size, emit_bf16=emit_bf16, weight=weight_
    )
    if quant_type not in ("per_group", "per_1x128"):
        raise NotImplementedError("the fake implements quant_type='per_group' only")
    return base.communicator_per_group(input_, residual_inp_, weight_, eps, group_size, emit_bf16)


def tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group(
    input_, residual_inp_, weight_, eps, group_size=128, prefill_support=False, emit_bf16=False
):
    return tensor_model_parallel_fused_allreduce_rmsnorm_quant(
        input_,
        residual_inp_,
        weight_,
        eps,
        prefill_support,
        quant_type="per_group",
        group_size=group_size,
        emit_bf16=emit_bf16,
    )


def modules():
    return base.package(
        VERSION,
        CustomAllreduce,
        {
            "tensor_model_parallel_fused_allreduce_rmsnorm": tensor_model_parallel_fused_allreduce_rmsnorm,
            "tensor_model_parallel_fused_allreduce_rmsnorm_quant": tensor_model_parallel_fused_allreduce_rmsnorm_quant,
            "tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group": tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group,
        },
    )
