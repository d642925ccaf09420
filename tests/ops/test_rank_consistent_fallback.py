"""Every rank of a group takes the same path for a call (ops.backends): a fast backend
that fails on one rank only (gloo, 2-3 spawned ranks, CPU) moves the whole group to
native for that call, which completes with the reference's outputs; where the ranks
cannot agree any more (a later call of a size they agreed on) the failing rank raises
instead of falling back alone. The backend's collective is not the portable path's, so
a rank that left alone would hang or fail these tests (each has a timeout)."""

from __future__ import annotations

import pytest
import torch

from support.check_workers import FAIL_RANK, one_rank_failure_rank
from support.dist import run_ranks
from support.op_workers import rank_inputs
from vllm_rocm_fused.ops.reference import norm_quant_reference
from vllm_rocm_fused.ops.tolerance import compare

CALLS = [(5, 256), (40, 384)]


def reference(world_size, i, t, h):
    ins = [rank_inputs(r, t, h, seed=i) for r in range(world_size)]
    total = torch.stack([x.float() for x, _, _ in ins]).sum(0)
    _, residual, weight = ins[0]
    ref = norm_quant_reference(total, residual, weight, 1e-6, out_dtype=torch.bfloat16, weight_offset=1.0)
    return ref, total, residual, weight


def assert_reference(out, world_size, i, t, h):
    ref, total, residual, weight = reference(world_size, i, t, h)
    errors = compare(
        out,
        tuple(ref),
        h=total,
        residual=residual,
        weight=weight,
        eps=1e-6,
        weight_offset=1.0,
        group_size=128,
        quant_dtype=torch.float8_e4m3fn,
        scale_layout="row",
        emit_bf16=False,
        quantize=True,
    )
    assert errors.ok, errors.describe()


NATIVE, FAST = {"native/generic": 1}, {"one-rank/fused-1": 1}
# (failure, per-call paths): where rank 1 fails, and what every rank must take per call.
# A run that raised disables the backend for that call's token bucket only: the second
# call (another bucket, where it does not fail) runs it again, on every rank.
SCENARIOS = {
    "workspace-cannot-grow-on-one-rank": ("prepare", [NATIVE, NATIVE]),
    "eligibility-differs-by-rank": ("eligible", [NATIVE, NATIVE]),
    "raises-on-one-rank-after-its-kernel": ("after", [NATIVE, FAST]),
}
WORLD = 3
_runs: dict = {}


def scenario_results():
    """Every scenario in one spawn of WORLD ranks (a spawn costs seconds), run once."""
    if not _runs:
        todo = [(failure, CALLS) for failure, _ in SCENARIOS.values()] + [("later", [(5, 256), (5, 256)])]
        results = run_ranks(one_rank_failure_rank, WORLD, todo, timeout=150)
        for i, name in enumerate([*SCENARIOS, "later"]):
            _runs[name] = [results[rank][i] for rank in range(WORLD)]
    return _runs


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_one_rank_failure_moves_every_rank_to_the_same_path(scenario):
    """Per call, every rank took the same path and got the reference's outputs."""
    _, paths = SCENARIOS[scenario]
    per_rank = scenario_results()[scenario]
    for rank in range(WORLD):
        assert len(per_rank[rank]) == len(CALLS)
        for i, ((out, counters), (t, h)) in enumerate(zip(per_rank[rank], CALLS)):
            assert not isinstance(out, str), f"rank {rank}: {out}"
            assert counters == paths[i], (rank, i, counters)
            assert_reference(out, WORLD, i, t, h)


@pytest.mark.timeout(240)
def test_a_later_failure_on_one_rank_fails_loudly_there():
    """The second call of a size the ranks agreed on: the failing rank raises (its
    process would exit: vLLM then stops the server) rather than take native alone."""
    per_rank = scenario_results()["later"]
    for rank in range(WORLD):
        if rank == FAIL_RANK:
            continue
        assert [c for _, c in per_rank[rank]] == [FAST, FAST]
        for i, (out, _) in enumerate(per_rank[rank]):
            assert_reference(out, WORLD, i, 5, 256)
    first, second = per_rank[FAIL_RANK]
    assert first[1] == FAST
    text, counters = second
    assert isinstance(text, str) and "cannot fall back alone" in text and "unexpected output layout" in text
    assert counters == {}
