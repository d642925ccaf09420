"""Which step the ROCm backend takes, and exactly what reaches aiter.

Each aiter API generation is its own fake module (tests/support/fake_aiter); the
fake records every call's arguments, so a wrong keyword, a missing (1 + w), an
implicit int8 quant or a mis-laid scale shows up here, not on an MI355.
"""

from __future__ import annotations

import pytest
import torch

from support.rocm_harness import (
    AR_RMS,
    ARCH_FP8,
    FN,
    FNUZ,
    HIP_QUANT,
    PER_GROUP,
    Case,
    last_path,
    run_op,
)
from vllm_rocm_fused.ops import backends
from vllm_rocm_fused.ops.backends import CallSpec

# (id, generation, arch, op kwargs, expected path, aiter entries called, in order)
SELECTION = [
    ("v17-gfx950-attn", "v0_1_17", "gfx950", {}, "fused-1", [PER_GROUP]),
    ("v17-gfx950-gdn-col", "v0_1_17", "gfx950", dict(emit_bf16=True, scale_layout="col"), "fused-1", [PER_GROUP]),
    ("v14-gfx950-gdn-col", "v0_1_14", "gfx950", dict(emit_bf16=True, scale_layout="col"), "fused-1", [PER_GROUP]),
    ("v18-gfx950-col", "v0_1_18", "gfx950", dict(scale_layout="col"), "fused-1", [PER_GROUP]),
    ("v17-gfx950-gs64", "v0_1_17", "gfx950", dict(group_size=64), "fused-1", [PER_GROUP]),
    ("v17-gfx942-attn", "v0_1_17", "gfx942", {}, "fused-2", [AR_RMS, HIP_QUANT]),
    (
        "v17-gfx942-gdn-col",
        "v0_1_17",
        "gfx942",
        dict(emit_bf16=True, scale_layout="col"),
        "fused-2",
        [AR_RMS, HIP_QUANT],
    ),
    ("v13-gfx950-attn", "v0_1_13", "gfx950", {}, "fused-2", [AR_RMS, HIP_QUANT]),
    ("v14-gfx942-attn", "v0_1_14", "gfx942", {}, "fused-2", [AR_RMS, HIP_QUANT]),
    ("v17-gfx942-gs64", "v0_1_17", "gfx942", dict(group_size=64), "generic", []),
    ("v17-norm-only", "v0_1_17", "gfx942", dict(quantize=False), "fused-1", [AR_RMS]),
    ("v13-norm-only", "v0_1_13", "gfx950", dict(quantize=False), "fused-1", [AR_RMS]),
    ("v17-plain-rmsnorm", "v0_1_17", "gfx950", dict(weight_offset=0.0), "fused-1", [PER_GROUP]),
]


def aiter_calls(fake) -> list[str]:
    return [c.name for c in fake.state.calls if c.name != "CustomAllreduce.__init__"]


@pytest.mark.parametrize("gen,arch,kwargs,path,entries", [c[1:] for c in SELECTION], ids=[c[0] for c in SELECTION])
def test_step_choice_and_aiter_calls(rocm, gen, arch, kwargs, path, entries):
    fake = rocm.use(gen, arch)
    case = Case(tokens=5, hidden=512)
    comm = rocm.vllm_comm(case)
    out = run_op(comm, case, arch=arch, **kwargs)
    assert last_path() == path
    assert aiter_calls(fake) == entries
    chosen = "native" if path == "generic" else "rocm"  # nothing eligible: auto picks native itself
    assert backends.backend_counters() == {f"{chosen}/{path}": 1}
    if kwargs.get("quantize", True):
        assert out.q.dtype == ARCH_FP8[arch]


def test_per_group_arguments_are_exact(rocm):
    """(1 + w) in x.dtype, group size, emit_bf16, transpose_scale, unregistered
    buffers outside graph capture, one-stage below 128 KiB."""
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case(tokens=3, hidden=256)
    comm = rocm.vllm_comm(case)
    run_op(comm, case, emit_bf16=True, scale_layout="col")
    (call,) = fake.calls(PER_GROUP)
    a = call.args
    assert a["w"].dtype == torch.bfloat16
    assert torch.equal(a["w"], (case.weight.float() + 1.0).to(torch.bfloat16))
    assert a["group_size"] == 128 and a["emit_bf16"] is True and a["transpose_scale"] is True
    assert a["registered"] is False and a["use_1stage"] is True
    assert a["eps"] == 1e-6
    assert torch.equal(a["inp"], case.x) and torch.equal(a["res_inp"], case.residual)


def test_options_are_not_passed_to_a_generation_without_them(rocm):
    """v0.1.14 has no transpose_scale: the backend must not pass it (TypeError),
    and still hand back column-major scales."""
    fake = rocm.use("v0_1_14", "gfx950")
    case = Case()
    comm = rocm.vllm_comm(case)
    out = run_op(comm, case, scale_layout="col")
    (call,) = fake.calls(PER_GROUP)
    assert call.args["transpose_scale"] is False  # the fake's default: nothing was passed
    assert out.scale.stride() == (1, case.x.shape[0])


@pytest.mark.parametrize(
    "world_size,tokens,hidden,one_stage",
    [
        (2, 80, 1024, True),
        (2, 81, 256, False),  # vLLM's 80-token cap, also where bytes are few
        (4, 127, 1024, False),
        (4, 64, 1024, True),
        (4, 128, 1024, False),  # < 256 KiB at TP=4
        (8, 63, 1024, True),
        (8, 64, 1024, False),  # < 128 KiB at TP=8
    ],
)
def test_one_stage_by_vllms_rule(rocm, world_size, tokens, hidden, one_stage):
    fake = rocm.use("v0_1_20", "gfx950")
    case = Case(tokens=tokens, hidden=hidden, world_size=world_size)
    run_op(rocm.vllm_comm(case), case)
    (call,) = fake.calls(PER_GROUP)
    assert call.args["use_1stage"] is one_stage


def test_two_kernel_arguments(rocm):
    """gfx942: fused AR+RMSNorm with aiter's Gemma flag (raw w), then the quant with
    the FP8 type passed explicitly (its default is int8)."""
    fake = rocm.use("v0_1_17", "gfx942")
    case = Case()
    comm = rocm.vllm_comm(case)
    out = run_op(comm, case, arch="gfx942", scale_layout="col")
    (ar,) = fake.calls(AR_RMS)
    assert ar.args["gemma_norm"] is True and torch.equal(ar.args["w"], case.weight)
    (quant,) = fake.calls(HIP_QUANT)
    # column-major consumer: the quant writes its scales transposed, handed on as a view
    assert quant.args["quant_dtype"] == FNUZ and quant.args["transpose_scale"] is True
    assert quant.args["group_size"] == 128
    assert out.q.dtype == FNUZ and out.scale.stride() == (1, case.x.shape[0])
    row = run_op(comm, case, arch="gfx942", scale_layout="row")
    assert fake.calls(HIP_QUANT)[-1].args["transpose_scale"] is False
    torch.testing.assert_close(out.scale, row.scale, rtol=0, atol=0)  # the same values either way


def test_two_kernel_without_gemma_flag_passes_one_plus_w(rocm):
    fake = rocm.use("v0_1_13", "gfx950")
    case = Case()
    run_op(rocm.vllm_comm(case), case, quantize=False)
    (ar,) = fake.calls(AR_RMS)
    assert ar.args["gemma_norm"] is False
    assert torch.equal(ar.args["w"], (case.weight.float() + 1.0).to(torch.bfloat16))


def spec(**kw) -> CallSpec:
    base = dict(
        num_tokens=4,
        hidden=4096,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        world_size=2,
        group_size=128,
        weight_offset=1.0,
        emit_bf16=False,
        scale_layout="row",
        quant_dtype=FN,
        has_residual=True,
        quantize=True,
        capturing=False,
    )
    base.update(kw)
    return CallSpec(**base)


# (id, spec overrides, expected reason fragment; None = fused-1 eligible)
ELIGIBILITY = [
    ("ok", {}, None),
    ("ws4", dict(world_size=4), None),
    ("ws8", dict(world_size=8), None),
    ("ws6", dict(world_size=6), "world size 6"),
    ("hidden-8192", dict(hidden=8192), None),
    ("hidden-16384", dict(hidden=16384, num_tokens=1), "fused-2"),  # AR+RMSNorm + quant only
    ("hidden-16512", dict(hidden=16512, num_tokens=1), "n too large"),
    ("below-64MiB", dict(num_tokens=8191), None),
    ("at-64MiB", dict(num_tokens=8192), "64 MiB"),
    ("no-tokens", dict(num_tokens=0), "no tokens"),
    ("no-residual", dict(has_residual=False), "no residual"),
    ("fp32", dict(dtype=torch.float32), "dtype float32"),
    ("fnuz-on-gfx950", dict(quant_dtype=FNUZ), "not gfx950's FP8"),
]


@pytest.mark.parametrize("overrides,fragment", [c[1:] for c in ELIGIBILITY], ids=[c[0] for c in ELIGIBILITY])
def test_eligibility_boundaries(rocm, overrides, fragment):
    rocm.use("v0_1_17", "gfx950")
    s = spec(**overrides)
    comm = rocm.vllm_comm(Case(world_size=s.world_size if s.world_size in (2, 4, 6, 8) else 2), register=False)
    comm.world_size = s.world_size
    plan = rocm.backend.plan(s, comm)
    reason = rocm.backend.ineligible_reason(s, comm)
    if fragment is None:
        assert reason is None and plan.steps[0].path == "fused-1", plan.why_not
    elif fragment == "fused-2":
        assert reason is None and plan.steps[0].path == "fused-2", plan.why_not
        assert "unsupported n" in plan.why_not["per-group"]
    else:
        assert reason is not None and fragment in reason, reason


def test_graph_capture_state(rocm):
    """Registered buffers only while capturing inside the object's capture()
    context; a process group's own CustomAllreduce is never built while capturing."""
    rocm.use("v0_1_17", "gfx950")
    comm = rocm.vllm_comm(Case(), register=False)
    ca = comm.coordinator.device_communicator.aiter_ar_comm.aiter_ca
    assert not rocm.backend._registered(ca, spec(capturing=True))
    with ca.capture():
        assert rocm.backend._registered(ca, spec(capturing=True))
        assert not rocm.backend._registered(ca, spec(capturing=False))
        ca.enable_register_for_capturing = False
        assert not rocm.backend._registered(ca, spec(capturing=True))


def test_tp1_and_unknown_arch_are_explained(rocm):
    rocm.use("v0_1_17", "gfx1100")
    comm = rocm.vllm_comm(Case(), register=False)
    assert "gfx942 and gfx950 only" in rocm.backend.ineligible_reason(spec(), comm)
    assert "one rank" in rocm.backend.ineligible_reason(spec(world_size=1), None)


def test_vllm_without_aiter_custom_all_reduce(rocm):
    rocm.use("v0_1_17", "gfx950")
    case = Case()
    comm = rocm.vllm_comm(case)
    comm.coordinator.device_communicator.aiter_ar_comm = None
    comm.extras.clear()
    reason = rocm.backend.ineligible_reason(spec(hidden=256), comm)
    assert "no aiter custom all-reduce" in reason and "VLLM_ROCM_USE_AITER=1" in reason
    run_op(comm, case)
    assert last_path() == "generic"
    # a disabled object is named as such
    comm2 = rocm.vllm_comm(case)
    comm2.coordinator.device_communicator.aiter_ar_comm.aiter_ca.disabled = True
    assert "disabled" in rocm.backend.ineligible_reason(spec(hidden=256), comm2)
