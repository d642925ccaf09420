"""The vLLM CustomOp on (fake) ROCm: forward_hip reaches the ROCm backend through
vLLM's TP group's aiter custom all-reduce, and the layer's weight loader keeps
the precomputed (1 + w) in step with the weight."""

from __future__ import annotations

import pytest
import torch

from support.markers import requires_vllm
from support.rocm_harness import PER_GROUP, Case, aiter_expected
from vllm_rocm_fused.ops import backends

pytestmark = requires_vllm


@pytest.fixture(scope="module")
def vllm_cfg():
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        yield


def make_layer(hidden, comm_name, **kw):
    from vllm_rocm_fused.layers.fused_norm import FusedAllReduceRMSNormQuant

    layer = FusedAllReduceRMSNormQuant(
        hidden, 1e-6, weight_offset=1.0, all_reduce=False, quant_dtype=torch.float8_e4m3fn, **kw
    )
    layer.comm_name = comm_name  # vLLM's TP group (simulated): what tp_communicator_name() returns on ROCm
    return layer


@pytest.mark.parametrize("emit_bf16,layout", [(False, "row"), (True, "col")])
def test_forward_hip_runs_one_kernel(vllm_cfg, rocm, emit_bf16, layout):
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case(tokens=6, hidden=256)
    comm = rocm.vllm_comm(case)
    layer = make_layer(256, comm.name, emit_bf16=emit_bf16, scale_layout=layout)
    assert layer.backend == "auto"
    layer.weight.weight_loader(layer.weight, case.weight)
    out = layer.forward_hip(case.x.view(2, 3, 256), case.residual.view(2, 3, 256))
    assert backends.backend_counters() == {"rocm/fused-1": 1}
    (call,) = fake.calls(PER_GROUP)
    assert call.args["emit_bf16"] is emit_bf16 and call.args["transpose_scale"] is (layout == "col")
    residual, normed, y = aiter_expected(case, kernel="per_group", weight=(case.weight.float() + 1).to(torch.bfloat16))
    torch.testing.assert_close(out.residual.view(6, 256), residual, rtol=0, atol=0)
    if emit_bf16:
        torch.testing.assert_close(out.normed.view(6, 256), normed, rtol=0, atol=0)
    # q is the fused kernel's: y / scale of the float32 normed value
    deq = out.q.view(6, 2, 128).double() * out.scale.double().unsqueeze(-1)
    assert (deq.view(6, 256) - y).abs().max() <= 0.07 * y.abs().max()
    assert out.scale.stride() == ((1, 6) if layout == "col" else (2, 1))


def test_weight_loader_refreshes_one_plus_w(vllm_cfg, rocm):
    fake = rocm.use("v0_1_17", "gfx950")
    case = Case()
    comm = rocm.vllm_comm(case)
    layer = make_layer(256, comm.name)
    layer.weight.weight_loader(layer.weight, case.weight)
    layer.forward_hip(case.x, case.residual)
    layer.forward_hip(case.x, case.residual)
    first, second = (c.args["w"] for c in fake.calls(PER_GROUP))
    assert first.data_ptr() == second.data_ptr()  # made once for the layer, not per call
    new = torch.randn(256).to(torch.bfloat16)
    layer.weight.weight_loader(layer.weight, new)  # e.g. a weight reload
    layer.forward_hip(case.x, case.residual)
    third = fake.calls(PER_GROUP)[-1].args["w"]
    assert third.data_ptr() == first.data_ptr()
    assert torch.equal(third, (new.float() + 1).to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        layer.weight.weight_loader(layer.weight, torch.zeros(128))
