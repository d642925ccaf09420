"""The baseline a user runs without the plugin: residual add + Gemma RMSNorm + 1x128 dynamic
FP8 group quant written in plain torch (the way vLLM's GemmaRMSNorm.forward_static and
QuantFP8's native group path write it) and compiled by Inductor (torch.compile, default mode).

Two compilations, as vLLM could run it:
  static   one graph per token count (``dynamic=False``): Inductor sees every size;
  dynamic  the token dimension marked dynamic (``torch._dynamo.mark_dynamic``), one graph for
           every count, as vLLM's piecewise compile does (size 1 is still specialized by
           dynamo: a second graph).
The benchmark reports the faster of the two at each size.

Each compiled variant is a fresh copy of the function's code object, so dynamo's per-code
cache entries (and their recompile limit) never mix variants or hidden sizes.

torch only; no vLLM, nothing of this package (the benchmark checks the outputs against
ops/reference.py).
"""

from __future__ import annotations

import types

import torch

AMAX_FLOOR = 1e-10  # ops.reference.AMAX_FLOOR


def add_rmsnorm_group_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 1.0,
    group_size: int = 128,
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
):
    """(q [T, H] fp8, scale [T, H / group_size] float32 row-major, new residual [T, H] x.dtype).

    The spec's arithmetic (ops/reference.py): the norm reads the float32 sum, the residual is
    that sum rounded; the quant reads the normed value rounded to x.dtype."""
    s = x.float() + residual.float()
    new_residual = s.to(x.dtype)
    variance = s.pow(2).mean(dim=-1, keepdim=True)
    normed = (s * torch.rsqrt(variance + eps) * (weight.float() + weight_offset)).to(x.dtype)
    tokens, hidden = normed.shape
    fp8_max = torch.finfo(quant_dtype).max
    g = normed.float().view(tokens, hidden // group_size, group_size)
    scale = g.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / fp8_max
    q = (g / scale.unsqueeze(-1)).clamp(-fp8_max, fp8_max).to(quant_dtype).view(tokens, hidden)
    return q, scale, new_residual


def _fresh_copy(fn, tag: str):
    """``fn`` with a code object of its own (dynamo caches compiled graphs per code object)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def configure_dynamo(recompile_limit: int = 64) -> None:
    """Room for a graph per token count of one variant; a variant that would exceed it raises
    instead of silently running eagerly."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, recompile_limit)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 16 * recompile_limit))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def compiled(mode: str, tag: str):
    """A compiled ``add_rmsnorm_group_quant`` taking (x, residual, weight, eps).

    mode "static": torch.compile(dynamic=False); "dynamic": the token dimension of x and
    residual marked dynamic before every call with more than one token (what dynamo compiles
    once; a CUDA graph captures only the kernels, not this Python)."""
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
    fn = torch.compile(
        _fresh_copy(add_rmsnorm_group_quant, f"{mode}_{tag}"),
        fullgraph=True,
        dynamic=False if mode == "static" else None,
    )
    if mode == "static":
        return fn

    def call(x, residual, weight, eps):
        if x.shape[0] > 1:  # mark aliases (views launch nothing), so the caller's tensors stay unmarked
            x, residual = x.view_as(x), residual.view_as(residual)
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(residual, 0)
        return fn(x, residual, weight, eps)

    return call
