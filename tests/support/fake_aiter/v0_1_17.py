"""Fake aiter v0.1.17 (and v0.1.19.post2 on): ``transpose_scale`` on the per-group
methods, ``gemma_norm`` on the AR+RMSNorm ones, and the module-level per-group
entry is ``tensor_model_parallel_fused_allreduce_rmsnorm_quant(quant_type="per_group")``
(the ``_per_group`` function is gone).

Signatures traced to ROCm/aiter @ v0.1.17:
  aiter/dist/device_communicators/custom_all_reduce.py
    L811  CustomAllreduce.fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, scale_out=None, w, eps,
          registered=False, use_1stage=False, post_per_token_quant=False, out_hidden_dim=0, gemma_norm=False)
    L894  CustomAllreduce.custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage,
          out_hidden_dim=0, gemma_norm=False)
    L1040 CustomAllreduce.fused_ar_rms_per_group_quant(self, inp, res_inp, *, w, eps, group_size=128,
          registered=False, use_1stage=False, emit_bf16=False, transpose_scale=False)
    L1369 CustomAllreduce.custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps,
          group_size=128, use_1stage=False, emit_bf16=False, transpose_scale=False)
  aiter/dist/communication_op.py
    L152 tensor_model_parallel_fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps,
         prefill_support=False, x_pad_to_multiple=0, gemma_norm=False)
    L173 tensor_model_parallel_fused_allreduce_rmsnorm_quant(input_, residual_inp_, weight_, eps,
         prefill_support=False, quant_type="per_token", group_size=128, emit_bf16=False,
         transpose_scale=False, gemma_norm=False)   # per_group ignores gemma_norm
"""

from . import base

VERSION = "0.1.17"


class CustomAllreduce(base.CustomAllreduceBase):
    ONE_STAGE_ONE_BLOCK_PER_TOKEN = False  # the one-stage launchers loop over tokens from v0.1.17

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
        gemma_norm=False,
    ):
        if post_per_token_quant or out_hidden_dim:
            raise NotImplementedError("the fake has no per-token quant or padded output")
        return self._ar_rms(
            "CustomAllreduce.fused_ar_rms",
            inp,
            res_inp,
            w,
            eps,
            registered=registered,
            use_1stage=use_1stage,
            gemma_norm=gemma_norm,
        )

    def custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage, out_hidden_dim=0, gemma_norm=False):
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
                gemma_norm=gemma_norm,
            ),
            lambda: base.ar_rms_dummy(input),
        )

    def fused_ar_rms_per_group_quant(
        self,
        inp,
        res_inp,
        *,
        w,
        eps,
        group_size=128,
        registered=False,
        use_1stage=False,
        emit_bf16=False,
        transpose_scale=False,
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
            transpose_scale=transpose_scale,
        )

    def custom_fused_ar_rms_per_group_quant(
        self, input, residual_inp, weight, eps, group_size=128, use_1stage=False, emit_bf16=False, transpose_scale=False
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
                transpose_scale=transpose_scale,
            ),
            lambda: base.per_group_dummy(input, group_size, emit_bf16, transpose_scale),
        )


def tensor_model_parallel_fused_allreduce_rmsnorm(
    input_, residual_inp_, weight_, eps, prefill_support=False, x_pad_to_multiple=0, gemma_norm=False
):
    return base.communicator_ar_rms(input_, residual_inp_, weight_, eps, gemma_norm=gemma_norm)


def tensor_model_parallel_fused_allreduce_rmsnorm_quant(
    input_,
    residual_inp_,
    weight_,
    eps,
    prefill_support=False,
    quant_type="per_token",
    group_size=128,
    emit_bf16=False,
    transpose_scale=False,
    gemma_norm=False,
):
    base.STATE.record(
        "communication_op.quant",
        quant_type=quant_type,
        group_size=group_size,
        emit_bf16=emit_bf16,
        transpose_scale=transpose_scale,
        gemma_norm=gemma_norm,
        weight=weight_,
    )
    if quant_type not in ("per_group", "per_1x128"):
        raise NotImplementedError("the fake implements quant_type='per_group' only")
    return base.communicator_per_group(
        input_, residual_inp_, weight_, eps, group_size, emit_bf16, transpose_scale=transpose_scale
    )


COMM_OP = {
    "tensor_model_parallel_fused_allreduce_rmsnorm": tensor_model_parallel_fused_allreduce_rmsnorm,
    "tensor_model_parallel_fused_allreduce_rmsnorm_quant": tensor_model_parallel_fused_allreduce_rmsnorm_quant,
}


def modules():
    return base.package(VERSION, CustomAllreduce, dict(COMM_OP))
