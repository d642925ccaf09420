"""Block-FP8 weight quantization (models/quantize.py): the releases' format."""

import pytest
import torch

from vllm_rocm_fused.tiny_models.quantize import (
    BLOCK,
    FP8_MAX,
    SCALE_DTYPE,
    dequantize_block_fp8,
    quantize_block_fp8,
)


def _fp8_bound(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Per element: half an e4m3 step. Relative 2^-4 for normal values, plus half
    the smallest subnormal step (2^-10 of the block scale) near zero."""
    n, k = w.shape
    s = scale_inv.float().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return w.abs().float() * 2.0**-4 + s * 2.0**-10


@pytest.mark.parametrize("shape", [(256, 512), (384, 128), (200, 300), (1, 128), (4, 256)])
def test_round_trip_within_fp8_resolution(shape, seeded):
    w = (torch.randn(shape, generator=seeded) * 0.05).to(torch.bfloat16)
    q, s = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == SCALE_DTYPE and tuple(s.shape) == (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    assert bool((s.float() > 0).all())
    err = (dequantize_block_fp8(q, s) - w.float()).abs()
    assert bool((err <= _fp8_bound(w, s)).all()), float((err - _fp8_bound(w, s)).max())


def test_each_block_uses_its_own_range(seeded):
    # Blocks of very different magnitude: a per-tensor scale would flush the small
    # block to zero; per-block scales keep both at FP8 precision.
    w = torch.randn(256, 256, generator=seeded)
    w[:128, :128] *= 1e-3
    w[128:, 128:] *= 1e3
    q, s = quantize_block_fp8(w)
    assert float(s[1, 1]) / float(s[0, 0]) > 1e5
    rel = (dequantize_block_fp8(q, s) - w).abs() / w.abs().clamp_min(1e-6)
    assert float(rel[:128, :128].median()) < 0.05
    # the largest element of a block lands on the format's maximum
    assert float(q[128:, 128:].float().abs().max()) == pytest.approx(FP8_MAX, rel=0.02)


def test_zero_block_gets_positive_scale():
    w = torch.zeros(128, 256)
    w[:, 128:] = 1.0
    q, s = quantize_block_fp8(w)
    assert bool((s.float() > 0).all())
    assert bool((q[:, :128].float() == 0).all())
    err = (dequantize_block_fp8(q, s) - w).abs()
    assert bool((err <= _fp8_bound(w, s)).all())


def test_scale_rounds_up_so_nothing_saturates(seeded):
    # amax / 448 is rarely a bf16 number: rounding it down would push the block's
    # largest element past 448 (clamped: an error beyond FP8's own).
    w = torch.randn(512, 512, generator=seeded)
    q, s = quantize_block_fp8(w)
    amax = w.abs().reshape(4, 128, 4, 128).amax(dim=(1, 3))
    assert bool((s.float() >= amax / FP8_MAX).all())
    assert bool((s.float() <= amax / FP8_MAX * (1 + 2.0**-7)).all())


def test_scale_is_rounded_before_dividing():
    # The stored (bf16) scale is the one the payload was divided by: dequantizing a
    # value that is exactly representable reproduces it bit for bit.
    w = torch.full((128, 128), 3.0)
    w[0, 0] = 7.0
    q, s = quantize_block_fp8(w)
    assert torch.equal(dequantize_block_fp8(q, s)[0, 0], torch.tensor(7.0))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="float"):
        quantize_block_fp8(torch.zeros(4, 4, dtype=torch.int32))
    q, s = quantize_block_fp8(torch.ones(256, 256))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_block_fp8(q, s[:1])
