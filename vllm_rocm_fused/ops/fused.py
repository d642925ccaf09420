"""The public functional op and its torch.library registration.

``fused_allreduce_rmsnorm_quant`` validates its arguments (clear errors, host
side), then calls ``torch.ops.vllm_rocm_fused.fused_allreduce_rmsnorm_quant``:
an opaque op with a fake impl, so torch.compile can trace callers, whose eager
impl picks a backend (``backends.run``; a model site's first call runs the startup
self-check first, ``self_check.before_call``). Nothing here imports vLLM.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..platform_info import FP8_DTYPES, default_fp8_dtype
from . import backends as _backends
from . import self_check
from .backend_api import CallSpec
from .comm import communicator_for_group, get_communicator
from .reference import FusedNormQuantOutput

SCALE_LAYOUTS = ("row", "col")
X_DTYPES = (torch.bfloat16, torch.float16)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def make_spec(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    *,
    world_size: int,
    group_size: int,
    weight_offset: float,
    emit_bf16: bool,
    scale_layout: str,
    quant_dtype: torch.dtype,
    quantize: bool,
) -> CallSpec:
    return CallSpec(
        num_tokens=x.shape[0],
        hidden=x.shape[1],
        dtype=x.dtype,
        device=x.device,
        world_size=world_size,
        group_size=group_size,
        weight_offset=weight_offset,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
        has_residual=residual is not None,
        quantize=quantize,
        capturing=_capturing(x.device),
    )


@torch.library.custom_op("vllm_rocm_fused::fused_allreduce_rmsnorm_quant", mutates_args=())
def _fused_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    eps: float,
    comm_name: Optional[str],
    group_size: int,
    weight_offset: float,
    emit_bf16: bool,
    scale_layout: str,
    quant_dtype: torch.dtype,
    quantize: bool,
    backend: str,
    tag: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments are trusted (the Python wrappers validate). Optional outputs come
    back as empty tensors: q/scale when not quantize, normed when not needed.
    ``tag`` names the call site in the once-per-path log line (glue code sets it)."""
    comm = get_communicator(comm_name) if comm_name is not None else None
    spec = make_spec(
        x,
        residual,
        world_size=comm.world_size if comm is not None else 1,
        group_size=group_size,
        weight_offset=weight_offset,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
        quantize=quantize,
    )
    if tag:  # a model site: its first eager call checks it first (when configured)
        self_check.before_call(tag, backend, weight, eps, comm, spec)
    q, scale, new_residual, normed = _backends.run(backend, x, residual, weight, eps, comm, spec, tag=tag)
    empty = x.new_empty(0)
    return (
        q if q is not None else empty.to(quant_dtype),
        scale if scale is not None else empty.to(torch.float32),
        new_residual,
        normed if normed is not None else empty.clone(),
    )


@_fused_op.register_fake
def _fused_op_fake(
    x,
    residual,
    weight,
    eps,
    comm_name,
    group_size,
    weight_offset,
    emit_bf16,
    scale_layout,
    quant_dtype,
    quantize,
    backend,
    tag="",
):
    tokens, hidden = x.shape
    if quantize:
        q = x.new_empty((tokens, hidden), dtype=quant_dtype)
        groups = hidden // group_size
        if scale_layout == "col":
            scale = x.new_empty((groups, tokens), dtype=torch.float32).t()
        else:
            scale = x.new_empty((tokens, groups), dtype=torch.float32)
    else:
        q = x.new_empty(0, dtype=quant_dtype)
        scale = x.new_empty(0, dtype=torch.float32)
    new_residual = x.new_empty((tokens, hidden))
    normed = x.new_empty((tokens, hidden)) if (emit_bf16 or not quantize) else x.new_empty(0)
    return q, scale, new_residual, normed


def call_fused_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    comm_name: str | None,
    *,
    group_size: int,
    weight_offset: float,
    emit_bf16: bool,
    scale_layout: str,
    quant_dtype: torch.dtype,
    quantize: bool,
    backend: str,
    tag: str = "",
) -> FusedNormQuantOutput:
    """The torch op with already-validated arguments (glue code calls this)."""
    q, scale, new_residual, normed = torch.ops.vllm_rocm_fused.fused_allreduce_rmsnorm_quant(
        x,
        residual,
        weight,
        float(eps),
        comm_name,
        group_size,
        float(weight_offset),
        emit_bf16,
        scale_layout,
        quant_dtype,
        quantize,
        backend,
        tag,
    )
    if not quantize:
        return FusedNormQuantOutput(None, None, new_residual, normed)
    return FusedNormQuantOutput(q, scale, new_residual, normed if emit_bf16 else None)


def validate(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    group_size: int,
    weight_offset: float,
    scale_layout: str,
    quant_dtype: torch.dtype | None,
    backend: str,
) -> torch.dtype:
    """Raise ValueError/TypeError naming the bad argument; return the resolved quant dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be bfloat16 or float16, got {x.dtype}")
    hidden = x.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if hidden == 0 or hidden % group_size != 0:
        raise ValueError(
            f"hidden size (x.shape[1] = {hidden}) must be a positive multiple of group_size = {group_size}"
        )
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual must be on x's device {x.device}, got {residual.device}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must be {x.dtype} or float32, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if (
        isinstance(weight_offset, bool)
        or not isinstance(weight_offset, (int, float))
        or not math.isfinite(weight_offset)
    ):
        raise ValueError(f"weight_offset must be a finite float, got {weight_offset!r}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    if quant_dtype is None:
        quant_dtype = default_fp8_dtype(x.device)
    elif not isinstance(quant_dtype, torch.dtype) or quant_dtype not in FP8_DTYPES:
        raise TypeError(f"quant_dtype must be an FP8 dtype {FP8_DTYPES} or None, got {quant_dtype!r}")
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a backend name string, got {backend!r}")
    # Under torch.compile the registry (which imports backend modules) is not
    # traced; an unknown name then fails when the op runs (same message).
    if not torch.compiler.is_compiling() and backend not in _backends.known_backend_names():
        raise ValueError(f"backend must be one of {_backends.known_backend_names()}, got {backend!r}")
    return quant_dtype


def fused_allreduce_rmsnorm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    group: dist.ProcessGroup | None = None,
    group_size: int = 128,
    weight_offset: float = 0.0,
    emit_bf16: bool = False,
    scale_layout: str = "row",
    quant_dtype: torch.dtype | None = None,
    backend: str = "auto",
    quantize: bool = True,
) -> FusedNormQuantOutput:
    """All-reduce + residual add + RMSNorm + per-group dynamic FP8 quant.

    Args:
        x: [T, H] bfloat16/float16, this rank's partial sum (T may be 0).
        residual: [T, H] like x, or None (the first layer has none).
        weight: [H] norm weight, x.dtype or float32.
        eps: RMSNorm epsilon.
        group: ProcessGroup to sum x over; None (or a group of one rank) = no all-reduce.
            Every rank of the group must call with the same shapes.
        group_size: quantization group along H (H % group_size == 0).
        weight_offset: added to weight before scaling (1.0 for Gemma/Qwen3.5 norms).
        emit_bf16: also return the normalized activation in x.dtype.
        scale_layout: "row": scale contiguous [T, H/group_size]; "col": same shape,
            column-major storage (stride (1, T)), as CUTLASS/DeepGEMM consume.
        quant_dtype: FP8 type of q; None = the device's (e4m3fnuz on gfx942, else e4m3fn).
        backend: "auto" (best eligible), "native", or a registered fast backend name.
        quantize: False = AR + add + RMSNorm only (q and scale are None, normed returned).

    Returns:
        FusedNormQuantOutput(q, scale, residual, normed); see ops.reference for the
        exact semantics. x and residual are not modified.
    """
    quant_dtype = validate(
        x,
        residual,
        weight,
        eps,
        group_size=group_size,
        weight_offset=weight_offset,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
        backend=backend,
    )
    comm = communicator_for_group(group)
    return call_fused_op(
        x,
        residual,
        weight,
        eps,
        comm.name if comm is not None else None,
        group_size=group_size,
        weight_offset=weight_offset,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
        quantize=bool(quantize),
        backend=backend,
    )
