"""How far two implementations of the fused op may differ: the one definition the
tests, the startup self-check and ``vllm-rocm-fused selftest`` share.

Outputs are compared as the consumer reads them, never as bare FP8 bytes: ``q``
dequantized with its own scales, the scales as values (with the requested memory
layout), the residual and the bf16 activation as numbers. Every bound is built
from the inputs of the call, as the spec (ops/reference.py) and the backends'
documented deviations allow:

* x.dtype rounding ``rounding_bound(v)`` = ``|v| * eps + tiny`` (at least one
  unit in the last place of ``v``);
* residual: one rounding of the all-reduced sum ``h`` (NCCL, vLLM's custom
  all-reduce and aiter round it to x.dtype before the residual add) plus one of
  the result: ``rb(h) + rb(s)``;
* normed: three roundings of the value (its own, a ``(w + offset)`` rounded to
  x.dtype as aiter's per-group kernel reads it, a norm of the rounded residual)
  plus what the residual's uncertainty becomes after the norm: ``u = 3 rb(y) +
  (rb(h) + rb(s)) * rsqrt(mean(s^2) + eps) * |w + offset|``;
* scales: 1% (the spec's tolerance) plus the share of the group's largest ``u``
  (the scale is ``amax / FP8_MAX``); groups that are all zero are left out (aiter
  writes 1.0 there, the spec a floor; ``q`` is 0 either way);
* q: each side rounds to the nearest FP8 value, so two correct quantizations of
  inputs ``u`` apart differ by at most ``u`` plus one FP8 step; the error is
  reported in FP8 steps beyond ``u`` (the step at the larger of the two values,
  with the larger scale), and may be at most ``Q_STEPS_MAX``.

Compared in float32, a block of rows at a time (the self-check runs inside vLLM's
profile run, where a float64 copy of a large input would raise the memory peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..platform_info import fp8_max

# q may differ by one FP8 step beyond what the upstream roundings explain
Q_STEPS_MAX = 1.0
# scales: the spec's relative tolerance, before the upstream share
SCALE_RTOL = 0.01
# numbers at the bound are fine; float32 arithmetic of the check itself needs a hair
SLACK = 1e-5
ROWS_PER_BLOCK = 1024

_MIN_NORMAL_EXP = {torch.float8_e4m3fn: -6, torch.float8_e4m3fnuz: -7}
_MANTISSA_BITS = 3


def rounding_bound(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One rounding of ``dtype`` at ``value``: ``|value| * eps + tiny`` (an upper
    bound on ``|round(v) - v|``, with room for float32 arithmetic before it)."""
    fi = torch.finfo(dtype)
    return value.abs() * fi.eps + fi.tiny


def fp8_step(a: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``fp8_dtype`` values at ``|a|`` (in the quantized domain): 2^(e - 3)
    for ``|a|`` in [2^e, 2^(e+1)), and the subnormal spacing below the smallest normal."""
    min_exp = _MIN_NORMAL_EXP[fp8_dtype]
    a = a.abs().clamp(min=2.0**min_exp)
    return torch.pow(2.0, torch.floor(torch.log2(a)) - _MANTISSA_BITS)


def subnormal_step(fp8_dtype: torch.dtype) -> float:
    return 2.0 ** (_MIN_NORMAL_EXP[fp8_dtype] - _MANTISSA_BITS)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``q * scale`` per group of ``group_size`` along the last dimension, in ``dtype``."""
    t, hidden = q.shape
    return (q.to(dtype).view(t, hidden // group_size, group_size) * scale.to(dtype).unsqueeze(-1)).view(t, hidden)


@dataclass(frozen=True)
class Errors:
    """The largest error of each output, as a fraction of what the tolerance allows
    (1.0 = at the limit), except ``q_steps`` (FP8 steps; the limit is Q_STEPS_MAX).
    ``problem``: a structural mismatch (dtype, shape, scale layout, a missing output)."""

    q_steps: float = 0.0
    scale: float = 0.0
    residual: float = 0.0
    normed: float = 0.0
    problem: str | None = None
    worst: str = ""  # where the largest error relative to its limit is, in words

    @property
    def ok(self) -> bool:
        return (
            self.problem is None
            and self.q_steps <= Q_STEPS_MAX + SLACK
            and max(self.scale, self.residual, self.normed) <= 1.0 + SLACK
        )

    def describe(self) -> str:
        if self.problem is not None:
            return self.problem
        text = (
            f"q {_num(self.q_steps)} fp8 steps, scales {_num(self.scale)}x, residual {_num(self.residual)}x, "
            f"normed {_num(self.normed)}x of the allowed error"
        )
        return f"{text}; worst: {self.worst}" if self.worst else text


def _num(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.3g}"


def _max_at(ratio: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """The largest value of the 2-D ``ratio`` (NaN counts as infinite) and its (row, column)."""
    if ratio.numel() == 0:
        return 0.0, ()
    ratio = torch.nan_to_num(ratio, nan=math.inf)
    flat = int(torch.argmax(ratio).item())
    return float(ratio.reshape(-1)[flat].item()), divmod(flat, ratio.shape[-1])


def _structure_problem(
    out: tuple,
    *,
    tokens: int,
    hidden: int,
    dtype: torch.dtype,
    quantize: bool,
    emit_bf16: bool,
    spec_layout: str,
    group_size: int,
    quant_dtype: torch.dtype,
) -> str | None:
    q, scale, residual, normed = out
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (tokens, hidden) or residual.dtype != dtype:
        return f"residual is {getattr(residual, 'dtype', residual)} {tuple(getattr(residual, 'shape', ()))}, wanted {dtype} {(tokens, hidden)}"
    wants_normed = emit_bf16 or not quantize
    if wants_normed and (not isinstance(normed, torch.Tensor) or tuple(normed.shape) != (tokens, hidden)):
        return "the bf16 activation is missing or has the wrong shape"
    if wants_normed and normed.dtype != dtype:
        return f"the bf16 activation is {normed.dtype}, wanted {dtype}"
    if not quantize:
        return None
    groups = hidden // group_size
    if not isinstance(q, torch.Tensor) or q.dtype != quant_dtype or tuple(q.shape) != (tokens, hidden):
        return (
            f"q is {getattr(q, 'dtype', q)} {tuple(getattr(q, 'shape', ()))}, wanted {quant_dtype} {(tokens, hidden)}"
        )
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (tokens, groups):
        return (
            f"scale is {getattr(scale, 'dtype', scale)} {tuple(getattr(scale, 'shape', ()))}, "
            f"wanted float32 {(tokens, groups)}"
        )
    # With one row or one group both layouts are the same bytes; otherwise the consumer
    # reads the memory in the layout it asked for.
    if tokens > 1 and groups > 1:
        want = (1, tokens) if spec_layout == "col" else (groups, 1)
        if scale.stride() != want:
            return f"scale strides {scale.stride()} are not the {spec_layout}-major layout {want} the consumer reads"
    return None


def compare(
    out: tuple,
    ref: tuple,
    *,
    h: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    group_size: int,
    quant_dtype: torch.dtype,
    scale_layout: str,
    emit_bf16: bool,
    quantize: bool,
) -> Errors:
    """Errors of ``out`` against ``ref`` (both ``(q, scale, residual, normed)``; ``ref``
    is the spec's result, e.g. ``norm_quant_reference``) for the call whose all-reduced
    input was ``h`` (any float dtype) and whose other inputs were ``residual``, ``weight``."""
    tokens, hidden = h.shape
    dtype = ref[2].dtype
    problem = _structure_problem(
        out,
        tokens=tokens,
        hidden=hidden,
        dtype=dtype,
        quantize=quantize,
        emit_bf16=emit_bf16,
        spec_layout=scale_layout,
        group_size=group_size,
        quant_dtype=quant_dtype,
    )
    if problem is not None:
        return Errors(math.inf, math.inf, math.inf, math.inf, problem=problem)
    worst = {"q": (0.0, ()), "scale": (0.0, ()), "residual": (0.0, ()), "normed": (0.0, ())}
    w = weight.to(torch.float32) + weight_offset
    qmax = fp8_max(quant_dtype)
    for start in range(0, tokens, ROWS_PER_BLOCK):
        rows = slice(start, min(tokens, start + ROWS_PER_BLOCK))
        hb = h[rows].to(torch.float32)
        s = hb + residual[rows].to(torch.float32) if residual is not None else hb
        rb_hs = rounding_bound(hb, dtype) + rounding_bound(s, dtype)
        inv_rms = torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
        r_ref = ref[2][rows].to(torch.float32)
        _update(worst, "residual", (out[2][rows].to(torch.float32) - r_ref).abs() / rb_hs, start)
        y = (s * inv_rms * w).to(torch.float32)
        u = 3 * rounding_bound(y, dtype) + rb_hs * inv_rms * w.abs()
        if out[3] is not None and ref[3] is not None:
            n_err = (out[3][rows].to(torch.float32) - ref[3][rows].to(torch.float32)).abs()
            _update(worst, "normed", n_err / u, start)
        if not quantize:
            continue
        q_o, s_o = out[0][rows], out[1][rows]
        q_r, s_r = ref[0][rows], ref[1][rows]
        t = q_o.shape[0]
        groups = hidden // group_size
        qo = q_o.to(torch.float32).view(t, groups, group_size)
        qr = q_r.to(torch.float32).view(t, groups, group_size)
        so, sr = s_o.to(torch.float32).unsqueeze(-1), s_r.to(torch.float32).unsqueeze(-1)
        ug = u.view(t, groups, group_size)
        step = fp8_step(torch.maximum(qo.abs(), qr.abs()), quant_dtype) * torch.maximum(so, sr)
        excess = ((qo * so - qr * sr).abs() - ug).clamp(min=0)
        _update(worst, "q", (excess / step).view(t, hidden), start)
        nonzero = (qr != 0).any(dim=-1)  # an all-zero group carries no scale information
        scale_bound = SCALE_RTOL * sr.squeeze(-1) + ug.amax(dim=-1) / qmax
        scale_err = (so.squeeze(-1) - sr.squeeze(-1)).abs() / scale_bound
        _update(worst, "scale", torch.where(nonzero, scale_err, torch.zeros_like(scale_err)), start)
    limits = {"q": Q_STEPS_MAX, "scale": 1.0, "residual": 1.0, "normed": 1.0}
    name = max(worst, key=lambda k: worst[k][0] / limits[k])
    value, idx = worst[name]
    where = ""
    if value > 0:
        unit = "fp8 steps" if name == "q" else "x the allowed error"
        where = f"{name}{list(idx)}: {_num(value)} {unit}"
    return Errors(
        q_steps=worst["q"][0],
        scale=worst["scale"][0],
        residual=worst["residual"][0],
        normed=worst["normed"][0],
        worst=where,
    )


def _update(worst: dict, name: str, ratio: torch.Tensor, row0: int) -> None:
    value, idx = _max_at(ratio)
    if value > worst[name][0]:
        worst[name] = (value, (idx[0] + row0, *idx[1:]) if idx else idx)
