"""What every fake aiter generation shares: the kernels' numbers (plain torch,
the way aiter's kernels compute them, not the way the spec does), the kernels'
limits (a call real aiter would reject raises what aiter raises; a call that
would hang or corrupt raises ``KernelHazard``), argument recording, failure
injection, and the module tree.

Written from ROCm/aiter's source, independently of the backend's own rules
(vllm_rocm_fused/backends/rocm/kernel_limits.py), so that tests compare two
readings of it. File @ tag:

* aiter/dist/device_communicators/custom_all_reduce.py @ v0.1.14 - main:
  ``CustomAllreduce.__init__(group, device, max_size, enable_register_for_capturing)``
  asserts a non-NCCL group and sets ``disabled`` for an unsupported world size
  (``_SUPPORTED_WORLD_SIZES = [2, 4, 6, 8]``); ``should_custom_ar`` (16-byte
  multiple, weak-contiguous, <= 64 MiB); the ``custom_*`` methods return None
  when ``should_custom_ar`` is False, and zero tensors inside ``capture()``
  when the stream is not capturing (vLLM's warm-up runs);
  ``_validate_per_group_size`` raises ValueError on a bad group size.
* csrc/include/custom_all_reduce.cuh (see ``kernel_verdict`` for each limit).
  Numerics, every variant: the all-reduced sum (float32, rank order) is
  rounded to the input dtype before the residual is added.
  ``allreduce_fusion_kernel_1stage`` / ``local_device_load_rmsnorm``: s =
  float32(rounded sum) + float32(residual); residual = round(s); the norm
  reads s; normed = round(s * rsqrt(mean(s^2) + eps) * w) (``w + 1`` in
  float32 with ``gemma_norm``, v0.1.17 on). Per-group: the one-stage kernel
  normalizes s; the two-stage and split kernels add the residual in the
  input dtype (``vec[v] += res[v]``) and normalize that rounded residual;
  ``ar_fusion_epilogue_per_group`` quantizes the float32 normed y: scale =
  amax(|y|) / FP8_MAX (1.0 for an all-zero group), q = fp8(y / scale);
  ``bf16_output`` = round(y). ``w`` is read as the input dtype.
* csrc/include/opus/opus.hpp: ``bf16_t`` is ``unsigned short`` under clang <
  20 (ROCm < 7), so ``vec[v] += res[v]`` on bf16 adds bit patterns.
* aiter/ops/quant.py + csrc/kernels/quant_kernels.cu @ v0.1.13 - main:
  ``per_group_quant_hip(x, scale=None, quant_dtype=dtypes.i8, group_size=128,
  transpose_scale=False, ...)``: scale = max(amax, 1e-10) * float32(1 / FP8_MAX),
  q = fp8(x * (1 / scale)); ``transpose_scale`` writes ``scale[group * M + row]``
  into the ``[M, K/128]``-shaped buffer.
* aiter/utility/dtypes.py @ v0.1.20: ``fp8`` by arch (gfx942 e4m3fnuz, gfx950 e4m3fn).
* The two-stage race: up to v0.1.13.post1 ``reduce_scatter_cross_device_store``
  (first stage of the two-stage AR+RMSNorm and per-group split kernels) ends
  with ``end_sync<ngpus, true>``; PR #2890 (in v0.1.14) made it
  ``end_sync<ngpus, false>`` ("progressively corrupted output at per-rank volumes
  above ~1.2 MB"). The fake counts every such call as corruption, whatever its size.
* v0.1.11.post1: ``dispatchFusedAllReduceRMSNorm`` keeps ``use_1stage`` only for
  n in {512, 1024, 2048, 4096} and its second stage launches a kernel only for
  rows of a multiple of 1 KiB from 1 to 32 KiB; other rows print "shape error"
  and leave ``out`` / ``res_out`` unwritten.
* The ``fused_ar_rms*`` methods do not ask ``should_custom_ar``; the fake counts
  a call to them for an input ``should_custom_ar`` declines (aiter's switches,
  v0.1.18 on, or its size rules) as running kernels the user turned off.
* aiter/jit/utils/cpp_extension.py @ v0.1.11 - main: ``HIP_VERSION`` (``hipconfig
  --version``) and ``ROCM_HOME``, set at import; ``aiter/jit/core.py`` imports its
  ``get_hip_version``. The fake serves that module as ``aiter.jit.utils.cpp_extension``
  (real aiter imports it as top-level ``cpp_extension``; the backend follows
  ``get_hip_version.__module__`` either way) and calling its
  ``get_hip_version`` (a subprocess in aiter) is recorded.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vllm_rocm_fused.platform_info import fp8_max

ARCH_FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}

# csrc/include/custom_all_reduce.cuh
K_MAX_BLOCKS = 80  # sync-signal slots per rank
PACK = 16  # bytes per vector access


class KernelHazard(BaseException):
    """A call that hangs or corrupts memory/results in real aiter. A BaseException,
    so no ``except Exception`` in the code under test can swallow it: the test
    fails, as the serving process would."""


@dataclass
class Call:
    name: str
    args: dict[str, Any]


@dataclass
class FakeState:
    """One installed fake: what was called, what must fail, which FP8 type, which
    compiler built the kernels, and every call real aiter would have rejected,
    hung or corrupted on (``violations``)."""

    fp8: torch.dtype = torch.float8_e4m3fn
    hip: str | None = "7.0.51831"  # the ROCm whose clang built the kernels (kernel_verdict)
    # what aiter's JIT module reports (HIP_VERSION, ROCM_HOME); None: no such module
    jit: dict[str, Any] | None = field(default_factory=lambda: {"HIP_VERSION": "7.0.51831", "ROCM_HOME": "/opt/rocm"})
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, BaseException] = field(default_factory=dict)
    tp_group: Any = None  # aiter's own TP group (parallel_state), when a test sets one up
    violations: list[str] = field(default_factory=list)

    def record(self, name: str, **args) -> None:
        self.calls.append(Call(name, args))
        if name in self.failures:
            raise self.failures[name]

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


STATE = FakeState()


def clang_major(hip: str | None) -> int:
    """ROCm 7.0 ships clang 20 (opus.hpp: ``#if __clang_major__ >= 20 // enable for rocm 7.0+``)."""
    try:
        major = int(str(hip).split(".")[0])
    except ValueError:
        return 0
    return 20 if major >= 7 else 19


# --- the kernels' limits ------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    variant: str  # "one-stage", "two-stage", "split"
    problem: str | None = None  # what real aiter does instead of running it
    hazard: bool = False  # True: hang/corruption; False: it throws


RACE = (
    "reduce_scatter_cross_device_store ends with end_sync<ngpus, true> before PR #2890: the second "
    "stage may read peers' stores before they land (silently corrupted output)"
)


def kernel_verdict(
    kernel: str,
    *,
    tokens: int,
    hidden: int,
    dtype: torch.dtype,
    world_size: int,
    use_1stage: bool,
    one_block_per_token: bool,
    hip: str | None,
    two_stage_races: bool = False,
    fixed_hidden: bool = False,
) -> Verdict:
    """What aiter's dispatch does with one call of ``kernel`` ("ar_rms" or
    "per_group"): the variant it launches and, if any, the failure. From
    custom_all_reduce.cuh: ``dispatchFusedAllReduceRMSNorm``,
    ``dispatchFusedAllReduceRMSNormQuantPerGroup`` and their launchers.
    ``two_stage_races``: aiter <= 0.1.13.post1; ``fixed_hidden``: <= 0.1.11."""
    esize = dtype.itemsize
    n_packs = hidden * esize // PACK
    nbytes = tokens * hidden * esize
    if world_size not in (2, 4, 8):
        return Verdict("-", f"fused allreduce rmsnorm: unsupported world_size={world_size}")
    if kernel == "ar_rms":
        if fixed_hidden and hidden not in (512, 1024, 2048, 4096):
            use_1stage = False  # v0.1.11 drops the flag for the sizes it has no template for
        if use_1stage and n_packs <= 1024:
            if one_block_per_token and tokens > K_MAX_BLOCKS:  # v0.1.13 - v0.1.16.x launcher
                return Verdict("one-stage", "Token number is too large for allreduce_fusion_kernel_1stage kernel")
            return Verdict("one-stage")
        row_bytes = hidden * esize
        if fixed_hidden and (row_bytes % 1024 or not 1024 <= row_bytes <= 32768):
            return Verdict(
                "two-stage",
                f"fused allreduce rmsnorm shape error (hidden {hidden}): no second-stage kernel, out and "
                f"res_out left unwritten",
                hazard=True,
            )
        if two_stage_races:
            return Verdict("two-stage", RACE, hazard=True)
        if n_packs < 64:
            return Verdict("two-stage", f"fused allreduce rmsnorm: n too small, m={tokens} n={hidden}")
        if (n_packs + 511) // 512 > 4:
            return Verdict("two-stage", f"fused allreduce rmsnorm: n too large, m={tokens} n={hidden}")
        return Verdict("two-stage")
    if n_packs > 1024:
        return Verdict("-", "per-group quant fused kernel: unsupported n")
    if use_1stage:
        if one_block_per_token and tokens > K_MAX_BLOCKS:  # grid(m) against kMaxBlocks signal slots
            return Verdict(
                "one-stage",
                f"one-stage per-group launch of {tokens} blocks overruns the {K_MAX_BLOCKS} sync-signal slots",
                hazard=True,
            )
        return Verdict("one-stage")
    variant = "two-stage" if nbytes <= 512 * 1024 else "split"
    if two_stage_races and variant == "split":  # the split kernels start with the same reduce-scatter
        return Verdict(variant, RACE, hazard=True)
    if dtype == torch.bfloat16 and clang_major(hip) < 20:
        return Verdict(
            variant,
            f"{variant} per-group kernel adds bf16 residuals as integers "
            f"(bf16_t is unsigned short under clang < 20, HIP {hip})",
            hazard=True,
        )
    return Verdict(variant)


def _enforce(verdict: Verdict) -> None:
    if verdict.problem is None:
        return
    STATE.violations.append(("hazard: " if verdict.hazard else "rejected: ") + verdict.problem)
    if verdict.hazard:
        raise KernelHazard(verdict.problem)
    raise RuntimeError(verdict.problem)


# --- process groups -----------------------------------------------------------


class SimulatedGroup:
    """A TP group inside one process: rank ``rank`` of ``world_size``, whose peers
    contributed ``peers`` (float32 tensors). ``all_reduce`` is the float32 sum in
    rank order (this rank first, as rank 0)."""

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


def col_major(scale: torch.Tensor) -> torch.Tensor:
    """aiter's transpose_scale layout: a (groups, M) buffer viewed as (M, groups)."""
    m, g = scale.shape
    out = torch.empty((g, m), dtype=scale.dtype, device=scale.device).transpose(0, 1)
    out.copy_(scale)
    return out


# --- the kernels' numbers -----------------------------------------------------


def _norm(s: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """float32 RMSNorm of float32 ``s`` with ``w`` read as stored (+1 in float32 for gemma_norm)."""
    w32 = w.to(torch.float32) + (1.0 if gemma else 0.0)
    return s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * w32


def ar_rms_numbers(h, res, w, eps, dtype, gemma=False):
    """(normed, residual) of every AR+RMSNorm variant."""
    s = h.to(dtype).to(torch.float32) + res.to(torch.float32)
    return _norm(s, w, eps, gemma).to(dtype), s.to(dtype)


def per_group_numbers(h, res, w, eps, dtype, group_size, fp8, *, multi_stage: bool):
    """(q, residual, scale [M, G] row-major, bf16 normed) of the per-group kernel."""
    s = h.to(dtype).to(torch.float32) + res.to(torch.float32)
    residual = s.to(dtype)
    y = _norm(residual.to(torch.float32) if multi_stage else s, w, eps, gemma=False)
    m, k = y.shape
    g = y.view(m, k // group_size, group_size)
    amax = g.abs().amax(dim=-1)
    qmax = fp8_max(fp8)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / qmax)
    q = torch.clamp(g / scale.unsqueeze(-1), -qmax, qmax).to(fp8).view(m, k)
    return q, residual, scale, y.to(dtype)


def hip_quant_numbers(x, quant_dtype, group_size):
    """``per_group_quant_hip``: multiply by the reciprocal of a reciprocal-derived scale."""
    t, k = x.shape
    g = x.to(torch.float32).view(t, k // group_size, group_size)
    amax = torch.clamp(g.abs().amax(dim=-1), min=1e-10)
    qmax = 127.0 if quant_dtype == torch.int8 else fp8_max(quant_dtype)
    scale = amax * torch.tensor(1.0 / qmax, dtype=torch.float32)
    inv = torch.tensor(1.0, dtype=torch.float32) / scale
    v = torch.clamp(g * inv.unsqueeze(-1), -qmax, qmax)
    if quant_dtype == torch.int8:
        v = torch.round(v)
    return v.to(quant_dtype).view(t, k), scale


class CustomAllreduceBase:
    """The part of aiter's CustomAllreduce every generation shares. Generation
    modules subclass it and add the public methods with that version's exact
    signatures, which call the ``_`` helpers below."""

    _SUPPORTED_WORLD_SIZES = [2, 4, 6, 8]
    # v0.1.13 - v0.1.16.x launch the one-stage kernels with one block per token
    ONE_STAGE_ONE_BLOCK_PER_TOKEN = True
    # up to v0.1.13.post1 the two-stage kernels' first stage races (PR #2890)
    TWO_STAGE_RACES = False
    # up to v0.1.11: one-stage templates for four hidden sizes, unwritten outputs for odd rows
    FIXED_HIDDEN = False

    def __init__(self, group, device, max_size=1024 * 1024 * 1024, enable_register_for_capturing=True):
        STATE.record("CustomAllreduce.__init__", group=group, device=device, max_size=max_size)
        self._IS_CAPTURING = False
        self.disabled = True
        if isinstance(group, dist.ProcessGroup):
            assert dist.get_backend(group) != dist.Backend.NCCL, (
                "CustomAllreduce should be attached to a non-NCCL group."
            )
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

    def _launch_checks(
        self, kernel: str, inp: torch.Tensor, w: torch.Tensor, registered: bool, use_1stage: bool
    ) -> Verdict:
        if w.dtype != inp.dtype:  # the kernel reinterprets w's bytes as the input type
            _enforce(Verdict("-", f"weight {w.dtype} read as {inp.dtype} (misread, no error in aiter)", hazard=True))
        if registered and not self._IS_CAPTURING:
            raise RuntimeError("buffer address is not registered!")
        if not self.should_custom_ar(inp):
            _enforce(
                Verdict(
                    "-",
                    f"fused kernel called for a {inp.numel() * inp.element_size()}-byte input that aiter's "
                    f"custom all-reduce declines (should_custom_ar False: switched off, or outside its size rules)",
                    hazard=True,
                )
            )
        if inp.numel() * inp.element_size() > self.max_size:
            _enforce(
                Verdict(
                    "-",
                    f"input of {inp.numel() * inp.element_size()} bytes exceeds the {self.max_size}-byte IPC buffer",
                )
            )
        verdict = kernel_verdict(
            kernel,
            tokens=inp.shape[0],
            hidden=inp.shape[-1],
            dtype=inp.dtype,
            world_size=self.world_size,
            use_1stage=use_1stage,
            one_block_per_token=self.ONE_STAGE_ONE_BLOCK_PER_TOKEN,
            hip=STATE.hip,
            two_stage_races=self.TWO_STAGE_RACES,
            fixed_hidden=self.FIXED_HIDDEN,
        )
        _enforce(verdict)
        return verdict

    def _ar_rms(self, name, inp, res_inp, w, eps, *, registered, use_1stage, gemma_norm=False):
        STATE.record(
            name,
            inp=inp,
            res_inp=res_inp,
            w=w,
            eps=eps,
            registered=registered,
            use_1stage=use_1stage,
            gemma_norm=gemma_norm,
        )
        verdict = self._launch_checks("ar_rms", inp, w, registered, use_1stage)
        STATE.calls[-1].args["variant"] = verdict.variant
        return ar_rms_numbers(reduce_sum(self.group, inp), res_inp, w, eps, inp.dtype, gemma=gemma_norm)

    def _per_group(
        self, name, inp, res_inp, w, eps, *, group_size, registered, use_1stage, emit_bf16, transpose_scale=False
    ):
        STATE.record(
            name,
            inp=inp,
            res_inp=res_inp,
            w=w,
            eps=eps,
            group_size=group_size,
            registered=registered,
            use_1stage=use_1stage,
            emit_bf16=emit_bf16,
            transpose_scale=transpose_scale,
        )
        validate_per_group_size(group_size, inp.element_size(), inp.shape[-1])
        verdict = self._launch_checks("per_group", inp, w, registered, use_1stage)
        STATE.calls[-1].args["variant"] = verdict.variant
        q, residual, scale, normed = per_group_numbers(
            reduce_sum(self.group, inp),
            res_inp,
            w,
            eps,
            inp.dtype,
            group_size,
            STATE.fp8,
            multi_stage=verdict.variant != "one-stage",
        )
        if transpose_scale:
            scale = col_major(scale)
        return (q, residual, scale, normed) if emit_bf16 else (q, residual, scale)

    def _graph_aware(self, inp, run, dummy):
        """The ``custom_*`` pattern: None when declined; zeros while warming up
        inside capture() without a capturing stream; registered when capturing."""
        if self.disabled or not self.should_custom_ar(inp):
            return None
        if self._IS_CAPTURING:
            capturing = inp.is_cuda and torch.cuda.is_current_stream_capturing()
            return run(True) if capturing else dummy()
        return run(False)


def ar_rms_dummy(inp: torch.Tensor):
    """``custom_fused_ar_rms`` during capture warm-up."""
    return torch.zeros_like(inp), torch.zeros_like(inp)


def per_group_dummy(inp: torch.Tensor, group_size: int, emit_bf16: bool, transpose_scale: bool = False):
    """``custom_fused_ar_rms_per_group_quant`` during capture warm-up (its own zeros)."""
    m, k = inp.shape
    q = torch.zeros(inp.shape, dtype=STATE.fp8, device=inp.device)
    if transpose_scale:
        scale = torch.zeros((k // group_size, m), dtype=torch.float32, device=inp.device).transpose(0, 1)
    else:
        scale = torch.zeros((m, k // group_size), dtype=torch.float32, device=inp.device)
    if emit_bf16:
        return q, torch.zeros_like(inp), scale, torch.zeros_like(inp)
    return q, torch.zeros_like(inp), scale


def hip_group_quant(
    x, scale=None, quant_dtype=torch.int8, group_size=128, transpose_scale=False, num_rows=None, num_rows_factor=1
):
    """``per_group_quant_hip`` (bound to group_size=128 by get_hip_quant(per_1x128))."""
    STATE.record(
        "per_group_quant_hip", x=x, quant_dtype=quant_dtype, group_size=group_size, transpose_scale=transpose_scale
    )
    if scale is not None:
        raise ValueError("unsupported: static per token quant")
    assert group_size in (32, 64, 128)
    q, s = hip_quant_numbers(x, quant_dtype, group_size)
    if transpose_scale:  # scale[group * M + row] in the [M, K/128]-shaped buffer
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
    import functools

    table = {QuantType.per_1x128.value: functools.partial(hip_group_quant, group_size=128)}

    def not_implemented(*a, **k):
        raise NotImplementedError(f"unsupported quant type {q_type=}")

    return table.get(q_type.value, not_implemented)


# --- aiter's own TP group (aiter.dist.parallel_state) -----------------------


class FakeDeviceCommunicator:
    """aiter's CudaCommunicator: holds ``ca_comm`` and reads its one-stage
    settings from AITER_AR_1STAGE / AITER_AR_1STAGE_MAX_KB (class attributes)."""

    _ar_1stage_override = None
    _ar_1stage_max_kb = -1

    def __init__(self, ca) -> None:
        self.ca_comm = ca

    def per_group_one_stage(self, nbytes: int) -> bool:
        if self._ar_1stage_override is not None:
            return self._ar_1stage_override
        return nbytes <= (self._ar_1stage_max_kb if self._ar_1stage_max_kb >= 0 else 128 * 1024)


class FakeGroupCoordinator:
    """aiter.dist.parallel_state.GroupCoordinator: ``ranks`` and the device
    communicator holding ``ca_comm``."""

    def __init__(self, ranks: list[int], ca) -> None:
        self.ranks = list(ranks)
        self.world_size = len(ranks)
        self.device_communicator = FakeDeviceCommunicator(ca)


def parallel_state_module() -> dict[str, Any]:
    def get_tp_group():
        assert STATE.tp_group is not None, "tensor model parallel group is not initialized"
        return STATE.tp_group

    def model_parallel_is_initialized():
        return STATE.tp_group is not None

    return {"get_tp_group": get_tp_group, "model_parallel_is_initialized": model_parallel_is_initialized}


def communicator_ar_rms(input_, residual_inp_, weight_, eps, gemma_norm=None):
    """aiter's CudaCommunicator.fused_allreduce_rmsnorm (v0.1.14 - v0.1.20):
    one-stage up to 128 KiB, through the graph-aware method."""
    dc = STATE.tp_group.device_communicator
    one_stage = input_.numel() * input_.element_size() <= 128 * 1024
    kwargs = {} if gemma_norm is None else {"gemma_norm": gemma_norm}
    out = dc.ca_comm.custom_fused_ar_rms(input_, residual_inp_, weight_, eps, one_stage, **kwargs)
    assert out is not None
    return out


def communicator_per_group(input_, residual_inp_, weight_, eps, group_size, emit_bf16, transpose_scale=None):
    """aiter's CudaCommunicator.fused_allreduce_rmsnorm_quant_per_group: the fused
    kernel (one-stage by its own byte rule), else -- declined or raised, the
    exception swallowed -- fused AR+RMSNorm then per_1x128 quant. ``transpose_scale``
    is passed on whenever the function has it (None: this generation has not)."""
    dc = STATE.tp_group.device_communicator
    ca = dc.ca_comm
    kwargs = {} if transpose_scale is None else {"transpose_scale": transpose_scale}
    result = None
    try:
        result = ca.custom_fused_ar_rms_per_group_quant(
            input_,
            residual_inp_,
            weight_,
            eps,
            group_size,
            dc.per_group_one_stage(input_.numel() * input_.element_size()),
            emit_bf16=emit_bf16,
            **kwargs,
        )
    except Exception:  # noqa: BLE001 - aiter swallows it and falls back
        result = None
    if result is not None:
        return result
    out_, res_out = communicator_ar_rms(input_, residual_inp_, weight_, eps)
    q, scale = hip_group_quant(out_, quant_dtype=STATE.fp8, transpose_scale=False)
    if transpose_scale:
        scale = col_major(scale)
    return (q, res_out, scale, out_) if emit_bf16 else (q, res_out, scale)


class IPCBufferPool:
    """aiter's IPC buffer pool (custom_all_reduce.py, v0.1.12 - main); only its presence matters here."""


CPP_EXTENSION = "aiter.jit.utils.cpp_extension"


def get_hip_version():
    """aiter's ``get_hip_version``: runs ``hipconfig --version`` in aiter, so the backend must not call it."""
    STATE.record("cpp_extension.get_hip_version")
    assert STATE.jit is not None
    return STATE.jit["HIP_VERSION"]


get_hip_version.__module__ = CPP_EXTENSION  # as aiter.jit.core sees it: imported from its cpp_extension


def package(
    version: str, ca_class: type, comm_op: dict[str, Any], *, ca_module: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The module tree of one generation: module name -> attributes. ``ca_module``:
    the custom_all_reduce module's attributes besides CustomAllreduce (default:
    IPCBufferPool, as from v0.1.12)."""
    dtypes = types.SimpleNamespace(
        fp8=STATE.fp8, bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32, i8=torch.int8
    )
    jit: dict[str, dict[str, Any]] = {}
    if STATE.jit is not None:
        jit = {
            "aiter.jit": {"__path__": []},
            "aiter.jit.core": {"get_hip_version": get_hip_version},
            "aiter.jit.utils": {"__path__": []},
            CPP_EXTENSION: {**STATE.jit, "get_hip_version": get_hip_version},
        }
    return {
        **jit,
        "aiter": {
            "__version__": version,
            "QuantType": QuantType,
            "get_hip_quant": get_hip_quant,
            "dtypes": dtypes,
            "__path__": [],
        },
        "aiter.dist": {"__path__": []},
        "aiter.dist.device_communicators": {"__path__": []},
        "aiter.dist.device_communicators.custom_all_reduce": {
            "CustomAllreduce": ca_class,
            **({"IPCBufferPool": IPCBufferPool} if ca_module is None else ca_module),
        },
        "aiter.dist.communication_op": comm_op,
        "aiter.dist.parallel_state": parallel_state_module(),
        "aiter.utility": {"__path__": [], "dtypes": dtypes},
        "aiter.utility.dtypes": vars(dtypes),
    }
