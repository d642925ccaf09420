"""The executable specification of the fused op (portable, pure torch).

Every backend is tested against this file. Given the all-reduced input ``h``
(the sum of every rank's ``x``), per token row:

    s      = float32(h) + float32(residual)          (float32, unrounded; residual optional)
    r      = round_to_x_dtype(s)                     (returned as the new residual)
    y      = s * rsqrt(mean(s^2) + eps) * (float32(weight) + weight_offset)
    normed = round_to_x_dtype(y)
    for each run of ``group_size`` consecutive hidden elements g:
        scale_g = max(amax(|float32(normed_g)|), AMAX_FLOOR) / fp8_max      (float32)
        q_g     = saturating_cast_fp8(float32(normed_g) / scale_g)

The norm reads the float32 sum ``s`` before it is rounded into the residual,
exactly as vLLM's own (Gemma)RMSNorm does with ``residual``: the portable path
and an unfused vLLM model then agree bit for bit given the same reduced ``h``.
``q`` is quantized from the rounded ``normed``, so ``q * scale`` approximates
exactly the activation an unfused model would hand to its GEMM.

NaN/Inf (what plain IEEE arithmetic of the formula gives, and what every
backend must reproduce): a NaN in a row makes mean(s^2) NaN, so that row's
``normed``, every group scale and every ``q`` of the row are NaN. An Inf (and
no NaN) in a row makes mean(s^2) Inf and rsqrt 0: the Inf elements become NaN
(Inf * 0), the others 0; groups holding such an element get a NaN scale and NaN
``q``, the row's other groups the floor scale and ``q`` = 0. The residual
keeps the NaN/Inf as summed. Other rows are unaffected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..platform_info import fp8_max

# Floor under a group's absolute maximum, so an all-zero group gets a finite,
# positive scale (and q == 0). Same floor as vLLM's per-token-group quant.
AMAX_FLOOR = 1e-10


class FusedNormQuantOutput(NamedTuple):
    """Result of the fused op.

    q:        [T, H] FP8 (``quant_dtype``), or None when quantize=False.
    scale:    [T, H // group_size] float32; row-major (contiguous) for
              scale_layout="row", column-major (stride (1, T)) for "col";
              None when quantize=False.
    residual: [T, H] in x.dtype, the new residual stream (h + residual).
    normed:   [T, H] in x.dtype, the normalized activation, or None unless
              emit_bf16 (always present when quantize=False).
    """

    q: torch.Tensor | None
    scale: torch.Tensor | None
    residual: torch.Tensor
    normed: torch.Tensor | None


def add_residual(
    h: torch.Tensor, residual: torch.Tensor | None, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, r): s = float32(h) + float32(residual) unrounded, r = round(s) in out_dtype
    (a new tensor, never an alias of h)."""
    s = h.to(torch.float32)
    if residual is not None:
        s = s + residual.to(torch.float32)
    r = s.to(out_dtype)
    if r.data_ptr() == h.data_ptr():
        r = r.clone()
    return s, r


def rms_norm(
    s: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """normed = round(s * rsqrt(mean(s^2) + eps) * (w + offset)) for float32 ``s``."""
    s = s.to(torch.float32)
    inv_rms = torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    w = weight.to(torch.float32) + weight_offset
    return (s * inv_rms * w).to(out_dtype)


def group_quant_reference(
    normed: torch.Tensor,
    group_size: int,
    quant_dtype: torch.dtype,
    scale_layout: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-(1 x group_size) quant of a [T, H] tensor -> (q, scale)."""
    tokens, hidden = normed.shape
    groups = hidden // group_size
    qmax = fp8_max(quant_dtype)
    g = normed.to(torch.float32).reshape(tokens, groups, group_size)
    amax = g.abs().amax(dim=-1)  # NaN propagates
    scale = torch.clamp(amax, min=AMAX_FLOOR) / qmax
    q = torch.clamp(g / scale.unsqueeze(-1), -qmax, qmax).to(quant_dtype).reshape(tokens, hidden)
    if scale_layout == "col":
        scale = as_col_major(scale)
    return q, scale


def as_col_major(scale: torch.Tensor) -> torch.Tensor:
    """A [T, G] copy with strides (1, T) exactly (also for T or G == 1)."""
    tokens, groups = scale.shape
    out = torch.empty((groups, tokens), dtype=scale.dtype, device=scale.device).t()
    out.copy_(scale)
    return out


def norm_quant_reference(
    h: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype,
    group_size: int = 128,
    weight_offset: float = 0.0,
    emit_bf16: bool = False,
    scale_layout: str = "row",
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
    quantize: bool = True,
) -> FusedNormQuantOutput:
    """Everything after the all-reduce. ``h`` is the already-summed input (any float
    dtype; a float32 sum avoids a rounding), ``out_dtype`` the model dtype (x.dtype)."""
    s, r = add_residual(h, residual, out_dtype)
    normed = rms_norm(s, weight, eps, weight_offset, out_dtype)
    if not quantize:
        return FusedNormQuantOutput(None, None, r, normed)
    q, scale = group_quant_reference(normed, group_size, quant_dtype, scale_layout)
    return FusedNormQuantOutput(q, scale, r, normed if emit_bf16 else None)
