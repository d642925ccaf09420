"""The portable block-FP8 linear kernel against a float64 oracle, and its
QuantizedActivation input path."""

import pytest
import torch

from support.markers import requires_vllm

pytestmark = requires_vllm


def _kernel(n, k):
    from vllm.model_executor.kernels.linear import init_fp8_linear_kernel
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, create_fp8_quant_key

    from vllm_rocm_fused.layers.block_fp8_linear import PortableFp8BlockScaledMMKernel, install

    install()
    kernel = init_fp8_linear_kernel(
        activation_quant_key=create_fp8_quant_key(static=False, group_shape=GroupShape(1, 128)),
        weight_quant_key=create_fp8_quant_key(static=True, group_shape=GroupShape(128, 128)),
        input_dtype=torch.bfloat16,
        out_dtype=torch.bfloat16,
        weight_shape=(n, k),
        force_kernel=PortableFp8BlockScaledMMKernel,
    )
    assert isinstance(kernel, PortableFp8BlockScaledMMKernel)
    return kernel


def _quantize_weight(w):
    """128x128 block quant with positive scales (what a checkpoint holds)."""
    n, k = w.shape
    nb, kb = -(-n // 128), k // 128
    pad = torch.zeros(nb * 128, k)
    pad[:n] = w.float()
    blocks = pad.view(nb, 128, kb, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-10) / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(nb * 128, k)[:n]
    return q, scale


class _Layer(torch.nn.Module):
    def __init__(self, q, scale):
        super().__init__()
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
        self.input_scale = None


@pytest.mark.parametrize("m,n,k", [(1, 256, 128), (7, 384, 256), (33, 200, 512)])
def test_matches_float64_oracle(vllm_cfg, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    qw, ws = _quantize_weight(w)
    kernel = _kernel(n, k)
    layer = _Layer(qw, ws)
    kernel.process_weights_after_loading(layer)
    out = kernel.apply_weights(layer, x, bias)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16

    # oracle: quantize x per 1x128 group (spec of the GPU kernels), dequantize both, float64 matmul
    xg = x.double().view(m, k // 128, 128)
    xs = xg.abs().amax(-1).clamp(min=1e-10) / 448.0
    xq = (xg / xs[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).double() * xs[..., None]
    wd = qw.double() * ws.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    ref = xq.view(m, k) @ wd.t() + bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=1e-3)
    # and it is a good approximation of the bf16 GEMM (FP8 resolution)
    full = x.double() @ w.double().t() + bias.double()
    assert ((out.double() - full).norm() / full.norm()) < 0.05


def test_quantized_activation_input_is_used_as_given(vllm_cfg):
    from vllm.model_executor.layers.fusion.quant_activation import QuantizedActivation
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8Dynamic128Sym

    from vllm_rocm_fused.ops import fused_allreduce_rmsnorm_quant

    m, n, k = 9, 256, 384
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    qw, ws = _quantize_weight(w)
    kernel = _kernel(n, k)
    layer = _Layer(qw, ws)
    assert kernel.input_quant_key() == kFp8Dynamic128Sym

    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    norm_w = torch.randn(k, generator=g).to(torch.bfloat16)
    fused = fused_allreduce_rmsnorm_quant(x, None, norm_w, 1e-6, weight_offset=1.0, emit_bf16=True)
    qa = QuantizedActivation(fused.q, fused.scale, torch.bfloat16, fused.normed.shape, kFp8Dynamic128Sym)
    from_qa = kernel.apply_weights(layer, qa)
    from_bf16 = kernel.apply_weights(layer, fused.normed)
    # the kernel's own input quant and the fused op's quant are the same function
    assert torch.equal(from_qa, from_bf16)
    # a tampered scale changes the output: the given scale is really used
    qa2 = QuantizedActivation(fused.q, fused.scale * 2, torch.bfloat16, fused.normed.shape, kFp8Dynamic128Sym)
    torch.testing.assert_close(kernel.apply_weights(layer, qa2).float(), 2 * from_qa.float(), rtol=2**-7, atol=1e-2)


def test_registered_after_vllm_cpu_kernels(vllm_cfg):
    from vllm.model_executor.kernels import linear as lk
    from vllm.platforms import PlatformEnum

    from vllm_rocm_fused import register_portable_fp8
    from vllm_rocm_fused.layers.block_fp8_linear import PortableFp8BlockScaledMMKernel

    register_portable_fp8()
    register_portable_fp8()
    cands = lk._POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU]
    assert cands.count(PortableFp8BlockScaledMMKernel) == 1
    assert cands[-1] is PortableFp8BlockScaledMMKernel
