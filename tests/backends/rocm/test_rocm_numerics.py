"""Outputs through every step equal the reference, dequantized, for both scale
layouts and with/without the bf16 activation; and the (1 + w) weight is made
once per layer weight, refreshed when the weight is reloaded."""

from __future__ import annotations

import pytest
import torch

from support.oracle import dequantize, fp8_half_step, rounding_bound
from support.rocm_harness import AR_RMS, PER_GROUP, Case, last_path, rocm, run_op  # noqa: F401 - rocm is a fixture
from vllm_rocm_fused.ops.backends import notify_weight_updated
from vllm_rocm_fused.ops.reference import norm_quant_reference

# (id, generation, arch, failing entry or None, expected path, aiter applies (1 + w) in float32)
PATHS = [
    ("fused-1", "v0_1_17", "gfx950", None, "fused-1", False),
    ("fused-1-no-transpose", "v0_1_14", "gfx950", None, "fused-1", False),
    ("fused-2-gemma-flag", "v0_1_17", "gfx942", None, "fused-2", True),
    ("fused-2-one-plus-w", "v0_1_13", "gfx950", None, "fused-2", False),
    ("fused-2-after-step1-raised", "v0_1_17", "gfx950", PER_GROUP, "fused-2", True),
    ("generic-after-both-raised", "v0_1_17", "gfx942", AR_RMS, "generic", True),
]
FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("emit_bf16", [False, True])
@pytest.mark.parametrize("gen,arch,fail,path,exact_gemma", [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_outputs_equal_reference(rocm, gen, arch, fail, path, exact_gemma, layout, emit_bf16):
    fake = rocm.use(gen, arch)
    if fail:
        fake.fail(fail, RuntimeError("injected"))
    case = Case(tokens=7, hidden=512, world_size=4, seed=3)
    out = run_op(rocm.vllm_comm(case), case, arch=arch, emit_bf16=emit_bf16, scale_layout=layout)
    assert last_path() == path
    # The reference, given exactly the weight the kernel multiplies by.
    if exact_gemma:
        weight, offset = case.weight, 1.0
    else:
        weight, offset = (case.weight.float() + 1.0).to(torch.bfloat16), 0.0
    ref = norm_quant_reference(case.h, case.residual, weight, 1e-6, out_dtype=torch.bfloat16, weight_offset=offset,
                               emit_bf16=emit_bf16, scale_layout=layout, quant_dtype=FP8[arch])
    torch.testing.assert_close(out.residual, ref.residual, rtol=0, atol=0)
    assert out.q.dtype == FP8[arch] and torch.equal(out.q.view(torch.uint8), ref.q.view(torch.uint8))
    assert out.scale.shape == ref.scale.shape and out.scale.stride() == ref.scale.stride()
    assert torch.equal(dequantize(out.q, out.scale, 128), dequantize(ref.q, ref.scale, 128))
    if emit_bf16:
        torch.testing.assert_close(out.normed, ref.normed, rtol=0, atol=0)
    else:
        assert out.normed is None
    # The case has an all-zero group; aiter gives it scale 1.0, the spec the floor (q is 0 either way).
    assert ref.q[:, :128].float().eq(0).all()
    if path == "fused-1":
        assert (out.scale[:, 0] == 1.0).all()


@pytest.mark.parametrize("gen,arch", [("v0_1_17", "gfx942"), ("v0_1_13", "gfx950")])
def test_norm_only_sites_equal_reference(rocm, gen, arch):
    rocm.use(gen, arch)
    case = Case(tokens=5, hidden=384, zero_group=False)
    out = run_op(rocm.vllm_comm(case), case, arch=arch, quantize=False)
    assert last_path() == "fused-1" and out.q is None and out.scale is None
    exact = gen == "v0_1_17"  # gemma_norm flag: the kernel adds 1 in float32
    weight, offset = (case.weight, 1.0) if exact else ((case.weight.float() + 1).to(torch.bfloat16), 0.0)
    ref = norm_quant_reference(case.h, case.residual, weight, 1e-6, out_dtype=torch.bfloat16,
                               weight_offset=offset, quantize=False)
    torch.testing.assert_close(out.normed, ref.normed, rtol=0, atol=0)
    torch.testing.assert_close(out.residual, ref.residual, rtol=0, atol=0)


def test_one_plus_w_rounding_stays_within_one_extra_rounding_of_the_spec(rocm):
    """The one documented numeric change: bf16(1 + w) for the per-group kernel.
    Against the spec (float32 1 + w): normed within two bf16 roundings (the
    weight's and its own), dequantized q within half an FP8 step more."""
    rocm.use("v0_1_17", "gfx950")
    case = Case(tokens=16, hidden=1024, seed=11, zero_group=False)
    out = run_op(rocm.vllm_comm(case), case, emit_bf16=True)
    assert last_path() == "fused-1"
    spec = norm_quant_reference(case.h, case.residual, case.weight, 1e-6, out_dtype=torch.bfloat16,
                                weight_offset=1.0, emit_bf16=True)
    y = spec.normed.double()
    bound = 2 * rounding_bound(y, torch.bfloat16)
    assert ((out.normed.double() - y).abs() <= bound).all()
    deq = dequantize(out.q, out.scale, 128)
    sc = out.scale.double().repeat_interleave(128, dim=1)
    assert ((deq - y).abs() <= fp8_half_step(y / sc, torch.float8_e4m3fn) * sc * (1 + 1e-6) + bound).all()
    # and it is a real change, not a no-op: some normed values differ from the spec's
    assert not torch.equal(out.normed, spec.normed)


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
