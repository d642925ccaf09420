"""Fake aiter of the PyPI-era generation (0.1.7-like): a CustomAllreduce with a
plain all-reduce and no fused all-reduce + RMSNorm method, no communication_op
fused functions. The ROCm backend must call itself unavailable and say why.

Traced to ROCm/aiter: the fused methods (``fused_ar_rms``) appear in
aiter/dist/device_communicators/custom_all_reduce.py by v0.1.13 (L608); this
fake keeps only ``all_reduce``/``custom_all_reduce``.
"""

from . import base

VERSION = "0.1.7"


class CustomAllreduce(base.CustomAllreduceBase):
    def custom_all_reduce(self, input):
        return base.reduce_sum(self.group, input).to(input.dtype)


def modules():
    return base.package(VERSION, CustomAllreduce, {}, ca_module={})
