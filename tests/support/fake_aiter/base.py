"""What every fake aiter generation shares: the numbers (computed by the spec,
vllm_rocm_fused.ops.reference, the way aiter's kernels define them), argument
recording, failure injection, and the module tree.

Behaviour mirrored from ROCm/aiter (file @ tag):

* aiter/dist/device_communicators/custom_all_reduce.py @ v0.1.14:
  ``CustomAllreduce.__init__(group, device, max_size, enable_register_for_capturing)``
  asserts a non-NCCL group and sets ``disabled`` for an unsupported world size
  (``_SUPPORTED_WORLD_SIZES = [2, 4, 6, 8]``); ``should_custom_ar`` (16-byte
  multiple, weak-contiguous, <= 8192 * 8192 bytes without prefill_support);
  the ``custom_*`` methods return None when ``should_custom_ar`` is False;
  ``_validate_per_group_size`` raises ValueError on a bad group size.
* csrc/include/custom_all_reduce.cuh @ v0.1.20 (``dispatchFusedAllReduceRMSNormQuantPerGroup``,
  ``ar_fusion_epilogue_per_group``): world size 2/4/8 else RuntimeError,
  ``hidden / pack <= 1024`` else RuntimeError, scale = amax / FP8_MAX with 1.0
  for an all-zero group, no Gemma mode, ``w`` read as the input dtype; the
  AR+RMSNorm epilogue adds 1.0 to ``w`` in float32 when ``gemma_norm``.
* aiter/ops/quant.py @ v0.1.14: ``per_group_quant_hip(x, scale=None,
  quant_dtype=dtypes.i8, group_size=128, transpose_scale=False, ...)``; its
  transpose_scale writes shuffled bytes into a row-major-shaped buffer.
* aiter/utility/dtypes.py @ v0.1.20: ``fp8`` by arch (gfx942 e4m3fnuz, gfx950 e4m3fn).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vllm_rocm_fused.ops.reference import group_quant, norm_quant_reference

ARCH_FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}


@dataclass
class Call:
    name: str
    args: dict[str, Any]


@dataclass
class FakeState:
    """One installed fake: what was called, what must fail, which FP8 type."""

    fp8: torch.dtype = torch.float8_e4m3fn
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, BaseException] = field(default_factory=dict)
    tp_group: Any = None  # aiter's own TP group (parallel_state), when a test sets one up

    def record(self, name: str, **args) -> None:
        self.calls.append(Call(name, args))
        if name in self.failures:
            raise self.failures[name]

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


STATE = FakeState()


class SimulatedGroup:
    """A TP group inside one process: rank ``rank`` of ``world_size``, whose peers
    contributed ``peers`` (float32 tensors). ``all_reduce`` is the exact float32 sum."""

    def __init__(self, world_size: int, peers: list[torch.Tensor] | None = None, rank: int = 0) -> None:
        self.world_size = world_size
        self.rank = rank
        self.peers = peers or []
        self.ranks = list(range(world_size))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        for p in self.peers:
            h = h + p.to(torch.float32)
        return h


def group_world_size(group) -> int:
    if isinstance(group, dist.ProcessGroup):
        return dist.get_world_size(group)
    return group.world_size


def reduce_sum(group, x: torch.Tensor) -> torch.Tensor:
    if isinstance(group, dist.ProcessGroup):
        h = x.to(torch.float32, copy=True)
        dist.all_reduce(h, group=group)
        return h
    return group.all_reduce(x)


def validate_per_group_size(group_size: int, element_size: int, n: int) -> None:
    pack = 16 // element_size
    lanes = group_size // pack if group_size > 0 else 0
    if group_size <= 0 or group_size % pack or lanes & (lanes - 1) or lanes > 64 or n % group_size:
        raise ValueError(f"per-group quant: bad group_size={group_size} for n={n}")


def zero_group_scale_is_one(scale: torch.Tensor, normed: torch.Tensor, group_size: int) -> torch.Tensor:
    """aiter: ``scale = local_max == 0.f ? 1.f : local_max / FP8_UPBOUND``."""
    t, h = normed.shape
    amax = normed.to(torch.float32).view(t, h // group_size, group_size).abs().amax(dim=-1)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def col_major(scale: torch.Tensor) -> torch.Tensor:
    """aiter's transpose_scale layout: a (groups, M) buffer viewed as (M, groups)."""
    m, g = scale.shape
    out = torch.empty((g, m), dtype=scale.dtype, device=scale.device).transpose(0, 1)
    out.copy_(scale)
    return out


class CustomAllreduceBase:
    """The part of aiter's CustomAllreduce every generation shares. Generation
    modules subclass it and add the public methods with that version's exact
    signatures, which call the ``_`` helpers below."""

    _SUPPORTED_WORLD_SIZES = [2, 4, 6, 8]

    def __init__(self, group, device, max_size=1024 * 1024 * 1024, enable_register_for_capturing=True):
        STATE.record("CustomAllreduce.__init__", group=group, device=device, max_size=max_size)
        self._IS_CAPTURING = False
        self.disabled = True
        if isinstance(group, dist.ProcessGroup):
            assert dist.get_backend(group) != dist.Backend.NCCL, \
                "CustomAllreduce should be attached to a non-NCCL group."
        self.group = group
        self.world_size = group_world_size(group)
        if self.world_size == 1 or self.world_size not in self._SUPPORTED_WORLD_SIZES:
            return
        self.disabled = False
        self.device = device
        self.max_size = max_size
        self.fully_connected = True
        self.enable_register_for_capturing = enable_register_for_capturing

    @contextmanager
    def capture(self):
        try:
            self._IS_CAPTURING = True
            yield
        finally:
            self._IS_CAPTURING = False

    def should_custom_ar(self, inp: torch.Tensor, prefill_support: bool = False) -> bool:
        if self.disabled:
            return False
        size = inp.numel() * inp.element_size()
        if size % 16 or not inp.is_contiguous():
            return False
        return size <= (self.max_size / 2 if prefill_support else 8192 * 8192)

    # --- shared kernels ----------------------------------------------------

    def _launch_checks(self, inp: torch.Tensor, w: torch.Tensor, registered: bool) -> None:
        if self.world_size not in (2, 4, 8):
            raise RuntimeError(f"fused allreduce rmsnorm: unsupported world_size={self.world_size}")
        if w.dtype != inp.dtype:
            raise TypeError(f"weight must be {inp.dtype} (read as the input type), got {w.dtype}")
        if registered and not self._IS_CAPTURING:
            raise RuntimeError("buffer address is not registered!")

    def _ar_rms(self, name, inp, res_inp, w, eps, *, registered, use_1stage, gemma_norm=False):
        STATE.record(name, inp=inp, res_inp=res_inp, w=w, eps=eps, registered=registered,
                     use_1stage=use_1stage, gemma_norm=gemma_norm)
        self._launch_checks(inp, w, registered)
        out = norm_quant_reference(reduce_sum(self.group, inp), res_inp, w, eps, out_dtype=inp.dtype,
                                   weight_offset=1.0 if gemma_norm else 0.0, quantize=False)
        return out.normed, out.residual

    def _per_group(self, name, inp, res_inp, w, eps, *, group_size, registered, use_1stage, emit_bf16,
                   transpose_scale=False):
        STATE.record(name, inp=inp, res_inp=res_inp, w=w, eps=eps, group_size=group_size, registered=registered,
                     use_1stage=use_1stage, emit_bf16=emit_bf16, transpose_scale=transpose_scale)
        validate_per_group_size(group_size, inp.element_size(), inp.shape[-1])
        self._launch_checks(inp, w, registered)
        if inp.shape[-1] // (16 // inp.element_size()) > 1024:
            raise RuntimeError("per-group quant fused kernel: unsupported n")
        out = norm_quant_reference(reduce_sum(self.group, inp), res_inp, w, eps, out_dtype=inp.dtype,
                                   group_size=group_size, emit_bf16=True, quant_dtype=STATE.fp8)
        scale = zero_group_scale_is_one(out.scale, out.normed, group_size)
        if transpose_scale:
            scale = col_major(scale)
        if emit_bf16:
            return out.q, out.residual, scale, out.normed
        return out.q, out.residual, scale

    def _graph_aware(self, inp, run, dummy):
        """The ``custom_*`` pattern: None when declined; zeros while warming up
        inside capture() without a capturing stream; registered when capturing."""
        if self.disabled or not self.should_custom_ar(inp):
            return None
        if self._IS_CAPTURING:
            capturing = inp.is_cuda and torch.cuda.is_current_stream_capturing()
            return run(True) if capturing else dummy()
        return run(False)


def hip_group_quant(x, scale=None, quant_dtype=torch.int8, group_size=128, transpose_scale=False,
                    num_rows=None, num_rows_factor=1):
    """``per_group_quant_hip`` (bound to group_size=128 by get_hip_quant(per_1x128))."""
    STATE.record("per_group_quant_hip", x=x, quant_dtype=quant_dtype, group_size=group_size,
                 transpose_scale=transpose_scale)
    if scale is not None:
        raise ValueError("unsupported: static per token quant")
    assert group_size in (32, 64, 128)
    if quant_dtype == torch.int8:
        t, h = x.shape
        g = x.to(torch.float32).view(t, h // group_size, group_size)
        s = torch.clamp(g.abs().amax(-1), min=1e-10) / 127.0
        q = torch.clamp(torch.round(g / s.unsqueeze(-1)), -127, 127).to(torch.int8).view(t, h)
    else:
        q, s = group_quant(x, group_size, quant_dtype)
    if transpose_scale:  # shuffled: column-major bytes in a row-major-shaped buffer
        s = s.t().contiguous().view(s.shape)
    return q, s


class QuantType:
    """aiter.ops.enum.QuantType (a pybind enum; members compared by ``.value``)."""

    class _Member:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def __repr__(self):
            return f"QuantType.{self.name}"

    No = _Member("No", 0)
    per_Tensor = _Member("per_Tensor", 1)
    per_Token = _Member("per_Token", 2)
    per_1x32 = _Member("per_1x32", 3)
    per_1x128 = _Member("per_1x128", 4)


def get_hip_quant(q_type):
    table = {QuantType.per_1x128.value: lambda *a, **k: hip_group_quant(*a, **{"group_size": 128, **k})}

    def not_implemented(*a, **k):
        raise NotImplementedError(f"unsupported quant type {q_type=}")

    return table.get(q_type.value, not_implemented)


# --- aiter's own TP group (aiter.dist.parallel_state) -----------------------


class FakeGroupCoordinator:
    """aiter.dist.parallel_state.GroupCoordinator: ``ranks`` and the device
    communicator holding ``ca_comm``."""

    def __init__(self, ranks: list[int], ca) -> None:
        self.ranks = list(ranks)
        self.world_size = len(ranks)
        self.device_communicator = types.SimpleNamespace(ca_comm=ca)


def parallel_state_module() -> dict[str, Any]:
    def get_tp_group():
        assert STATE.tp_group is not None, "tensor model parallel group is not initialized"
        return STATE.tp_group

    def model_parallel_is_initialized():
        return STATE.tp_group is not None

    return {"get_tp_group": get_tp_group, "model_parallel_is_initialized": model_parallel_is_initialized}


def communicator_per_group(input_, residual_inp_, weight_, eps, group_size, emit_bf16, transpose_scale=None):
    """aiter's CudaCommunicator.fused_allreduce_rmsnorm_quant_per_group: the fused
    kernel, else (declined or raised) fused AR+RMSNorm then per_1x128 quant."""
    ca = STATE.tp_group.device_communicator.ca_comm
    kwargs = {} if transpose_scale is None else {"transpose_scale": transpose_scale}
    result = None
    try:
        result = ca.custom_fused_ar_rms_per_group_quant(input_, residual_inp_, weight_, eps, group_size,
                                                        input_.numel() * input_.element_size() <= 128 * 1024,
                                                        emit_bf16=emit_bf16, **kwargs)
    except Exception:  # noqa: BLE001 - aiter swallows it and falls back
        result = None
    if result is not None:
        return result
    out_, res_out = ca.fused_ar_rms(input_, residual_inp_, w=weight_, eps=eps)
    q, scale = hip_group_quant(out_, quant_dtype=STATE.fp8, transpose_scale=False)
    if transpose_scale:
        scale = col_major(scale)
    return (q, res_out, scale, out_) if emit_bf16 else (q, res_out, scale)


def package(version: str, ca_class: type, comm_op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The module tree of one generation: module name -> attributes."""
    dtypes = types.SimpleNamespace(fp8=STATE.fp8, bf16=torch.bfloat16, fp16=torch.float16,
                                   fp32=torch.float32, i8=torch.int8)
    return {
        "aiter": {"__version__": version, "QuantType": QuantType, "get_hip_quant": get_hip_quant,
                  "dtypes": dtypes, "__path__": []},
        "aiter.dist": {"__path__": []},
        "aiter.dist.device_communicators": {"__path__": []},
        "aiter.dist.device_communicators.custom_all_reduce": {"CustomAllreduce": ca_class},
        "aiter.dist.communication_op": comm_op,
        "aiter.dist.parallel_state": parallel_state_module(),
        "aiter.utility": {"__path__": [], "dtypes": dtypes},
        "aiter.utility.dtypes": vars(dtypes),
    }
