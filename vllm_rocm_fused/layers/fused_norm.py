"""The vLLM CustomOp: fused all-reduce + residual add + RMSNorm + per-group FP8 quant.

A drop-in for an RMSNorm site: ``forward(x, residual=None)`` where ``x`` is this
rank's *un-reduced* partial sum (when ``all_reduce``) or the full activation.
Returns a ``FusedNormQuantOutput`` (q, scale, residual, normed); model glue turns
it into what the consumer layer takes.

Platform dispatch is vLLM's (decided once, at construction): ``forward_native``
runs the portable path; ``forward_cuda``/``forward_hip``/``forward_cpu`` the
backend the registry picks (the best eligible one the TP ranks agree on; on a CPU
that is the portable path too, unless a test registered another), with the
portable path as the last fallback. Every path goes through the opaque
``torch.ops.vllm_rocm_fused.fused_allreduce_rmsnorm_quant``, so torch.compile
traces it as one node. Unlike most CustomOps it is on by default also under
torch.compile (its kernels are opaque to Inductor anyway); ``-name`` in
``compilation_config.custom_ops`` still turns it off (portable path).

The startup self-check (``ops.self_check``, VLLM_ROCM_FUSED_VALIDATE) is set up
here, once per process, from vLLM's token limits: each site's first eager call
(the profile run) checks its fast paths against the portable path first.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from vllm.config import get_cached_compilation_config, get_current_vllm_config
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from .. import envs
from ..log import get_logger, log_once
from ..ops import self_check
from ..ops.backends import known_backend_names, notify_weight_updated
from ..ops.fused import SCALE_LAYOUTS, call_fused_op
from ..ops.reference import FusedNormQuantOutput
from .comm import tp_communicator_name

OP_NAME = "fused_allreduce_rmsnorm_quant"
logger = get_logger("fused_norm")


@CustomOp.register(OP_NAME)
class FusedAllReduceRMSNormQuant(CustomOp):
    """Args:
    hidden_size: H (a multiple of group_size when quantize).
    eps: RMSNorm epsilon.
    weight_offset: 1.0 for Gemma/Qwen3.5 norms (x * (1 + w)), 0.0 for plain RMSNorm.
    all_reduce: sum x over vLLM's TP group first (False: add + norm + quant only).
    quantize: emit (q, scale); False = AR + add + RMSNorm with x.dtype output.
    emit_bf16: with quantize, also return the normed activation in x.dtype.
    scale_layout: "row" or "col" (column-major), what the consumer GEMM reads.
    group_size: quant group along H.
    quant_dtype: FP8 type; None = vLLM's platform FP8 (e4m3fnuz on gfx942).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        weight_offset: float = 0.0,
        all_reduce: bool = True,
        quantize: bool = True,
        emit_bf16: bool = False,
        scale_layout: str = "row",
        group_size: int = 128,
        quant_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if scale_layout not in SCALE_LAYOUTS:
            raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
        if quantize and hidden_size % group_size != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of group_size ({group_size})")
        init = torch.zeros if weight_offset == 1.0 else torch.ones
        self.weight = nn.Parameter(init(hidden_size), requires_grad=False)
        # vLLM's loaders call param.weight_loader(param, loaded): backends that
        # keep a copy derived from the weight (ROCm's 1 + w) refresh it there.
        set_weight_attrs(self.weight, {"weight_loader": self._load_weight})
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight_offset = float(weight_offset)
        self.quantize = quantize
        self.emit_bf16 = emit_bf16
        self.scale_layout = scale_layout
        self.group_size = group_size
        self.quant_dtype = quant_dtype if quant_dtype is not None else current_platform.fp8_dtype()
        self.comm_name = tp_communicator_name() if all_reduce else None
        self.backend = _resolve_forced_backend()
        _configure_self_check()

    @classmethod
    def enabled(cls) -> bool:
        return f"-{OP_NAME}" not in get_cached_compilation_config().custom_ops

    def _load_weight(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param.shape != loaded_weight.shape:
            raise ValueError(f"norm weight must have shape {tuple(param.shape)}, got {tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight)
        notify_weight_updated(param.data)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, eps={self.variance_epsilon}, "
            f"weight_offset={self.weight_offset}, all_reduce={self.comm_name is not None}, "
            f"quantize={self.quantize}, emit_bf16={self.emit_bf16}, scale_layout={self.scale_layout}"
        )

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None, backend: str, tag: str) -> FusedNormQuantOutput:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        res2 = residual.reshape(-1, shape[-1]) if residual is not None else None
        out = call_fused_op(
            x2,
            res2,
            self.weight.data,
            self.variance_epsilon,
            self.comm_name,
            group_size=self.group_size,
            weight_offset=self.weight_offset,
            emit_bf16=self.emit_bf16,
            scale_layout=self.scale_layout,
            quant_dtype=self.quant_dtype,
            quantize=self.quantize,
            backend=backend,
            tag=tag,
        )
        if len(shape) == 2:
            return out
        return FusedNormQuantOutput(
            out.q,
            out.scale,
            out.residual.view(shape),
            out.normed.view(shape) if out.normed is not None else None,
        )

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, tag: str = ""
    ) -> FusedNormQuantOutput:
        return self._run(x, residual, "native", tag)

    def forward_cuda(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, tag: str = ""
    ) -> FusedNormQuantOutput:
        return self._run(x, residual, self.backend, tag)

    def forward_cpu(self, x: torch.Tensor, residual: torch.Tensor | None = None, tag: str = "") -> FusedNormQuantOutput:
        # the registry's choice, as on GPUs: the portable path unless a test registered
        # a backend for CPU tensors (the self-check's fault injection, the ROCm fakes)
        return self._run(x, residual, self.backend, tag)


def _resolve_forced_backend() -> str:
    """VLLM_ROCM_FUSED_BACKEND, or "auto" (with a warning, once) if it names no backend."""
    requested = envs.forced_backend()
    known = known_backend_names()
    if requested in known:
        return requested
    log_once(
        logger,
        logging.WARNING,
        f"forced-backend:{requested}",
        "vllm-rocm-fused: VLLM_ROCM_FUSED_BACKEND=%r is not one of %s; using auto",
        requested,
        known,
    )
    return "auto"


def _configure_self_check() -> None:
    """Set up the startup self-check once per process: VLLM_ROCM_FUSED_VALIDATE's mode,
    up to the largest token count vLLM will run (max_num_batched_tokens, or the largest
    CUDA-graph capture size if larger). A limit vLLM does not have (renamed, missing) is
    logged and replaced by 8192: the check then covers at least the usual sizes."""
    if self_check.settings() is not None:
        return
    mode = envs.validate_mode()
    limits = []
    config = get_current_vllm_config()
    for owner, field in (
        ("scheduler_config", "max_num_batched_tokens"),
        ("compilation_config", "max_cudagraph_capture_size"),
    ):
        value = getattr(getattr(config, owner, None), field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append(value)
        elif field == "max_num_batched_tokens":
            log_once(
                logger,
                logging.INFO,
                "self-check-limit",
                "vllm-rocm-fused: vLLM's scheduler_config.max_num_batched_tokens is %r; the self-check goes up to 8192 tokens",
                value,
            )
    max_tokens = max(limits) if limits else 8192
    self_check.configure(mode, max_tokens)
    if mode != "off":
        log_once(
            logger,
            logging.INFO,
            "self-check-on",
            "vllm-rocm-fused: self-check (VLLM_ROCM_FUSED_VALIDATE=%s): each fused site's first eager call checks "
            "its fast paths against the portable path at %d token counts up to %d",
            mode,
            len(self_check.check_sizes(max_tokens)),
            max_tokens,
        )
