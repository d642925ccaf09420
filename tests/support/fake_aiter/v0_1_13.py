"""Fake aiter v0.1.13 (and v0.1.12 - v0.1.13.post1, the same API): before the
per-group kernel (aiter PR #2823 landed in v0.1.14). Fused all-reduce + RMSNorm
exists; no Gemma flag, no per-group quant. Its one-stage launcher takes one
block per token and throws above 80 tokens (``ONE_STAGE_ONE_BLOCK_PER_TOKEN``),
and its two-stage kernel races across ranks (``TWO_STAGE_RACES``: every
two-stage call is corruption; fixed by PR #2890 in v0.1.14), base.kernel_verdict.

Signatures traced to ROCm/aiter @ v0.1.13:
  aiter/dist/device_communicators/custom_all_reduce.py
    L608 CustomAllreduce.fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, scale_out=None,
         w, eps, registered=False, use_1stage=False, post_per_token_quant=False)
    L666 CustomAllreduce.custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage)
  aiter/dist/communication_op.py
    L40 tensor_model_parallel_fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps, prefill_support=False)
    L52 tensor_model_parallel_fused_allreduce_rmsnorm_quant(input_, residual_inp_, weight_, eps,
        prefill_support=False)   # per-token quant only: no quant_type
  aiter/ops/quant.py L258 get_hip_quant(qType)
"""

from . import base

VERSION = "0.1.13"


class CustomAllreduce(base.CustomAllreduceBase):
    TWO_STAGE_RACES = True

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
    ):
        if post_per_token_quant:
            raise NotImplementedError("the fake has no per-token quant")
        return self._ar_rms(
            "CustomAllreduce.fused_ar_rms", inp, res_inp, w, eps, registered=registered, use_1stage=use_1stage
        )

    def custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage):
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


def tensor_model_parallel_fused_allreduce_rmsnorm(input_, residual_inp_, weight_, eps, prefill_support=False):
    return base.communicator_ar_rms(input_, residual_inp_, weight_, eps)


def tensor_model_parallel_fused_allreduce_rmsnorm_quant(input_, residual_inp_, weight_, eps, prefill_support=False):
    raise NotImplementedError("per-token quant: not what this project calls")


def modules():
    return base.package(
        VERSION,
        CustomAllreduce,
        {
            "tensor_model_parallel_fused_allreduce_rmsnorm": tensor_model_parallel_fused_allreduce_rmsnorm,
            "tensor_model_parallel_fused_allreduce_rmsnorm_quant": tensor_model_parallel_fused_allreduce_rmsnorm_quant,
        },
    )
