"""The vLLM CustomOp through vLLM's own TP group on the CPU platform (2 ranks)."""

import torch

from support.dist import run_ranks
from support.markers import requires_vllm
from support.op_workers import rank_inputs, vllm_custom_op_rank
from vllm_rocm_fused.ops.reference import norm_quant_reference

CASES = [
    (7, 256, "row", False, True),
    (33, 512, "col", True, True),
    (5, 384, "row", False, False),
]


@requires_vllm
def test_custom_op_reduces_over_vllm_tp_group():
    results = run_ranks(vllm_custom_op_rank, 2, CASES)
    for i, (t, h, layout, emit, quantize) in enumerate(CASES):
        ins = [rank_inputs(r, t, h, seed=i) for r in range(2)]
        x0, residual, weight = ins[0]
        # vLLM's CPU all-reduce sums in bf16; with two ranks that is one rounding of the exact sum
        total = (ins[0][0].float() + ins[1][0].float()).to(torch.bfloat16)
        ref = norm_quant_reference(
            total,
            residual,
            weight,
            1e-6,
            out_dtype=torch.bfloat16,
            weight_offset=1.0,
            emit_bf16=emit,
            scale_layout=layout,
            quantize=quantize,
        )
        for rank in range(2):
            (q, scale, res, normed), counters, method = results[rank][i]
            assert method == "forward_cpu"
            assert counters["generic"] == 1
            torch.testing.assert_close(res, ref.residual, rtol=0, atol=0)
            if quantize:
                torch.testing.assert_close(scale, ref.scale, rtol=0, atol=0)
                assert scale.stride() == ref.scale.stride()
                assert torch.equal(q.view(torch.uint8), ref.q.view(torch.uint8))
            else:
                assert q is None and scale is None
            if emit or not quantize:
                torch.testing.assert_close(normed, ref.normed, rtol=0, atol=0)
