"""A float64 oracle of the fused op's spec, written independently of
vllm_rocm_fused.ops.reference (no code shared), plus tolerance checks built on
vllm_rocm_fused.ops.tolerance."""

from __future__ import annotations

import torch

# The tolerance helpers are the package's one definition (shared with the self-check);
# the oracle itself stays independent of ops.reference.
from vllm_rocm_fused.ops.tolerance import dequantize, fp8_step, rounding_bound, subnormal_step

__all__ = ["assert_matches_oracle", "dequantize", "fp8_half_step", "oracle", "rounding_bound"]

AMAX_FLOOR = 1e-10  # the spec's "tiny"


def oracle(h, residual, weight, eps, *, out_dtype, group_size, weight_offset, fp8_dtype):
    """Returns float64 tensors: r (the sum rounded to out_dtype, as the spec returns
    it), y (the unrounded normalized value, computed from the unrounded sum), and
    scale (from y rounded to out_dtype, which is what the spec quantizes)."""
    h64 = h.double()
    s64 = h64 + residual.double() if residual is not None else h64
    r = s64.to(out_dtype).double()
    ms = (s64 * s64).mean(dim=-1, keepdim=True)
    y = s64 / torch.sqrt(ms + eps) * (weight.double() + weight_offset)
    t, hdim = y.shape
    # the quant reads the rounded normed value
    yr = y.to(out_dtype).double().view(t, hdim // group_size, group_size)
    amax = yr.abs().amax(dim=-1)
    scale = torch.clamp(amax, min=AMAX_FLOOR) / torch.finfo(fp8_dtype).max
    return r, y, scale


def fp8_half_step(a: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of FP8 values around |a| (in units of the quantized domain),
    plus one subnormal step, as the spec's tolerance for dequantized q."""
    return 0.5 * fp8_step(a, fp8_dtype) + subnormal_step(fp8_dtype)


def assert_matches_oracle(
    out, h, residual, weight, eps, *, out_dtype, group_size, weight_offset, fp8_dtype, emit_bf16, scale_layout="row"
):
    """The spec's tolerances: residual and normed within one x.dtype rounding,
    dequantized q within half an FP8 step (+1 subnormal step) of normed, scales
    within 1% of the oracle's."""
    r, y, scale = oracle(
        h,
        residual,
        weight,
        eps,
        out_dtype=out_dtype,
        group_size=group_size,
        weight_offset=weight_offset,
        fp8_dtype=fp8_dtype,
    )
    t, hdim = h.shape
    assert out.residual.dtype == out_dtype and out.residual.shape == (t, hdim)
    err = (out.residual.double() - r).abs()
    assert (err <= rounding_bound(r, out_dtype)).all(), f"residual max err {err.max()}"

    if out.q is None:
        normed = out.normed
    else:
        assert out.q.dtype == fp8_dtype and out.q.shape == (t, hdim)
        assert out.scale.dtype == torch.float32 and out.scale.shape == (t, hdim // group_size)
        if scale_layout == "col":
            want = torch.empty((hdim // group_size, t)).t().stride()  # (1, T); torch's choice at T=0
            assert out.scale.stride() == want, f"col layout stride {out.scale.stride()} != {want}"
        if scale_layout == "row":
            assert out.scale.is_contiguous()
        rel = (out.scale.double() - scale).abs() / scale
        assert (rel <= 0.01).all(), f"scale rel err {rel.max() if rel.numel() else 0}"
        normed = out.normed
        if emit_bf16:
            assert normed is not None
        else:
            assert normed is None
    if normed is not None:
        assert normed.dtype == out_dtype
        nerr = (normed.double() - y).abs()
        assert (nerr <= rounding_bound(y, out_dtype) * 1.0001 + 1e-6 * y.abs()).all(), f"normed max err {nerr.max()}"
    if out.q is not None:
        # dequantized q vs the rounded normed value the quant saw
        yr = y.to(out_dtype).double()
        deq = dequantize(out.q, out.scale, group_size)
        sc = out.scale.double().repeat_interleave(group_size, dim=1)
        # half an FP8 step, plus one x.dtype rounding: the op quantizes its own
        # rounded normed value, which may sit one rounding away from the oracle's
        tol = fp8_half_step(yr / sc, fp8_dtype) * sc * (1 + 1e-6) + rounding_bound(yr, out_dtype)
        qerr = (deq - yr).abs()
        assert (qerr <= tol).all(), f"q max err {qerr.max()}, worst ratio {(qerr / tol).max()}"
