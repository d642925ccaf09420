"""aiter's own custom all-reduce switches reach the fused kernels: every fused
call is first put to ``CustomAllreduce.should_custom_ar``, which from aiter
0.1.18 honours AITER_CUSTOM_AR_MAX_SIZE (0: off) and AITER_CUSTOM_AR_MIN_SIZE.
The fakes count a fused call for an input should_custom_ar declines as a
violation (aiter's ``fused_ar_rms*`` methods do not ask it themselves)."""

from __future__ import annotations

import argparse

import torch

from support.rocm_harness import PER_GROUP, Case, last_path, run_op
from vllm_rocm_fused.cli import doctor
from vllm_rocm_fused.ops import backends
from vllm_rocm_fused.ops.reference import norm_quant_reference


def aiter_kernel_calls(fake) -> list[str]:
    return [c.name for c in fake.state.calls if "use_1stage" in c.args]


def doctor_text(tokens=(1, 1024)) -> str:
    args = argparse.Namespace(json=False, world_size=2, hidden=2048, tokens=list(tokens), dtype="bfloat16")
    return doctor.render(doctor.collect(args))


def spec_of(case: Case) -> backends.CallSpec:
    t, h = case.x.shape
    fp8 = torch.float8_e4m3fn
    return backends.CallSpec(
        t, h, case.x.dtype, torch.device("cpu"), case.world_size, 128, 1.0, False, "row", fp8, True
    )


def test_custom_all_reduce_off_keeps_every_call_off_aiters_kernels(rocm, monkeypatch):
    monkeypatch.setenv("AITER_CUSTOM_AR_MAX_SIZE", "0")
    fake = rocm.use("v0_1_20", "gfx950")
    case = Case(tokens=4, hidden=2048)
    comm = rocm.vllm_comm(case)
    for quantize in (True, False):
        backends.reset_counters()
        out = run_op(comm, case, quantize=quantize)
        assert last_path() == "generic"
        ref = norm_quant_reference(
            case.h, case.residual, case.weight, 1e-6, out_dtype=case.x.dtype, weight_offset=1.0, quantize=quantize
        )
        torch.testing.assert_close(out.residual, ref.residual, rtol=0, atol=0)
    assert aiter_kernel_calls(fake) == []
    assert "aiter's custom all-reduce is off (AITER_CUSTOM_AR_MAX_SIZE=0" in rocm.backend.describe(spec_of(case), comm)
    text = doctor_text()
    assert (
        "backend rocm: aiter switches: AITER_CUSTOM_AR_MAX_SIZE=0, AITER_CUSTOM_AR_MIN_SIZE unset: "
        "aiter's custom all-reduce is off, so every call takes the portable path"
    ) in text
    assert "attention input: tokens 1,1024 -> native (generic)" in text
    assert backends.disabled_paths() == []


def test_size_window_decides_per_call(rocm, monkeypatch):
    """(min, max] from AITER_CUSTOM_AR_MIN_SIZE / MAX_SIZE, bytes; aiter 0.1.18."""
    monkeypatch.setenv("AITER_CUSTOM_AR_MIN_SIZE", "8192")
    monkeypatch.setenv("AITER_CUSTOM_AR_MAX_SIZE", "131072")
    fake = rocm.use("v0_1_18", "gfx950")
    paths = {}
    for tokens in (1, 2, 3, 32, 33):  # 4, 8, 12, 128, 132 KiB
        case = Case(tokens=tokens, hidden=2048)
        comm = rocm.vllm_comm(case)
        backends.reset_counters()
        run_op(comm, case)
        paths[tokens] = last_path()
    assert paths == {1: "generic", 2: "generic", 3: "fused-1", 32: "fused-1", 33: "generic"}
    assert [c.args["inp"].shape[0] for c in fake.calls(PER_GROUP)] == [3, 32]
    assert "input 135168 bytes > AITER_CUSTOM_AR_MAX_SIZE=131072: aiter sends it to RCCL" in (
        rocm.backend.plan(spec_of(Case(tokens=33, hidden=2048)), comm).summary()
    )
    assert "take inputs of 8193-131072 bytes" in doctor_text()


def test_aiter_without_the_switches_is_told_apart(rocm, monkeypatch):
    """aiter 0.1.17 has no such variables: a value set for it changes nothing, and
    doctor says the switches are not there."""
    monkeypatch.setenv("AITER_CUSTOM_AR_MAX_SIZE", "0")
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case(tokens=4, hidden=2048)
    run_op(rocm.vllm_comm(case), case)
    assert last_path() == "fused-1" and len(fake.calls(PER_GROUP)) == 1
    assert (
        "backend rocm: aiter switches: AITER_CUSTOM_AR_MAX_SIZE=0, AITER_CUSTOM_AR_MIN_SIZE unset: this aiter "
        "has no such switches (aiter 0.1.18 added them)"
    ) in doctor_text()


def test_gate_asks_aiter_once_per_size_with_a_stand_in(rocm, monkeypatch):
    """The gate is aiter's own should_custom_ar, asked with a contiguous meta tensor
    of the call's shape (never the caller's tensor), once per input size; two ranks
    with the same environment get the same answers (it depends on size and on state
    aiter fixed at construction only)."""
    monkeypatch.setenv("AITER_CUSTOM_AR_MIN_SIZE", "8192")
    rocm.use("v0_1_20", "gfx950")
    asked: list[tuple[str, bool, tuple[int, ...]]] = []
    comms = []
    for rank in (0, 1):
        ca = rocm.ca_class()(Case().group(), torch.device("cpu"), max_size=8192 * 1024 * 8 * 2)
        own = ca.should_custom_ar

        def spy(inp, prefill_support=False, own=own, rank=rank):
            if rank == 0:
                asked.append((inp.device.type, inp.is_contiguous(), tuple(inp.shape)))
            return own(inp, prefill_support)

        ca.should_custom_ar = spy
        comms.append(rocm.vllm_comm(Case(), ca=ca))
    for tokens in (1, 1, 2, 2, 64, 1):
        case = Case(tokens=tokens, hidden=2048)
        plans = [rocm.backend.plan(spec_of(case), comm) for comm in comms]
        assert [s.key for s in plans[0].steps] == [s.key for s in plans[1].steps]
        assert plans[0].why_not == plans[1].why_not
    assert asked == [("meta", True, (1, 2048)), ("meta", True, (2, 2048)), ("meta", True, (64, 2048))]
    assert rocm.backend.plan(spec_of(Case(tokens=1, hidden=2048)), comms[0]).steps == []
