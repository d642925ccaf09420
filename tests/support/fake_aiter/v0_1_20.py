"""Fake aiter v0.1.19.post2 - v0.1.20.post1 and main as of 2026-08 (the newest
source read; vLLM 0.33 pins v0.1.21.post2, whose source was not available to
check): v0.1.17's API (``transpose_scale`` back on the per-group methods, PR
#4478; ``gemma_norm``; looping one-stage launchers) plus ``emit_bf16`` on
``fused_ar_rms`` (from v0.1.18; not used by this project) and v0.1.18's
AITER_CUSTOM_AR_MAX_SIZE / MIN_SIZE switches (v0.1.20.post1 L122-L243, L1127-L1157).

Signatures traced to ROCm/aiter @ v0.1.20.post1:
  aiter/dist/device_communicators/custom_all_reduce.py
    L1452 CustomAllreduce.fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, scale_out=None, w, eps,
          registered=False, use_1stage=False, post_per_token_quant=False, out_hidden_dim=0, gemma_norm=False,
          emit_bf16=False)
    L1548 CustomAllreduce.custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage,
          out_hidden_dim=0, gemma_norm=False)
    L1704 CustomAllreduce.fused_ar_rms_per_group_quant(self, inp, res_inp, *, w, eps, group_size=128,
          registered=False, use_1stage=False, emit_bf16=False, transpose_scale=False)
    L2020 CustomAllreduce.custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps,
          group_size=128, use_1stage=False, emit_bf16=False, transpose_scale=False)
  aiter/dist/communication_op.py: as v0.1.17.
"""

from . import base, v0_1_17, v0_1_18

VERSION = "0.1.20"


class CustomAllreduce(v0_1_18.SizeSwitches, v0_1_17.CustomAllreduce):
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
        emit_bf16=False,
    ):
        if post_per_token_quant or out_hidden_dim or emit_bf16:
            raise NotImplementedError("the fake has no per-token quant, padded output or bf16 mirror here")
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


def modules():
    return base.package(VERSION, CustomAllreduce, dict(v0_1_17.COMM_OP), ca_module=v0_1_18.CA_MODULE)
