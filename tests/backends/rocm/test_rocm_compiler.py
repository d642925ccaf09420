"""The clang < 20 guard (aiter's multi-stage per-group kernels add bf16 residuals
as integers when built by it) is decided from the compiler aiter JIT-builds with
-- the hipcc of the ROCm install aiter's JIT found, as aiter read it at import --
not from the HIP torch was built against; an unknown compiler counts as
clang < 20. The fake's kernels are built by ``compiler_hip``: a multi-stage bf16
per-group call on a clang-19 build fails the test."""

from __future__ import annotations

import argparse

from support.rocm_harness import AR_RMS, PER_GROUP, Case, last_path, run_op
from vllm_rocm_fused.cli import doctor
from vllm_rocm_fused.ops import backends

ROCM6, ROCM7 = "6.4.43482", "7.0.51831"


def doctor_text() -> str:
    args = argparse.Namespace(json=False, world_size=2, hidden=1024, tokens=[64, 100], dtype="bfloat16")
    return doctor.render(doctor.collect(args))


def paths_for(rocm, tokens_list=(64, 100)) -> dict[int, str]:
    """The path of a bf16 attention-site call at each token count (hidden 1024, TP=2):
    64 tokens take the one-stage kernel by vLLM's rule, 100 tokens a multi-stage one."""
    paths = {}
    for tokens in tokens_list:
        case = Case(tokens=tokens, hidden=1024)
        backends.reset_counters()
        run_op(rocm.vllm_comm(case), case)
        paths[tokens] = last_path()
    return paths


def test_rocm7_torch_on_a_rocm6_hipcc(rocm):
    """A ROCm 7 torch wheel over an older ROCm install: aiter's kernels come from
    clang 19, so above vLLM's one-stage cut bf16 goes to fused-2."""
    fake = rocm.use("v0_1_20", "gfx950", hip=ROCM7, compiler_hip=ROCM6)
    assert paths_for(rocm) == {64: "fused-1", 100: "fused-2"}
    assert [c.args["variant"] for c in fake.calls(PER_GROUP)] == ["one-stage"]
    assert fake.calls(AR_RMS)[-1].args["variant"] == "two-stage"  # plain AR+RMSNorm converts to float32: fine
    assert not fake.calls("cpp_extension.get_hip_version")  # aiter's answer is read, hipconfig is not run again
    text = doctor_text()
    assert (
        f"backend rocm: ROCm: torch HIP {ROCM7}; aiter builds with the hipcc of ROCM_HOME=/opt/rocm "
        f"(HIP {ROCM6}): clang < 20 (ROCm < 7)"
    ) in text
    assert "tokens 100 -> rocm (fused-2 two-stage" in text
    assert (
        f"the multi-stage per-group kernels add bf16 residuals as integers when built by clang < 20 (aiter's hipcc is HIP {ROCM6})"
        in text
    )


def test_unknown_compiler_counts_as_clang_19(rocm):
    """aiter's JIT settings cannot be read: fail closed (its kernels here are in
    fact clang-19 builds)."""
    rocm.use("v0_1_20", "gfx950", hip=ROCM7, compiler_hip=ROCM6, jit_visible=False)
    assert paths_for(rocm) == {64: "fused-1", 100: "fused-2"}
    note = rocm.backend.details()["ROCm"]
    assert note.startswith(f"torch HIP {ROCM7}; aiter's compiler unknown (aiter's JIT settings not readable")
    assert "clang < 20 assumed" in note


def test_hip_clang_path_outside_the_rocm_install(rocm, monkeypatch):
    """HIP_CLANG_PATH gives hipcc another clang: its version is unknown, so clang < 20
    is assumed; a HIP_CLANG_PATH inside ROCM_HOME changes nothing."""
    fake = rocm.use("v0_1_20", "gfx950", hip=ROCM7, compiler_hip=ROCM6)
    fake.state.jit = {"HIP_VERSION": ROCM7, "ROCM_HOME": "/opt/rocm"}  # hipconfig says 7, the clang is older
    monkeypatch.setenv("HIP_CLANG_PATH", "/usr/lib/llvm-19/bin")
    assert paths_for(rocm) == {64: "fused-1", 100: "fused-2"}
    assert (
        "HIP_CLANG_PATH=/usr/lib/llvm-19/bin gives hipcc a clang from outside ROCM_HOME"
        in (rocm.backend.details()["ROCm"])
    )

    fake = rocm.use("v0_1_20", "gfx950", hip=ROCM7)
    monkeypatch.setenv("HIP_CLANG_PATH", "/opt/rocm/llvm/bin")
    assert paths_for(rocm) == {64: "fused-1", 100: "fused-1"}
    assert fake.calls(PER_GROUP)[-1].args["variant"] == "two-stage"


def test_rocm6_torch_on_a_rocm7_hipcc(rocm):
    """The other way round: the kernels are clang-20 builds, every variant runs."""
    fake = rocm.use("v0_1_20", "gfx950", hip=ROCM6, compiler_hip=ROCM7)
    assert paths_for(rocm) == {64: "fused-1", 100: "fused-1"}
    assert [c.args["variant"] for c in fake.calls(PER_GROUP)] == ["one-stage", "two-stage"]
    assert "clang >= 20" in rocm.backend.details()["ROCm"]
