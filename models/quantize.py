"""Block FP8 weight quantization in the format of the Qwen3.5 FP8 releases.

A weight ``W`` of shape ``[N, K]`` is cut into 128x128 blocks (the last row/column
of blocks may be partial). Each block ``b`` gets one positive scale

    s_b = bf16_round_up(max(amax(|W_b|), AMAX_FLOOR) / 448)

and is stored as ``Q_b = saturating_cast_e4m3fn(W_b / s_b)``. The checkpoint holds
``Q`` as ``<name>.weight`` (float8_e4m3fn) and ``s`` as ``<name>.weight_scale_inv``
(``[ceil(N/128), ceil(K/128)]``, bfloat16 like the releases), so that
``W ~= Q * s`` block by block ("scale_inv" is the releases' name: the factor that
undoes the quantization). The scale is rounded to bf16 *before* dividing, and
upwards, so no element exceeds the format's range: the stored pair's only error
is FP8's own rounding (relative <= 2^-4 for normal values, 2^-10 of the block
scale for subnormal ones), never saturation.

Pure torch: no vLLM import.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_DTYPE = torch.bfloat16
# An all-zero block still gets a finite positive scale (and Q == 0).
AMAX_FLOOR = 1e-12


def _blocks(n: int, k: int, block: int) -> tuple[int, int]:
    return -(-n // block), -(-k // block)


def _expand(scale: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """[nb, kb] per-block values -> [N, K] per-element (a view-free copy)."""
    return scale.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]


def _round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Positive float32 -> the smallest bf16 >= x."""
    y = x.to(SCALE_DTYPE)
    low = y.to(torch.float32) < x
    bumped = (y.view(torch.int16) + 1).view(SCALE_DTYPE)  # next bf16 up (x > 0)
    return torch.where(low, bumped, y)


def quantize_block_fp8(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (float8_e4m3fn [N, K], bf16 scale_inv [ceil(N/b), ceil(K/b)]).

    weight: [N, K], any float dtype (computed in float32). Every scale is > 0.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {weight.dtype}")
    n, k = weight.shape
    nb, kb = _blocks(n, k, block)
    w = weight.to(torch.float32)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w
    amax = padded.abs().reshape(nb, block, kb, block).amax(dim=(1, 3))
    scale = _round_up_to_bf16(amax.clamp_min(AMAX_FLOOR) / FP8_MAX)
    # The clamp only guards against float32 division rounding up past the maximum.
    q = (w / _expand(scale.to(torch.float32), n, k, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_block_fp8`: float32 [N, K] = Q * scale_inv per block."""
    if q.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"expected 2-D q and scale_inv, got {tuple(q.shape)} and {tuple(scale_inv.shape)}")
    n, k = q.shape
    if tuple(scale_inv.shape) != _blocks(n, k, block):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
            f"with {block}x{block} blocks (expected {_blocks(n, k, block)})"
        )
    return q.to(torch.float32) * _expand(scale_inv.to(torch.float32), n, k, block)
