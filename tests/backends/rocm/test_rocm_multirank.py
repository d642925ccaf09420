"""Two real ranks (gloo): the functional op with a plain process group gets an
aiter CustomAllreduce built for that group once, and the one-kernel path's
outputs equal aiter's numbers for the true sum."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from support.dist import run_ranks
from support.op_workers import rank_inputs
from support.rocm_harness import aiter_expected
from support.rocm_workers import functional_op_rocm_rank

CASES = [
    (5, 256, "row", False, True),
    (9, 512, "col", True, True),
    (3, 384, "row", False, False),
]


def test_process_group_gets_its_own_custom_allreduce():
    results = run_ranks(functional_op_rocm_rank, 2, "v0_1_17", CASES)
    for rank in range(2):
        per_case, n_built, violations = results[rank]
        assert n_built == 1  # built on the first call, reused after
        assert violations == []
        for i, (t, h, layout, emit, quantize) in enumerate(CASES):
            (q, scale, res, normed), counters = per_case[i]
            assert counters == {"rocm/fused-1": 1}
            ins = [rank_inputs(r, t, h, seed=i) for r in range(2)]
            _, residual, weight = ins[rank]
            case = SimpleNamespace(
                x=ins[rank][0], h=ins[0][0].float() + ins[1][0].float(), residual=residual, weight=weight
            )
            if quantize:  # the per-group kernel gets (1 + w) in bf16
                want_res, want_normed, y = aiter_expected(
                    case, kernel="per_group", weight=(weight.float() + 1).to(torch.bfloat16)
                )
            else:  # the AR+RMSNorm kernel's gemma_norm flag keeps 1 + w in float32
                want_res, want_normed, y = aiter_expected(case, kernel="ar_rms", offset=1.0)
            torch.testing.assert_close(res, want_res, rtol=0, atol=0)
            if quantize:
                amax = y.view(t, h // 128, 128).abs().amax(-1)
                torch.testing.assert_close(scale.double(), amax / 448.0, rtol=1e-6, atol=0)
                assert scale.stride() == ((1, t) if layout == "col" else (h // 128, 1))
                deq = (q.double().view(t, h // 128, 128) * scale.double().unsqueeze(-1)).view(t, h)
                assert ((deq - y).abs() <= amax.repeat_interleave(128, dim=1) / 448.0 * 16).all()
            else:
                assert q is None and scale is None
            if emit or not quantize:
                torch.testing.assert_close(normed, want_normed, rtol=0, atol=0)
