"""Two real ranks (gloo): the functional op with a plain process group gets an
aiter CustomAllreduce built for that group once, and the one-kernel path's
outputs equal the reference of the true sum."""

from __future__ import annotations

import torch

from support.dist import run_ranks
from support.op_workers import rank_inputs
from support.rocm_workers import functional_op_rocm_rank
from vllm_rocm_fused.ops.reference import norm_quant_reference

CASES = [
    (5, 256, "row", False, True),
    (9, 512, "col", True, True),
    (3, 384, "row", False, False),
]


def test_process_group_gets_its_own_custom_allreduce():
    results = run_ranks(functional_op_rocm_rank, 2, "v0_1_17", CASES)
    for rank in range(2):
        per_case, n_built = results[rank]
        assert n_built == 1  # built on the first call, reused after
        for i, (t, h, layout, emit, quantize) in enumerate(CASES):
            (q, scale, res, normed), counters = per_case[i]
            assert counters == {"rocm/fused-1": 1}
            ins = [rank_inputs(r, t, h, seed=i) for r in range(2)]
            total = ins[0][0].float() + ins[1][0].float()
            _, residual, weight = ins[rank]
            if quantize:  # the per-group kernel gets (1 + w) in bf16
                w, offset = (weight.float() + 1).to(torch.bfloat16), 0.0
            else:  # the AR+RMSNorm kernel's gemma_norm flag keeps 1 + w in float32
                w, offset = weight, 1.0
            ref = norm_quant_reference(total, residual, w, 1e-6, out_dtype=torch.bfloat16, weight_offset=offset,
                                       emit_bf16=emit, scale_layout=layout, quantize=quantize)
            torch.testing.assert_close(res, ref.residual, rtol=0, atol=0)
            if quantize:
                assert torch.equal(q.view(torch.uint8), ref.q.view(torch.uint8))
                torch.testing.assert_close(scale, ref.scale, rtol=0, atol=0)
                assert scale.stride() == ref.scale.stride()
            else:
                assert q is None and scale is None
            if emit or not quantize:
                torch.testing.assert_close(normed, ref.normed, rtol=0, atol=0)
