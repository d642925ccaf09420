"""Outputs through every step against what aiter's kernels really compute (the
spec given aiter's roundings: support.rocm_harness.aiter_expected), for both
scale layouts and with/without the bf16 activation; the roundings themselves
are shown to be real and within one extra rounding of the spec; and the
(1 + w) weight is made once per layer weight, refreshed when it is reloaded."""

from __future__ import annotations

import pytest
import torch

from support.oracle import dequantize, fp8_half_step, rounding_bound
from support.rocm_harness import (
    AR_RMS,
    PER_GROUP,
    Case,
    aiter_expected,
    hip_quant_expected,
    last_path,
    run_op,
)
from vllm_rocm_fused.ops.backends import notify_weight_updated
from vllm_rocm_fused.ops.reference import norm_quant_reference

FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}


def check_per_group_kernel(out, case, *, multi_stage, emit_bf16, layout, fp8):
    """fused-1: residual and bf16 output exactly aiter's; scale = amax(y) / FP8_MAX of
    the float32 normed y (1.0 for an all-zero group); q within half an FP8 step of y."""
    w = (case.weight.float() + 1.0).to(torch.bfloat16)  # what the per-group kernel gets
    residual, normed, y = aiter_expected(case, kernel="per_group", multi_stage=multi_stage, weight=w)
    torch.testing.assert_close(out.residual, residual, rtol=0, atol=0)
    if emit_bf16:
        torch.testing.assert_close(out.normed, normed, rtol=0, atol=0)
    else:
        assert out.normed is None
    t, k = y.shape
    amax = y.view(t, k // 128, 128).abs().amax(-1)
    want_scale = torch.where(amax == 0, torch.ones_like(amax), amax / torch.finfo(fp8).max)
    torch.testing.assert_close(out.scale.double(), want_scale, rtol=1e-6, atol=0)
    assert out.scale.stride() == ((1, t) if layout == "col" else (k // 128, 1))
    sc = out.scale.double().repeat_interleave(128, dim=1)
    err = (dequantize(out.q, out.scale, 128) - y).abs()
    assert (err <= fp8_half_step(y / sc, fp8) * sc * (1 + 1e-6) + 1e-7 * y.abs()).all()


def check_two_kernels(out, case, *, gemma_flag, emit_bf16, layout, fp8):
    """fused-2: AR+RMSNorm exactly aiter's, then per_1x128's q and scale exactly."""
    if gemma_flag:
        residual, normed, _ = aiter_expected(case, kernel="ar_rms", offset=1.0)
    else:
        residual, normed, _ = aiter_expected(case, kernel="ar_rms", weight=(case.weight.float() + 1).to(torch.bfloat16))
    torch.testing.assert_close(out.residual, residual, rtol=0, atol=0)
    q, scale = hip_quant_expected(normed, fp8)
    assert torch.equal(out.q.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(out.scale, scale, rtol=0, atol=0)
    assert out.scale.stride() == ((1, case.x.shape[0]) if layout == "col" else (scale.shape[1], 1))
    if emit_bf16:
        torch.testing.assert_close(out.normed, normed, rtol=0, atol=0)


# (id, generation, arch, failing entry or None, expected path)
PATHS = [
    ("fused-1", "v0_1_20", "gfx950", None, "fused-1"),
    ("fused-1-no-transpose", "v0_1_14", "gfx950", None, "fused-1"),
    ("fused-2-gemma-flag", "v0_1_17", "gfx942", None, "fused-2"),
    ("fused-2-one-plus-w", "v0_1_13", "gfx950", None, "fused-2"),
    # a step that raises takes the group to the portable path (never one step down alone)
    ("generic-after-step1-raised", "v0_1_17", "gfx950", PER_GROUP, "generic"),
    ("generic-after-step2-raised", "v0_1_17", "gfx942", AR_RMS, "generic"),
]


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("emit_bf16", [False, True])
@pytest.mark.parametrize("gen,arch,fail,path", [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_outputs_equal_aiters_numbers(rocm, gen, arch, fail, path, layout, emit_bf16):
    fake = rocm.use(gen, arch)
    if fail:
        fake.fail(fail, RuntimeError("injected"))
    case = Case(tokens=7, hidden=512, world_size=4, seed=3)
    out = run_op(rocm.vllm_comm(case), case, arch=arch, emit_bf16=emit_bf16, scale_layout=layout)
    assert last_path() == path
    assert out.q.dtype == FP8[arch]
    if path == "fused-1":
        check_per_group_kernel(out, case, multi_stage=False, emit_bf16=emit_bf16, layout=layout, fp8=FP8[arch])
        assert (out.scale[:, 0] == 1.0).all()  # the all-zero group: aiter's 1.0, not the spec's floor
    elif path == "fused-2":
        check_two_kernels(out, case, gemma_flag=gen != "v0_1_13", emit_bf16=emit_bf16, layout=layout, fp8=FP8[arch])
    else:  # the portable path: the spec itself
        ref = norm_quant_reference(
            case.h,
            case.residual,
            case.weight,
            1e-6,
            out_dtype=torch.bfloat16,
            weight_offset=1.0,
            emit_bf16=emit_bf16,
            scale_layout=layout,
            quant_dtype=FP8[arch],
        )
        assert torch.equal(out.q.view(torch.uint8), ref.q.view(torch.uint8))
        torch.testing.assert_close(out.residual, ref.residual, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["row", "col"])
def test_multi_stage_per_group_normalizes_the_rounded_residual(rocm, layout):
    """Above vLLM's one-stage cut (here > 80 tokens) the two-stage/split
    per-group kernels add the residual in bf16 and normalize that rounded sum."""
    fake = rocm.use("v0_1_20", "gfx950")
    case = Case(tokens=96, hidden=512, world_size=2, seed=5)
    out = run_op(rocm.vllm_comm(case), case, emit_bf16=True, scale_layout=layout)
    (call,) = fake.calls(PER_GROUP)
    assert call.args["use_1stage"] is False and call.args["variant"] == "two-stage"
    check_per_group_kernel(out, case, multi_stage=True, emit_bf16=True, layout=layout, fp8=torch.float8_e4m3fn)
    # and that is a real difference from normalizing the float32 sum
    _, normed_one_stage, _ = aiter_expected(
        case, kernel="per_group", weight=(case.weight.float() + 1).to(torch.bfloat16)
    )
    assert not torch.equal(out.normed, normed_one_stage)


@pytest.mark.parametrize("gen,arch", [("v0_1_17", "gfx942"), ("v0_1_13", "gfx950")])
def test_norm_only_sites_equal_aiters_numbers(rocm, gen, arch):
    rocm.use(gen, arch)
    case = Case(tokens=5, hidden=512, zero_group=False)
    out = run_op(rocm.vllm_comm(case), case, arch=arch, quantize=False)
    assert last_path() == "fused-1" and out.q is None and out.scale is None
    if gen == "v0_1_17":  # gemma_norm flag: the kernel adds 1 in float32
        residual, normed, _ = aiter_expected(case, kernel="ar_rms", offset=1.0)
    else:
        residual, normed, _ = aiter_expected(case, kernel="ar_rms", weight=(case.weight.float() + 1).to(torch.bfloat16))
    torch.testing.assert_close(out.normed, normed, rtol=0, atol=0)
    torch.testing.assert_close(out.residual, residual, rtol=0, atol=0)


def test_rounded_all_reduce_is_one_extra_rounding_of_the_spec(rocm):
    """aiter rounds the all-reduced sum before the residual add: the residual is
    then within two bf16 roundings of the exact sum (the spec: one), and it does
    differ from the spec's somewhere (four ranks: the float32 sum is not a bf16)."""
    rocm.use("v0_1_20", "gfx942")
    case = Case(tokens=16, hidden=1024, world_size=4, seed=11, zero_group=False)
    out = run_op(rocm.vllm_comm(case), case, arch="gfx942", quantize=False)
    exact = case.h.double() + case.residual.double()
    bound = rounding_bound(case.h.double(), torch.bfloat16) + rounding_bound(exact, torch.bfloat16)
    assert ((out.residual.double() - exact).abs() <= bound).all()
    spec = norm_quant_reference(
        case.h, case.residual, case.weight, 1e-6, out_dtype=torch.bfloat16, weight_offset=1.0, quantize=False
    )
    assert not torch.equal(out.residual, spec.residual)


def test_hip_quant_multiplies_by_the_reciprocal(rocm):
    """fused-2's per_1x128 quant: within the spec's tolerance of the rounded normed
    value, bit-exact with the reciprocal formula; on these inputs it differs from
    the spec's division somewhere, so the model is not the spec in disguise."""
    rocm.use("v0_1_17", "gfx942")
    case = Case(tokens=64, hidden=1024, world_size=2, seed=2, zero_group=False)
    out = run_op(rocm.vllm_comm(case), case, arch="gfx942", emit_bf16=True)
    assert last_path() == "fused-2"
    fnuz = torch.float8_e4m3fnuz
    q, scale = hip_quant_expected(out.normed, fnuz)
    assert torch.equal(out.q.view(torch.uint8), q.view(torch.uint8))
    x = out.normed.double()
    sc = out.scale.double().repeat_interleave(128, dim=1)
    assert ((dequantize(out.q, out.scale, 128) - x).abs() <= fp8_half_step(x / sc, fnuz) * sc * (1 + 1e-6)).all()
    spec = norm_quant_reference(out.normed, None, torch.ones(1024), 0.0, out_dtype=torch.bfloat16, quant_dtype=fnuz)
    differs = (~torch.eq(out.q.view(torch.uint8), spec.q.view(torch.uint8))).any() or not torch.equal(
        out.scale, spec.scale
    )
    assert differs


def test_one_plus_w_rounding_stays_within_one_extra_rounding_of_the_spec(rocm):
    """The per-group kernel's (1 + w) in bf16 and aiter's roundings together: the
    bf16 activation within two bf16 roundings of the spec's float64 value (the
    weight's, its own) plus the rounded sum's share, dequantized q within half
    an FP8 step more."""
    rocm.use("v0_1_20", "gfx950")
    case = Case(tokens=16, hidden=1024, seed=11, zero_group=False)
    out = run_op(rocm.vllm_comm(case), case, emit_bf16=True)
    assert last_path() == "fused-1"
    s = case.h.double() + case.residual.double()
    inv_rms = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    w1 = case.weight.double() + 1.0
    y = s * inv_rms * w1
    bound = 2 * rounding_bound(y, torch.bfloat16) + rounding_bound(case.h.double(), torch.bfloat16) * inv_rms * w1.abs()
    assert ((out.normed.double() - y).abs() <= bound).all()
    deq = dequantize(out.q, out.scale, 128)
    sc = out.scale.double().repeat_interleave(128, dim=1)
    assert ((deq - y).abs() <= fp8_half_step(y / sc, torch.float8_e4m3fn) * sc * (1 + 1e-6) + bound).all()
    spec = norm_quant_reference(
        case.h, case.residual, case.weight, 1e-6, out_dtype=torch.bfloat16, weight_offset=1.0, emit_bf16=True
    )
    assert not torch.equal(out.normed, spec.normed)  # a real change, not a no-op


def test_one_plus_w_is_made_once_per_weight_and_refreshed_on_load(rocm):
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case()
    comm = rocm.vllm_comm(case)
    param = torch.nn.Parameter(case.weight.clone(), requires_grad=False)
    for _ in range(3):
        run_op(comm, case, weight=param.data)  # a fresh .data alias per call, as the vLLM layer passes it
    ws = [c.args["w"] for c in fake.calls(PER_GROUP)]
    assert len({w.data_ptr() for w in ws}) == 1 and len(rocm.backend.weights) == 1
    # a weight load through the layer's loader: param.data.copy_, then the notification
    new = torch.randn_like(case.weight)
    param.data.copy_(new)
    notify_weight_updated(param.data)
    run_op(comm, case, weight=param.data)
    w = fake.calls(PER_GROUP)[-1].args["w"]
    assert w.data_ptr() == ws[0].data_ptr()  # refreshed in place: captured graphs see it
    assert torch.equal(w, (new.float() + 1).to(torch.bfloat16))


def test_in_place_update_through_the_parameter_is_seen(rocm):
    """Passing the parameter itself: its version counter tells the cache it changed."""
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case()
    comm = rocm.vllm_comm(case)
    param = torch.nn.Parameter(case.weight.clone(), requires_grad=False)
    run_op(comm, case, weight=param)
    with torch.no_grad():
        param.mul_(0.5)
    run_op(comm, case, weight=param)
    first, second = (c.args["w"] for c in fake.calls(PER_GROUP))
    assert first.data_ptr() == second.data_ptr()
    assert torch.equal(second, (param.detach().float() + 1).to(torch.bfloat16))


def test_float32_weight_reaches_aiter_in_the_input_dtype(rocm):
    """aiter reads w as the input dtype whatever its real dtype (a float32 weight
    would be misread; the fake treats that as a hazard): the backend converts."""
    fake = rocm.use("v0_1_17", "gfx942")
    case = Case(hidden=512)
    out = run_op(rocm.vllm_comm(case), case, arch="gfx942", weight=case.weight.float(), quantize=False)
    assert fake.calls(AR_RMS)[0].args["w"].dtype == torch.bfloat16
    residual, normed, _ = aiter_expected(case, kernel="ar_rms", offset=1.0)
    torch.testing.assert_close(out.normed, normed, rtol=0, atol=0)
