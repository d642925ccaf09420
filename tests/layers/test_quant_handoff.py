"""Which consumer GEMMs take (fp8, scale) from the fused op, and that a capable
kernel's GEMM then receives exactly the fused op's q and scale in its layout."""

import pytest
import torch

from support.markers import requires_vllm

pytestmark = requires_vllm


def _config(n, k):
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import FP8ScaledMMLinearLayerConfig
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, create_fp8_quant_key

    return FP8ScaledMMLinearLayerConfig(
        weight_quant_key=create_fp8_quant_key(static=True, group_shape=GroupShape(128, 128)),
        activation_quant_key=create_fp8_quant_key(static=False, group_shape=GroupShape(1, 128)),
        input_dtype=torch.bfloat16,
        out_dtype=torch.bfloat16,
        weight_shape=(n, k),
    )


def _fake_kernel_class(column_major=False, ue8m0=False, tma=False, bf16_input=False, padding=None):
    """A stand-in for a GPU block kernel: vLLM's base apply_weights with its own
    QuantFP8 flags, and a GEMM (in torch) that records what it was handed."""
    from vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel import (
        Fp8BlockScaledMMLinearKernel,
    )

    class FakeGpuBlockKernel(Fp8BlockScaledMMLinearKernel):
        apply_input_quant = not bf16_input

        def __init__(self, config):
            super().__init__(config)
            self.quant_fp8.column_major_scales = column_major
            self.quant_fp8.use_ue8m0 = ue8m0
            self.quant_fp8.tma_aligned_scales = tma
            self.quant_fp8.num_token_padding = padding
            self.seen = []

        @classmethod
        def is_supported(cls, compute_capability=None):
            return True, None

        def apply_block_scaled_mm(self, A, B, As, Bs):
            self.seen.append((A, As))
            n, k = B.shape
            a = A.float() * As.float().repeat_interleave(128, 1)
            w = B.float() * Bs.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
            return a @ w.t()

    return FakeGpuBlockKernel


class _Method:
    def __init__(self, kernel):
        self.fp8_linear = kernel

    def apply(self, layer, x, bias=None):
        return self.fp8_linear.apply_weights(layer, x, bias)


class _Linear(torch.nn.Module):
    def __init__(self, kernel, n, k, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g) * 0.05
        scale = w.view(n // 128, 128, k // 128, 128).abs().amax((1, 3)) / 448
        q = (w / scale.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
        self.input_scale = None
        self.quant_method = _Method(kernel)

    def forward(self, x):
        return self.quant_method.apply(self, x)


@pytest.mark.parametrize(
    "flags,layout,why",
    [
        ({}, "row", None),
        ({"column_major": True}, "col", None),
        ({"ue8m0": True}, None, "power-of-two"),
        ({"tma": True}, None, "TMA-aligned"),
        ({"bf16_input": True}, None, "bf16 input"),
        ({"padding": 16}, None, "pads"),
    ],
)
def test_consumer_inspection(vllm_cfg, flags, layout, why):
    from vllm_rocm_fused.layers.quant_handoff import inspect_consumer

    kernel = _fake_kernel_class(**flags)(_config(256, 256))
    handoff = inspect_consumer(_Linear(kernel, 256, 256))
    assert handoff.layout == layout
    if why:
        assert why in handoff.reason


def test_unquantized_and_lora_consumers_keep_bf16(vllm_cfg):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_rocm_fused.layers.quant_handoff import inspect_consumer

    lin = torch.nn.Linear(4, 4)
    lin.quant_method = UnquantizedLinearMethod()
    assert inspect_consumer(lin).layout is None
    kernel = _fake_kernel_class()(_config(256, 256))
    lora = _Linear(kernel, 256, 256)
    lora.requires_unquantized_input = True
    h = inspect_consumer(lora)
    assert h.layout is None and "LoRA" in h.reason


@pytest.mark.parametrize("column_major", [False, True])
def test_handoff_hands_the_fused_q_and_scale_to_the_gemm(vllm_cfg, column_major):
    from vllm.model_executor.layers.fusion.quant_activation import QuantizedActivation
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8Dynamic128Sym

    from vllm_rocm_fused.layers.quant_handoff import enable_handoff, inspect_consumer
    from vllm_rocm_fused.ops import fused_allreduce_rmsnorm_quant

    n, k, m = 256, 384, 5
    kernel = _fake_kernel_class(column_major=column_major)(_config(n, k))
    lin = _Linear(kernel, n, k)
    handoff = inspect_consumer(lin)
    enable_handoff(lin, handoff)
    assert lin._input_quant_key == kFp8Dynamic128Sym

    x = torch.randn(m, k).to(torch.bfloat16)
    out = fused_allreduce_rmsnorm_quant(
        x,
        None,
        torch.zeros(k, dtype=torch.bfloat16),
        1e-6,
        weight_offset=1.0,
        emit_bf16=True,
        scale_layout=handoff.layout,
    )
    qa = QuantizedActivation(out.q, out.scale, torch.bfloat16, out.q.shape, kFp8Dynamic128Sym)
    y_fused = lin(qa)
    a, a_scale = kernel.seen[-1]
    assert a.data_ptr() == out.q.data_ptr() and torch.equal(a_scale, out.scale)
    assert a_scale.stride() == out.scale.stride() == ((1, m) if column_major else (k // 128, 1))
    # a bf16 input still takes the kernel's own quant path, with the same numbers
    y_plain = lin(out.normed)
    assert len(kernel.seen) == 2
    torch.testing.assert_close(y_fused, y_plain, rtol=2**-7, atol=1e-3)


def test_mismatched_key_is_refused(vllm_cfg):
    from vllm.model_executor.layers.fusion.quant_activation import QuantizedActivation
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

    from vllm_rocm_fused.layers.quant_handoff import enable_handoff, inspect_consumer

    kernel = _fake_kernel_class()(_config(256, 256))
    lin = _Linear(kernel, 256, 256)
    enable_handoff(lin, inspect_consumer(lin))
    bad = QuantizedActivation(
        torch.zeros(2, 256, dtype=torch.float8_e4m3fn),
        torch.ones(1),
        torch.bfloat16,
        torch.Size([2, 256]),
        kFp8StaticTensorSym,
    )
    with pytest.raises(AssertionError, match="key"):
        lin(bad)
