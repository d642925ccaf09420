"""Which aiter builds the backend uses, and how far: v0.1.11 and older not at all
(outputs left unwritten, racing two-stage kernel), v0.1.12 - v0.1.13.post1 and
builds older than the race fix only in one-stage kernels, v0.1.14 on fully.
The fakes model the upstream faults (support/fake_aiter: ``FIXED_HIDDEN``,
``TWO_STAGE_RACES``): a call into one of them fails the test."""

from __future__ import annotations

import argparse

import pytest
import torch

from support.rocm_harness import AR_RMS, PER_GROUP, Case, last_path, run_op
from vllm_rocm_fused.cli import doctor
from vllm_rocm_fused.ops import backends
from vllm_rocm_fused.ops.reference import norm_quant_reference


def aiter_calls(fake) -> list[str]:
    return [c.name for c in fake.state.calls if c.name != "CustomAllreduce.__init__"]


def doctor_text(world_size=2, tokens=(1, 100)) -> str:
    args = argparse.Namespace(json=False, world_size=world_size, hidden=4096, tokens=list(tokens), dtype="bfloat16")
    return doctor.render(doctor.collect(args))


def check_spec(out, case: Case) -> None:
    """The portable path's outputs: the spec itself."""
    ref = norm_quant_reference(case.h, case.residual, case.weight, 1e-6, out_dtype=case.x.dtype, weight_offset=1.0)
    torch.testing.assert_close(out.residual, ref.residual, rtol=0, atol=0)
    assert torch.equal(out.q.view(torch.uint8), ref.q.view(torch.uint8))


def spec_of(case: Case, quantize=True) -> backends.CallSpec:
    t, h = case.x.shape
    fp8 = torch.float8_e4m3fn
    return backends.CallSpec(
        t, h, case.x.dtype, torch.device("cpu"), case.world_size, 128, 1.0, False, "row", fp8, True, quantize=quantize
    )


def test_aiter_0_1_11_is_not_used(rocm):
    """No IPCBufferPool: the backend is unavailable, says why, and sends nothing,
    not even a call its one-stage template would take."""
    fake = rocm.use("v0_1_11", "gfx950")
    reason = rocm.backend.unavailable_reason()
    assert reason is not None and "aiter 0.1.11.post1 is older than 0.1.12 (no IPCBufferPool)" in reason
    assert "unwritten" in reason
    for tokens, hidden, quantize in ((5, 640, True), (5, 512, False), (100, 4096, True)):
        case = Case(tokens=tokens, hidden=hidden)
        comm = rocm.vllm_comm(case)
        assert not rocm.backend.plan(spec_of(case, quantize), comm).steps  # refused even if asked directly
        backends.reset_counters()
        out = run_op(comm, case, quantize=quantize)
        assert last_path() == "generic"
        if quantize:
            check_spec(out, case)
    assert aiter_calls(fake) == []
    text = doctor_text()
    assert "rocm: unavailable: aiter 0.1.11.post1 is older than 0.1.12" in text
    assert "backend rocm: aiter support: not used: aiter 0.1.11.post1 is older than 0.1.12" in text


# (world size, tokens, hidden, quantize, path): v0.1.12/13, where vLLM would pick the two-stage kernel
RACY = [
    (8, 64, 4096, True, "generic"),  # 512 KiB >= TP=8's 128 KiB one-stage cap
    (4, 32, 4096, False, "generic"),  # 256 KiB >= TP=4's cap
    (2, 100, 4096, True, "generic"),  # > 80 tokens
    (2, 81, 512, False, "generic"),
    (2, 80, 4096, True, "fused-2"),  # one-stage: any size at TP=2
    (4, 16, 4096, False, "fused-1"),  # 128 KiB < 256 KiB
    (8, 5, 512, True, "fused-2"),
]


def test_racing_two_stage_kernel_is_never_sent(rocm):
    """aiter 0.1.12 - 0.1.13.post1: fused-2 and the bf16 norm-only sites use aiter's
    one-stage kernel where vLLM picks it, and the portable path where vLLM would
    pick the two-stage kernel (the fake counts any two-stage call as corruption)."""
    fake = rocm.use("v0_1_13", "gfx950")
    for ws, tokens, hidden, quantize, path in RACY:
        case = Case(tokens=tokens, hidden=hidden, world_size=ws)
        comm = rocm.vllm_comm(case)
        fake.state.calls.clear()
        backends.reset_counters()
        out = run_op(comm, case, quantize=quantize)
        assert last_path() == path, (ws, tokens, hidden, quantize)
        sent = [c for c in fake.state.calls if c.name == AR_RMS]
        assert all(c.args["use_1stage"] and c.args["variant"] == "one-stage" for c in sent)
        if path == "generic":
            assert not sent
            assert (
                "cross-rank race fixed in 0.1.14 by aiter PR #2890"
                in rocm.backend.plan(spec_of(case, quantize), comm).summary()
            )
            if quantize:
                check_spec(out, case)
        else:
            assert len(sent) == 1
    assert backends.disabled_paths() == []


def test_build_older_than_the_fix_is_one_stage_only(rocm, monkeypatch):
    """A build with the per-group methods from before PR #2890 (between the two
    commits: its setuptools-scm version is below 0.1.14) gets one-stage kernels
    only; setuptools-scm's "0.1.0" (no git metadata) does not overrule the capability."""
    fake = rocm.use("v0_1_14", "gfx950")
    monkeypatch.setattr(fake.generation, "VERSION", "0.1.12.post2.dev142+g4331ad7a17")
    small, large = Case(tokens=5, hidden=4096), Case(tokens=100, hidden=4096)
    comm = rocm.vllm_comm(small)
    run_op(comm, small)
    assert last_path() == "fused-1" and fake.calls(PER_GROUP)[-1].args["use_1stage"] is True
    backends.reset_counters()
    run_op(rocm.vllm_comm(large), large)
    assert last_path() == "generic"  # per-group and AR+RMSNorm multi-stage both refused
    assert [c.args["use_1stage"] for c in fake.calls(PER_GROUP)] == [True]
    assert "this build is older" in rocm.backend.details()["aiter support"]

    fake = rocm.use("v0_1_14", "gfx950")
    monkeypatch.setattr(fake.generation, "VERSION", "0.1.0")
    backends.reset_counters()
    run_op(rocm.vllm_comm(large), large)
    assert last_path() == "fused-1" and fake.calls(PER_GROUP)[-1].args["variant"] == "split"
    assert rocm.backend.details()["aiter support"].startswith("0.1.14 or newer")


@pytest.mark.parametrize(
    "gen,support,attention",
    [
        ("v0_1_11", "not used: aiter 0.1.11.post1 is older than 0.1.12", "tokens 1,100 -> native (generic)"),
        (
            "v0_1_13",
            "one-stage kernels only: aiter 0.1.13's two-stage kernels can corrupt output",
            "tokens 1 -> rocm (fused-2 one-stage via CustomAllreduce.fused_ar_rms + get_hip_quant(per_1x128)",
        ),
        ("v0_1_20", "0.1.14 or newer (two-stage race fixed)", "tokens 100 -> rocm (fused-1 split"),
    ],
)
def test_doctor_says_how_far_this_aiter_is_used(rocm, gen, support, attention):
    rocm.use(gen, "gfx950")
    text = doctor_text(world_size=8)
    assert f"backend rocm: aiter support: {support}" in text
    assert attention in text
    if gen == "v0_1_13":
        assert "tokens 100 -> native (generic)" in text
