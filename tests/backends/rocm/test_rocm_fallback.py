"""A step that raises takes every rank of the group off the rocm backend for that
call size, logged once, and the call is redone on the portable path with correct
outputs; a step that declines is just skipped.
Also: API generations arranged differently from the ones the code was written
against still reach the right step."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from support import fake_aiter
from support.fake_aiter import base as fake_base
from support.rocm_harness import (
    AR_RMS,
    HIP_QUANT,
    PER_GROUP,
    Case,
    aiter_expected,
    hip_quant_expected,
    last_path,
    run_op,
)
from vllm_rocm_fused.ops import backends
from vllm_rocm_fused.ops.reference import norm_quant_reference


def warnings_about(log, text: str) -> list[str]:
    return [r.getMessage() for r in log.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def check_exact(out, case: Case, *, emit_bf16=False, scale_layout="row", quant_dtype=torch.float8_e4m3fn):
    """Outputs of a path that honours (1 + w) in float32 (fused-2 with gemma_norm, generic)."""
    ref = norm_quant_reference(
        case.h,
        case.residual,
        case.weight,
        1e-6,
        out_dtype=case.x.dtype,
        weight_offset=1.0,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
    )
    torch.testing.assert_close(out.residual, ref.residual, rtol=0, atol=0)
    assert torch.equal(out.q.view(torch.uint8), ref.q.view(torch.uint8))
    torch.testing.assert_close(out.scale, ref.scale, rtol=0, atol=0)
    if emit_bf16:
        torch.testing.assert_close(out.normed, ref.normed, rtol=0, atol=0)


def check_two_kernels(out, case: Case, fp8=torch.float8_e4m3fn):
    """fused-2 with aiter's Gemma flag: aiter's AR+RMSNorm, then per_1x128."""
    residual, normed, _ = aiter_expected(case, kernel="ar_rms", offset=1.0)
    torch.testing.assert_close(out.residual, residual, rtol=0, atol=0)
    q, scale = hip_quant_expected(normed, fp8)
    assert torch.equal(out.q.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(out.scale, scale, rtol=0, atol=0)
    if out.normed is not None:
        torch.testing.assert_close(out.normed, normed, rtol=0, atol=0)


@pytest.mark.parametrize("arch, failing", [("gfx950", PER_GROUP), ("gfx942", AR_RMS)])  # each one's first step
def test_a_step_that_raises_takes_the_group_to_the_portable_path(rocm, plugin_log, arch, failing):
    """A step that raises is not followed by the next step on this rank alone (its peers
    would wait in the step's handshake): the registry takes every rank off the rocm
    backend for that call size and redoes the call on the portable path; the size's
    later calls go there directly, other sizes still take rocm."""
    fake = rocm.use("v0_1_17", arch)
    fake.fail(failing, RuntimeError("hipErrorLaunchFailure"))
    case = Case()
    comm = rocm.vllm_comm(
        case,
    )
    for _ in range(3):
        out = run_op(comm, case, arch=arch, emit_bf16=True)
        check_exact(out, case, emit_bf16=True, quant_dtype=out.q.dtype)
    assert backends.backend_counters() == {"native/generic": 3}
    assert len(fake.calls(failing)) == 1  # never retried at this size
    (msg,) = warnings_about(plugin_log, "hipErrorLaunchFailure")
    assert "every rank disables it for such calls" in msg
    # off for this call size only (another token bucket still takes rocm)
    assert [(name, why) for name, _, why in backends.disabled_paths()] == [
        ("rocm", "raised on rank 0 (RuntimeError: hipErrorLaunchFailure)")
    ]


def test_wrong_fp8_type_from_aiter_takes_the_group_to_the_portable_path(rocm, plugin_log, monkeypatch):
    """A kernel writing another FP8 type would change numerics silently: the host-side
    output check refuses it, and the call is redone on the portable path by every rank."""
    rocm.use("v0_1_17", "gfx950")
    assert rocm.backend.unavailable_reason() is None  # probed: aiter.dtypes.fp8 is e4m3fn
    monkeypatch.setattr(fake_base.STATE, "fp8", torch.float8_e4m3fnuz)  # ...but the kernel writes fnuz
    case = Case()
    comm = rocm.vllm_comm(case)
    out = run_op(comm, case)
    assert out.q.dtype == torch.float8_e4m3fn
    check_exact(out, case)
    assert backends.backend_counters() == {"native/generic": 1}
    (msg,) = warnings_about(plugin_log, "unexpected result")
    assert "float8_e4m3fnuz" in msg


def test_aiter_fp8_type_not_the_arch_type_is_ineligible(rocm):
    """aiter built for another arch (its dtypes.fp8 disagrees with the GPU's)."""
    rocm.use("v0_1_17", "gfx942")
    rocm.backend.set_environment(fake_aiter.FakeRocmEnv("gfx950"))
    case = Case()
    comm = rocm.vllm_comm(case)
    spec = backends.CallSpec(
        4, 256, torch.bfloat16, torch.device("cpu"), 2, 128, 1.0, False, "row", torch.float8_e4m3fn, True
    )
    reason = rocm.backend.ineligible_reason(spec, comm)
    assert "aiter's FP8 type is float8_e4m3fnuz, gfx950's is float8_e4m3fn" in reason


def test_declined_input_goes_down_without_disabling(rocm, plugin_log):
    """The graph-aware methods may return None (decline) for an input the
    backend's own checks and should_custom_ar let through."""
    rocm.use("v0_1_17", "gfx950")
    case = Case()

    def declines(self, input, residual_inp, weight, eps, *args, **kwargs):
        return None

    graph_aware_only = type(
        "CustomAllreduce",
        (fake_base.CustomAllreduceBase,),
        {"custom_fused_ar_rms_per_group_quant": declines, "custom_fused_ar_rms": declines},
    )
    ca = graph_aware_only(case.group(), torch.device("cpu"))
    comm = rocm.vllm_comm(case, ca=ca)
    check_exact(run_op(comm, case), case)
    check_exact(run_op(comm, case), case)
    assert backends.backend_counters() == {"rocm/generic": 2}
    assert backends.disabled_paths() == []
    assert not warnings_about(plugin_log, "")


# --- API generations arranged differently -----------------------------------


def test_graph_aware_methods_only_in_ca_comm_slot(rocm):
    """An aiter object exposing only the custom_* methods, held directly in
    device_communicator.ca_comm (no vLLM wrapper)."""
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case()
    CA = rocm.ca_class()
    cls = type(
        "CustomAllreduce",
        (fake_base.CustomAllreduceBase,),
        {
            "custom_fused_ar_rms_per_group_quant": CA.custom_fused_ar_rms_per_group_quant,
            "custom_fused_ar_rms": CA.custom_fused_ar_rms,
        },
    )
    comm = rocm.vllm_comm(case, ca=cls(case.group(), torch.device("cpu")), slot="ca_comm", wrap=False)
    out = run_op(comm, case, emit_bf16=True, scale_layout="col")
    assert last_path() == "fused-1"
    (call,) = fake.calls("CustomAllreduce.custom_fused_ar_rms_per_group_quant")
    assert call.args["transpose_scale"] is True and call.args["emit_bf16"] is True
    assert out.scale.stride() == (1, case.x.shape[0])


def test_kwargs_only_signature(rocm):
    """A per-group method taking **kwargs: every option is passed."""
    fake = rocm.use("v0_1_14", "gfx950")
    case = Case()
    CA = rocm.ca_class()

    def fused_ar_rms_per_group_quant(self, inp, res_inp, **kw):
        return self._per_group(
            PER_GROUP,
            inp,
            res_inp,
            kw["w"],
            kw["eps"],
            group_size=kw["group_size"],
            registered=kw["registered"],
            use_1stage=kw["use_1stage"],
            emit_bf16=kw.get("emit_bf16", False),
            transpose_scale=kw.get("transpose_scale", False),
        )

    cls = type("CustomAllreduce", (CA,), {"fused_ar_rms_per_group_quant": fused_ar_rms_per_group_quant})
    comm = rocm.vllm_comm(case, ca=cls(case.group(), torch.device("cpu")))
    out = run_op(comm, case, scale_layout="col")
    assert last_path() == "fused-1"
    assert fake.calls(PER_GROUP)[0].args["transpose_scale"] is True
    assert out.scale.stride() == (1, case.x.shape[0])


@pytest.mark.parametrize(
    "gen,entry",
    [
        ("v0_1_14", "communication_op.per_group_fn"),
        ("v0_1_16", "communication_op.quant"),
        ("v0_1_17", "communication_op.quant"),
        ("v0_1_20", "communication_op.quant"),
    ],
)
def test_module_functions_over_aiters_own_tp_group(rocm, gen, entry):
    """No vLLM object; aiter's own TP group spans the same ranks: the
    communication_op generation of that aiter is used."""
    fake = rocm.use(gen, "gfx950")
    case = Case(hidden=512)
    comm = rocm.vllm_comm(case)
    comm.coordinator.device_communicator.aiter_ar_comm = None
    fake.set_tp_group([0, 1], rocm.ca_class()(case.group(), torch.device("cpu")))
    out = run_op(comm, case, emit_bf16=True, scale_layout="col")
    assert last_path() == "fused-1"
    (call,) = fake.calls(entry)
    assert call.args["emit_bf16"] is True
    if "transpose_scale" in call.args:
        assert call.args["transpose_scale"] is True
    assert torch.equal(call.args["weight"], (case.weight.float() + 1).to(torch.bfloat16))
    assert out.scale.stride() == (1, case.x.shape[0])
    _, normed, _ = aiter_expected(case, kernel="per_group", weight=(case.weight.float() + 1).to(torch.bfloat16))
    torch.testing.assert_close(out.normed, normed, rtol=0, atol=0)
    assert not fake.calls(HIP_QUANT)  # one kernel: the communicator did not fall back


def test_module_route_that_always_falls_back_runs_two_kernels_as_fused_2(rocm):
    """v0.1.18 - v0.1.19.post1: communication_op passes transpose_scale to a method
    without it and swallows the TypeError into two kernels. The backend does not
    count that as fused-1: it runs the two kernels itself, as fused-2."""
    fake = rocm.use("v0_1_18", "gfx950")
    case = Case(hidden=512)
    comm = rocm.vllm_comm(case)
    comm.coordinator.device_communicator.aiter_ar_comm = None
    fake.set_tp_group([0, 1], rocm.ca_class()(case.group(), torch.device("cpu")))
    out = run_op(comm, case, emit_bf16=True, scale_layout="col")
    assert last_path() == "fused-2"
    assert not fake.calls("communication_op.quant")
    assert [c.name for c in fake.state.calls if c.name != "CustomAllreduce.__init__"] == [
        "CustomAllreduce.custom_fused_ar_rms",
        HIP_QUANT,
    ]
    assert "always runs two kernels" in rocm.backend.plan(_spec(case), comm).why_not["per-group"]
    check_two_kernels(out, case)


@pytest.mark.parametrize(
    "gen,tokens,hidden,hip,why,path",
    [
        ("v0_1_16", 81, 512, "7.0.51831", "one block per token", "generic"),  # aiter <= 0.1.16's one-stage launchers
        ("v0_1_20", 8, 256, "7.0.51831", "two-stage AR+RMSNorm", "generic"),  # its communicator may pick two-stage
        # > 128 KiB: aiter would pick a multi-stage per-group kernel, bf16 on clang < 20; its AR+RMSNorm is fine
        ("v0_1_20", 100, 1024, "6.4.43482", "integers", "fused-2"),
    ],
)
def test_module_route_refuses_what_aiters_communicator_might_break(rocm, gen, tokens, hidden, hip, why, path):
    fake = rocm.use(gen, "gfx950", hip=hip)
    case = Case(tokens=tokens, hidden=hidden)
    comm = rocm.vllm_comm(case)
    comm.coordinator.device_communicator.aiter_ar_comm = None
    fake.set_tp_group([0, 1], rocm.ca_class()(case.group(), torch.device("cpu")))
    out = run_op(comm, case)
    assert why in rocm.backend.plan(_spec(case), comm).summary()
    assert last_path() == path
    if path == "generic":
        check_exact(out, case)
    else:
        check_two_kernels(out, case)


def _spec(case: Case, **kw) -> backends.CallSpec:
    t, h = case.x.shape
    base = dict(
        num_tokens=t,
        hidden=h,
        dtype=case.x.dtype,
        device=torch.device("cpu"),
        world_size=case.world_size,
        group_size=128,
        weight_offset=1.0,
        emit_bf16=False,
        scale_layout="row",
        quant_dtype=torch.float8_e4m3fn,
        has_residual=True,
    )
    base.update(kw)
    return backends.CallSpec(**base)


def test_aiters_tp_group_over_other_ranks_is_not_used(rocm):
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case()
    comm = rocm.vllm_comm(case)
    comm.coordinator.device_communicator.aiter_ar_comm = None
    fake.set_tp_group([2, 3], rocm.ca_class()(case.group(), torch.device("cpu")))
    run_op(comm, case)
    assert last_path() == "generic"
    assert not fake.calls("communication_op.quant")


def test_fake_generations_are_distinct_modules(rocm):
    """Guard for the double itself: each generation installs its own aiter."""
    seen = set()
    for gen in fake_aiter.USABLE:
        rocm.use(gen)
        aiter = importlib.import_module("aiter")
        seen.add(aiter.__version__)
        installed = importlib.import_module("aiter.dist.device_communicators.custom_all_reduce").CustomAllreduce
        assert installed is importlib.import_module(f"support.fake_aiter.{gen}").CustomAllreduce
    assert seen == {"0.1.13", "0.1.14", "0.1.16", "0.1.17", "0.1.18", "0.1.20"}


def test_plain_modules_enum_quant_type_and_kwargs_only(rocm):
    """aiter put straight into sys.modules (no finder), QuantType a Python Enum, a
    CustomAllreduce with only a graph-aware per-group method taking **kwargs, no
    fused AR+RMSNorm and no communication_op: per-group sites still get fused-1,
    bf16 sites the portable path, and doctor names what is missing."""
    import enum
    import sys
    import types

    class QuantType(enum.Enum):
        per_Token = 2
        per_1x128 = 4

    seen = []

    class CustomAllreduce:
        def __init__(self, group, device):
            self.group, self.disabled = group, False

        def custom_fused_ar_rms_per_group_quant(self, input, residual_inp, weight, eps, **kw):
            seen.append(sorted(kw))
            out = norm_quant_reference(
                self.group.all_reduce(input),
                residual_inp,
                weight,
                eps,
                out_dtype=input.dtype,
                group_size=kw["group_size"],
                emit_bf16=True,
                scale_layout="col" if kw.get("transpose_scale") else "row",
            )
            result = (out.q, out.residual, out.scale, out.normed)  # aiter's order
            return result if kw.get("emit_bf16") else result[:3]

    def package(name, **attrs):
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod

    package("aiter", QuantType=QuantType, get_hip_quant=lambda qt: None)
    package("aiter.dist")
    package("aiter.dist.device_communicators")
    package("aiter.dist.device_communicators.custom_all_reduce", CustomAllreduce=CustomAllreduce)
    rocm.backend.set_environment(fake_aiter.FakeRocmEnv("gfx950"))
    assert rocm.backend.unavailable_reason() is None
    details = rocm.backend.details()
    assert "custom_fused_ar_rms_per_group_quant(emit_bf16, transpose_scale)" in details["aiter"]
    assert "no fused AR+RMSNorm API" in details["aiter"]

    case = Case()
    comm = rocm.vllm_comm(case, ca=CustomAllreduce(case.group(), "cpu"))
    out = run_op(comm, case, emit_bf16=True, scale_layout="col")
    assert last_path() == "fused-1"
    assert seen == [["emit_bf16", "group_size", "transpose_scale", "use_1stage"]]
    ref = norm_quant_reference(
        case.h,
        case.residual,
        (case.weight.float() + 1).to(torch.bfloat16),
        1e-6,
        out_dtype=torch.bfloat16,
        emit_bf16=True,
        scale_layout="col",
    )
    assert torch.equal(out.q.view(torch.uint8), ref.q.view(torch.uint8))
    assert out.scale.stride() == ref.scale.stride()
    backends.reset_counters()
    run_op(comm, case, quantize=False)
    assert last_path() == "generic"


def test_capture_warm_up_gets_aiters_zero_tensors_without_disabling(rocm):
    """Inside capture() but not on a capturing stream (vLLM's warm-up runs before
    each capture) the graph-aware methods return zero tensors, not None: the
    backend passes them on (the warm-up's outputs are discarded, as with vLLM's
    own custom all-reduce) and disables nothing."""
    fake = rocm.use("v0_1_20", "gfx950")
    case = Case()
    CA = rocm.ca_class()
    graph_aware_only = type(
        "CustomAllreduce",
        (fake_base.CustomAllreduceBase,),
        {
            "ONE_STAGE_ONE_BLOCK_PER_TOKEN": False,
            "custom_fused_ar_rms_per_group_quant": CA.custom_fused_ar_rms_per_group_quant,
            "custom_fused_ar_rms": CA.custom_fused_ar_rms,
        },
    )
    ca = graph_aware_only(case.group(), torch.device("cpu"))
    comm = rocm.vllm_comm(case, ca=ca)
    with ca.capture():
        out = run_op(comm, case, emit_bf16=True, scale_layout="col")
    assert last_path() == "fused-1" and backends.disabled_paths() == []
    assert not out.q.float().any() and not out.residual.any() and not out.normed.any()
    assert out.scale.stride() == (1, case.x.shape[0])
    assert not fake.calls("CustomAllreduce.custom_fused_ar_rms_per_group_quant")  # no kernel launched
