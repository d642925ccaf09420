"""torch.compile traces callers of the op through its fake impl."""

import pytest
import torch

from vllm_rocm_fused.ops import fused_allreduce_rmsnorm_quant


def _layer(x, residual, weight):
    out = fused_allreduce_rmsnorm_quant(
        x * 2, residual, weight, 1e-6, weight_offset=1.0, emit_bf16=True, scale_layout="col"
    )
    return out.q.float() * out.scale.repeat_interleave(128, dim=1), out.residual, out.normed


def test_compiled_caller_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    for t in (3, 17):
        x = torch.randn(t, 256, dtype=torch.bfloat16)
        r = torch.randn(t, 256, dtype=torch.bfloat16)
        w = torch.randn(256, dtype=torch.bfloat16)
        for a, b in zip(compiled(x, r, w), _layer(x, r, w)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fake_impl_matches_real_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(5, 384, dtype=torch.bfloat16)
    w = torch.randn(384)
    for layout in ("row", "col"):
        for quantize, emit in ((True, False), (True, True), (False, False)):
            args = (x, x, w, 1e-6, None, 128, 1.0, emit, layout, torch.float8_e4m3fn, quantize, "native")
            real = torch.ops.vllm_rocm_fused.fused_allreduce_rmsnorm_quant(*args)
            with FakeTensorMode() as mode:
                fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
                fake = torch.ops.vllm_rocm_fused.fused_allreduce_rmsnorm_quant(*fargs)
            for r_, f_ in zip(real, fake):
                assert r_.shape == f_.shape and r_.dtype == f_.dtype
                if r_.numel():
                    assert r_.stride() == f_.stride()


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("quantize, emit, residual", [(True, False, True), (True, True, False), (False, False, True)])
def test_opcheck(layout, quantize, emit, residual):
    """torch.library.opcheck: the schema (no mutation, no aliasing), the fake impl against
    the real one, and tracing through AOT dispatch, on fresh random inputs."""
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    r = torch.randn(5, 256, dtype=torch.bfloat16) if residual else None
    w = torch.randn(256, dtype=torch.bfloat16)
    args = (x, r, w, 1e-6, None, 128, 1.0, emit, layout, torch.float8_e4m3fn, quantize, "native")
    torch.library.opcheck(torch.ops.vllm_rocm_fused.fused_allreduce_rmsnorm_quant.default, args)
