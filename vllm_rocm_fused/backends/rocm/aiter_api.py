"""The aiter boundary: import aiter lazily, find out which API generation it is
(by capability -- ``hasattr`` and signatures -- never by version string), and
call it with exactly the arguments that generation takes.

Facts this module relies on (ROCm/aiter, file and tag where each appeared):

* ``aiter/dist/device_communicators/custom_all_reduce.py``, class
  ``CustomAllreduce(group, device, max_size=..., enable_register_for_capturing=True)``.
  ``group`` must not be an NCCL group (the constructor asserts it); it sets
  ``disabled`` instead of raising for one rank, several nodes or an unsupported
  world size.

  - every version we support: ``fused_ar_rms(inp, res_inp, *, w, eps,
    registered=False, use_1stage=False, ...) -> (out, res_out)`` and the
    graph-aware ``custom_fused_ar_rms(input, residual_inp, weight, eps,
    use_1stage, ...)``, which returns None when it declines the input.
  - v0.1.14 (PR #2823): ``fused_ar_rms_per_group_quant(inp, res_inp, *, w, eps,
    group_size=128, registered=False, use_1stage=False, emit_bf16=False)
    -> (fp8, res_out, scale[, bf16])`` and the graph-aware
    ``custom_fused_ar_rms_per_group_quant(input, residual_inp, weight, eps,
    group_size=128, use_1stage=False, emit_bf16=False)``.
  - v0.1.17: ``transpose_scale=False`` on both per-group methods (scale stored
    column-major, a ``(M, groups)`` view with stride ``(1, M)``); ``gemma_norm=False``
    on ``fused_ar_rms`` / ``custom_fused_ar_rms`` (the kernel adds 1.0 to ``w``
    in float32).
  - v0.1.18 - v0.1.19.post1: the per-group methods lost ``transpose_scale``
    again (it is back in v0.1.19.post2, PR #4478).
  - v0.1.13 - v0.1.16.x launch the one-stage kernels with one block per token
    (see kernel_limits.py); v0.1.17 made them loop. The same release added
    ``gemma_norm`` and ``transpose_scale``, which is how a build is told apart.

* ``aiter/dist/communication_op.py`` (reduces over aiter's *own* TP group,
  ``aiter.dist.parallel_state.get_tp_group()``, which vLLM does not set up):

  - v0.1.14 - v0.1.16.x: ``tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group(
    input_, residual_inp_, weight_, eps, group_size=128, prefill_support=False,
    emit_bf16=False)``; before v0.1.16 ``tensor_model_parallel_fused_allreduce_rmsnorm_quant``
    is per-token only (no ``quant_type``), v0.1.16 gave it ``quant_type``
    (and ``group_size``, ``emit_bf16``; no ``transpose_scale``).
  - v0.1.17 on (the ``_per_group`` function is gone): ``tensor_model_parallel_fused_allreduce_rmsnorm_quant(input_,
    residual_inp_, weight_, eps, prefill_support=False, quant_type="per_token",
    group_size=128, emit_bf16=False, transpose_scale=False, gemma_norm=False)``;
    ``quant_type="per_group"`` selects the per-group kernel (``gemma_norm`` is
    not forwarded on that path). Its communicator (``communicator_cuda.py``)
    always passes ``transpose_scale=`` to ``custom_fused_ar_rms_per_group_quant``
    and swallows any exception into fused AR+RMSNorm + ``per_1x128`` quant: on
    v0.1.18 - v0.1.19.post1, whose method lacks the keyword, every call takes
    those two kernels.
  - ``tensor_model_parallel_fused_allreduce_rmsnorm(input_, residual_inp_,
    weight_, eps, prefill_support=False, ...)``, ``gemma_norm`` from v0.1.17.

* ``aiter/ops/quant.py``: ``get_hip_quant(QuantType.per_1x128)`` is
  ``per_group_quant_hip(x, scale=None, quant_dtype=dtypes.i8, group_size=128,
  transpose_scale=False, ...) -> (q, scale [M, K/128] float32)``. Its default
  dtype is int8, so the FP8 type is always passed. ``csrc/kernels/quant_kernels.cu``
  (``dynamic_per_group_scaled_quant_kernel``, v0.1.13 - main): scale =
  max(amax, 1e-10) * (1 / FP8_MAX), q = x * (1 / scale); with
  ``transpose_scale`` (``shuffle_scale``) an fp32 scale goes to
  ``scale[group * M + row]`` of the ``[M, K/128]``-shaped buffer: a true
  transpose, so ``scale.view(K/128, M).t()`` is the column-major ``[M, K/128]``.
* ``aiter/utility/dtypes.py``: ``fp8`` is e4m3fnuz on gfx942, e4m3fn on gfx950:
  the type aiter's fused kernels write.
* ``csrc/include/custom_all_reduce.cuh``: the kernels' variants and limits
  are in kernel_limits.py. The per-group epilogue normalizes in float32,
  scale = amax / FP8_MAX (1.0 for an all-zero group), q = y / scale from the
  float32 normed y; no Gemma mode on the per-group path; ``w`` is read as the
  input dtype whatever its real dtype (a float32 weight is misread).
* Which aiter is good enough (kernel_limits.py, limits 8 and 9): ``IPCBufferPool``
  in the custom_all_reduce module marks v0.1.12 on (vLLM checks the same
  thing as the object's ``_pool``); before it, no fused step is used. The
  two-stage race was fixed by PR #2890, first released in v0.1.14, the release
  that also brought the per-group methods (PR #2823). A build from between
  those two commits has the methods without the fix; its setuptools-scm
  version (``amd-aiter`` metadata, counted from the tag before them:
  "0.1.12.post2.devN+g...") says so, so an aiter counts as fixed only with the
  per-group methods *and* a version that is not below 0.1.14 (an unreadable
  one, or setuptools-scm's "0.1.0" for a tree without git metadata, does not
  overrule the capability; builds after the fix but before the 0.1.14 tag are
  treated as older, which only costs speed).
* ``CustomAllreduce.should_custom_ar(inp)`` (every version) says whether aiter's
  custom all-reduce takes an input; from v0.1.18 it honours
  ``AITER_CUSTOM_AR_MAX_SIZE`` (bytes; 0 = off, everything on RCCL) and
  ``AITER_CUSTOM_AR_MIN_SIZE`` (inputs at or below it on RCCL), read once in
  ``__init__`` by ``_resolve_car_max_size(pool_size)`` / ``_resolve_car_min_size()``.
  The ``fused_ar_rms*`` methods do not ask it; this backend does, before every
  fused call.
* The compiler: ``aiter/jit/core.py`` imports ``get_hip_version`` from its
  ``aiter/jit/utils/cpp_extension.py`` (as the top-level module
  ``cpp_extension``), which at import sets ``ROCM_HOME`` (``ROCM_HOME`` /
  ``ROCM_PATH``, else the ``hipcc`` on ``PATH``, else /opt/rocm) and
  ``HIP_VERSION`` (``hipconfig --version``); kernels are built by
  ``ROCM_HOME/bin/hipcc``, whose clang ``HIP_CLANG_PATH`` may replace
  (v0.1.11 - main).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import inspect
import os
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ... import platform_info
from . import kernel_limits

MODULE_CA = "aiter.dist.device_communicators.custom_all_reduce"
MODULE_CA_OLD = "aiter.dist.custom_all_reduce"  # up to v0.1.6
MODULE_COMM_OP = "aiter.dist.communication_op"
MODULE_PARALLEL_STATE = "aiter.dist.parallel_state"
MODULE_JIT_CORE = "aiter.jit.core"
POOL_CLASS = "IPCBufferPool"  # in MODULE_CA from v0.1.12
RACE_FIXED = (0, 1, 14)  # the first release with PR #2890
SCM_FALLBACK_VERSION = "0.1.0"  # aiter's pyproject: setuptools-scm's version without git metadata
MAX_SIZE_ENV, MIN_SIZE_ENV = "AITER_CUSTOM_AR_MAX_SIZE", "AITER_CUSTOM_AR_MIN_SIZE"  # v0.1.18 on

# Method and function names, per capability, best first.
CA_PER_GROUP = ("fused_ar_rms_per_group_quant", "custom_fused_ar_rms_per_group_quant")
CA_AR_RMS = ("fused_ar_rms", "custom_fused_ar_rms")
FN_QUANT = "tensor_model_parallel_fused_allreduce_rmsnorm_quant"  # quant_type= form, v0.1.17+
FN_PER_GROUP = "tensor_model_parallel_fused_allreduce_rmsnorm_quant_per_group"  # v0.1.14-v0.1.16
FN_AR_RMS = "tensor_model_parallel_fused_allreduce_rmsnorm"

ARCH_FP8 = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}


class RocmEnvironment:
    """Everything the backend learns about the machine and aiter, in one object
    that tests replace (a fake ROCm box running on CPU tensors)."""

    def hip_version(self) -> str | None:
        return torch.version.hip

    def gpu_available(self) -> bool:
        return torch.cuda.is_available()

    def device_ok(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` can reach aiter's kernels."""
        return device.type == "cuda"

    def gpu_arch(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return None
        return platform_info.gpu_arch(device.index or 0)

    def import_module(self, name: str):
        return importlib.import_module(name)

    def variable(self, name: str) -> str | None:
        """An environment variable that aiter or its toolchain reads."""
        return os.environ.get(name)

    def real_path(self, path: str) -> str:
        return os.path.realpath(path)

    def dist_version(self) -> str | None:
        for dist in ("amd-aiter", "aiter-rocm"):
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                continue
        return None


@dataclass(frozen=True)
class Entry:
    """One aiter callable and the keyword arguments it accepts."""

    owner: str  # "CustomAllreduce", "communication_op", ...
    name: str
    params: frozenset[str] | None  # None: the signature could not be read
    var_kw: bool = False

    @property
    def label(self) -> str:
        return f"{self.owner}.{self.name}"

    @property
    def graph_aware(self) -> bool:
        """The ``custom_*`` methods pick ``registered`` themselves and may return None."""
        return self.name.startswith("custom_")

    def accepts(self, keyword: str) -> bool:
        """True only when the signature shows ``keyword`` (or **kwargs): optional
        features are never passed on a guess."""
        return self.var_kw or (self.params is not None and keyword in self.params)


def entry_of(owner: str, holder: Any, name: str) -> Entry | None:
    fn = getattr(holder, name, None)
    if not callable(fn):
        return None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return Entry(owner, name, None)
    params = frozenset(
        p.name
        for p in sig.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    )
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return Entry(owner, name, params, var_kw)


def _first_entry(owner: str, holder: Any, names: tuple[str, ...]) -> Entry | None:
    for name in names:
        entry = entry_of(owner, holder, name)
        if entry is not None:
            return entry
    return None


class _Features:
    """What both API descriptions derive from their entries (``transpose_scale`` differs)."""

    per_group: Entry | None
    ar_rms: Entry | None

    @property
    def empty(self) -> bool:
        return self.per_group is None and self.ar_rms is None

    @property
    def emit_bf16(self) -> bool:
        return self.per_group is not None and self.per_group.accepts("emit_bf16")

    @property
    def gemma_norm(self) -> bool:
        return self.ar_rms is not None and self.ar_rms.accepts("gemma_norm")


@dataclass(frozen=True)
class ObjectApi(_Features):
    """What a custom all-reduce object (or its class) offers."""

    per_group: Entry | None
    ar_rms: Entry | None

    @classmethod
    def of(cls, holder: Any, owner: str = "CustomAllreduce") -> ObjectApi:
        if holder is None:
            return cls(None, None)
        return cls(_first_entry(owner, holder, CA_PER_GROUP), _first_entry(owner, holder, CA_AR_RMS))

    @property
    def transpose_scale(self) -> bool:
        return self.per_group is not None and self.per_group.accepts("transpose_scale")


@dataclass(frozen=True)
class ModuleApi(_Features):
    """What ``aiter.dist.communication_op`` offers (over aiter's own TP group)."""

    per_group: Entry | None
    per_group_form: str | None  # "quant_type" (v0.1.17+) or "per_group_fn" (v0.1.14-v0.1.16)
    ar_rms: Entry | None
    # transpose_scale reaches the kernel only if the function takes it *and*
    # CustomAllreduce's per-group method does.
    transpose_ok: bool = False
    # The function passes transpose_scale to a CustomAllreduce method without
    # it (v0.1.18 - v0.1.19.post1): the TypeError is swallowed, so every call
    # runs fused AR+RMSNorm + group quant, two kernels.
    always_two_kernels: bool = False

    @property
    def transpose_scale(self) -> bool:
        return self.transpose_ok


def release(version: str | None) -> tuple[int, int, int] | None:
    """The release series of an aiter version string: "0.1.12.post2.dev142+g4331ad7a17"
    -> (0, 1, 12), "0.1.14rc0" -> (0, 1, 14); None when unreadable or setuptools-scm's
    fallback (a build without git metadata says nothing about its release)."""
    if not version or version.strip() == SCM_FALLBACK_VERSION:
        return None
    m = re.match(r"\s*v?(\d+)\.(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


@dataclass(frozen=True)
class Toolchain:
    """The compiler aiter JIT-builds its kernels with: the ``hipcc`` of the ROCm
    install aiter's JIT found (``rocm_home``) and that install's HIP version, as
    aiter read them when it was imported. ``unknown`` says why the clang version
    cannot be told; kernel_limits then assumes clang < 20."""

    hip_version: str | None
    rocm_home: str | None = None
    unknown: str | None = None

    @property
    def compiler_hip(self) -> str | None:
        """The HIP version the kernel rules use: None when the compiler is unknown."""
        return None if self.unknown is not None else self.hip_version

    def describe(self) -> str:
        where = f"the hipcc of ROCM_HOME={self.rocm_home}" if self.rocm_home else "ROCm's hipcc"
        if self.unknown is not None:
            return f"aiter's compiler unknown ({self.unknown})"
        return f"aiter builds with {where} (HIP {self.hip_version})"


def probe_toolchain(env: RocmEnvironment) -> Toolchain:
    """Read what aiter's JIT settled on at import (no subprocess here: aiter ran
    ``hipconfig`` itself, once, and keeps the answer in its module)."""
    try:
        core = env.import_module(MODULE_JIT_CORE)
        # the module aiter.jit.core took get_hip_version from: aiter's cpp_extension,
        # already imported, so this returns that module object
        ext = env.import_module(core.get_hip_version.__module__)
    except Exception as e:  # noqa: BLE001 - unknown compiler, not an error
        return Toolchain(None, unknown=f"aiter's JIT settings not readable: {type(e).__name__}: {e}")
    hip = getattr(ext, "HIP_VERSION", None)
    home = getattr(ext, "ROCM_HOME", None)
    home = home if isinstance(home, str) else None
    if not isinstance(hip, str) or kernel_limits.hip_major(hip) is None:
        return Toolchain(None, home, unknown=f"aiter's JIT has no readable HIP_VERSION ({hip!r})")
    hip = hip.strip()
    clang = env.variable("HIP_CLANG_PATH")
    if clang and not (home and _inside(env.real_path(clang), env.real_path(home))):
        return Toolchain(hip, home, unknown=f"HIP_CLANG_PATH={clang} gives hipcc a clang from outside ROCM_HOME")
    return Toolchain(hip, home)


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


@dataclass(frozen=True)
class SizeWindow:
    """aiter's custom all-reduce size window (v0.1.18 on, from AITER_CUSTOM_AR_MAX_SIZE
    / AITER_CUSTOM_AR_MIN_SIZE): inputs of more than ``min_bytes`` and at most
    ``max_bytes`` use it; ``max_bytes`` 0 turns it off."""

    max_bytes: int
    min_bytes: int

    @classmethod
    def of(cls, ca: Any) -> SizeWindow | None:
        """The window a CustomAllreduce resolved in its ``__init__`` (``_car_max_size``,
        ``_car_min_size``), to say why it declined; None before v0.1.18."""
        high, low = getattr(ca, "_car_max_size", None), getattr(ca, "_car_min_size", None)
        if isinstance(high, int) and isinstance(low, int):
            return cls(high, low)
        return None

    def reason(self, nbytes: int) -> str | None:
        """Why aiter's custom all-reduce declines ``nbytes`` (None: it takes them)."""
        if self.max_bytes <= 0:
            return f"aiter's custom all-reduce is off ({MAX_SIZE_ENV}=0: aiter sends every all-reduce to RCCL)"
        if nbytes <= self.min_bytes:
            return f"input {nbytes} bytes <= {MIN_SIZE_ENV}={self.min_bytes}: aiter sends it to RCCL"
        if nbytes > self.max_bytes:
            return f"input {nbytes} bytes > {MAX_SIZE_ENV}={self.max_bytes}: aiter sends it to RCCL"
        return None


def size_window(probe: AiterProbe, pool_size: int) -> SizeWindow | None:
    """The window aiter's CustomAllreduce(max_size=``pool_size``) would resolve from
    the environment now, computed by aiter's own resolvers; None where this aiter
    has no such switches (before v0.1.18) or they fail."""
    if not probe.has_size_switches:
        return None
    try:
        ca_module = probe.ca_module
        return SizeWindow(int(ca_module._resolve_car_max_size(pool_size)), int(ca_module._resolve_car_min_size()))
    except Exception:  # noqa: BLE001 - doctor then says nothing about the window
        return None


def custom_ar_accepts(ca: Any, tokens: int, hidden: int, dtype: torch.dtype) -> bool | None:
    """aiter's own ``ca.should_custom_ar`` for a contiguous ``[tokens, hidden]``
    input (a meta tensor: the answer depends on the call's size and aiter's state,
    never on a caller's tensor); None where the object has no such method."""
    check = getattr(ca, "should_custom_ar", None)
    if not callable(check):
        return None
    return bool(check(torch.empty((tokens, hidden), dtype=dtype, device="meta")))


@dataclass(frozen=True)
class AiterProbe:
    """The result of importing aiter once in this process."""

    error: str | None = None  # why ``import aiter`` failed
    version: str | None = None
    ca_class: type | None = None
    class_api: ObjectApi = field(default_factory=lambda: ObjectApi(None, None))
    module_api: ModuleApi = field(default_factory=lambda: ModuleApi(None, None, None))
    parallel_state: Any = None
    group_quant: Callable | None = None
    group_quant_error: str | None = None
    group_quant_transpose: bool = False  # its signature shows transpose_scale
    fp8: torch.dtype | None = None
    notes: tuple[str, ...] = ()  # submodules that failed to import, for doctor
    ca_module: Any = None  # aiter's custom_all_reduce module (its size-switch resolvers)
    has_ipc_pool: bool = False  # IPCBufferPool: v0.1.12 on
    toolchain: Toolchain = field(default_factory=lambda: Toolchain(None, unknown="not probed"))

    @property
    def has_size_switches(self) -> bool:
        """AITER_CUSTOM_AR_MAX_SIZE / MIN_SIZE exist (their resolvers, v0.1.18 on)."""
        return callable(getattr(self.ca_module, "_resolve_car_max_size", None)) and callable(
            getattr(self.ca_module, "_resolve_car_min_size", None)
        )

    @functools.cached_property
    def no_fused(self) -> str | None:
        """Why no fused step may run on this aiter at all (<= 0.1.11, kernel_limits
        limit 9), or None."""
        if self.error is not None or self.has_per_group or self.has_ipc_pool or not self.has_ar_rms:
            return None
        return (
            f"aiter {self.version or '(unknown version)'} is older than 0.1.12 (no {POOL_CLASS}): its fused "
            "all-reduce + RMSNorm leaves its outputs unwritten for hidden sizes it has no kernel for and "
            "its two-stage kernel races; vLLM does not use it either"
        )

    @functools.cached_property
    def two_stage_race(self) -> str | None:
        """Why this aiter's two-stage kernels may corrupt output silently (kernel_limits
        limit 8: no per-group methods, or a version below 0.1.14), or None."""
        if not self.has_per_group:
            return (
                f"aiter {self.version or '(unknown version)'}'s two-stage kernels can corrupt output (a "
                "cross-rank race fixed in 0.1.14 by aiter PR #2890; no per-group kernel, so older)"
            )
        found = release(self.version)
        if found is not None and found < RACE_FIXED:
            return (
                f"aiter {self.version}'s two-stage kernels can corrupt output (a cross-rank race fixed in "
                "0.1.14 by aiter PR #2890; this build is older)"
            )
        return None

    def support(self) -> str:
        """Which of this backend's aiter support levels this aiter is at, and why (doctor)."""
        if self.error is not None or (not self.has_per_group and not self.has_ar_rms):
            return "not used (no fused API)"
        if self.no_fused is not None:
            return f"not used: {self.no_fused}"
        if self.two_stage_race is not None:
            return (
                f"one-stage kernels only: {self.two_stage_race}; calls vLLM would give a multi-stage "
                "kernel take the portable path"
            )
        return "0.1.14 or newer (two-stage race fixed): every kernel variant within its limits"

    @property
    def has_per_group(self) -> bool:
        return self.class_api.per_group is not None or self.module_api.per_group is not None

    @property
    def has_ar_rms(self) -> bool:
        return self.class_api.ar_rms is not None or self.module_api.ar_rms is not None

    @property
    def one_stage_tokens(self) -> int | None:
        """80 where the one-stage launchers take one block per token (aiter <=
        0.1.16: no ``gemma_norm``/``transpose_scale`` on CustomAllreduce yet);
        None where they loop (v0.1.17 on)."""
        api = self.class_api
        looping = (api.ar_rms is not None and api.ar_rms.accepts("gemma_norm")) or api.transpose_scale
        return None if looping else kernel_limits.ONE_STAGE_MAX_TOKENS

    def generation_name(self) -> str:
        """The API generation, named by the releases that share it (by capability)."""
        if self.error is not None or (not self.has_per_group and not self.has_ar_rms):
            return "none usable"
        if not self.has_per_group and not self.has_ipc_pool:
            return f"<= 0.1.11-like (no per-group kernel, no {POOL_CLASS})"
        if not self.has_per_group:
            return "0.1.12 - 0.1.13-like (no per-group kernel)"
        if self.one_stage_tokens is not None:
            return "0.1.14 - 0.1.16-like (one-stage kernels: one block per token)"
        if not self.class_api.transpose_scale:
            return "0.1.18 - 0.1.19.post1-like (per-group methods without transpose_scale)"
        return "0.1.17 / >= 0.1.19.post2-like"

    def generation(self) -> str:
        """One line naming what was detected (doctor prints it)."""
        if self.error is not None:
            return f"import failed: {self.error}"
        parts = [f"API generation {self.generation_name()}"]
        api = self.class_api
        if api.per_group is not None:
            opts = [o for o, ok in (("emit_bf16", api.emit_bf16), ("transpose_scale", api.transpose_scale)) if ok]
            parts.append(f"per-group: {api.per_group.label}({', '.join(opts) or 'no options'})")
        mod = self.module_api
        if mod.per_group is not None:
            form = "quant_type='per_group'" if mod.per_group_form == "quant_type" else "per-group function"
            parts.append(f"per-group: {mod.per_group.label} ({form})")
        if not self.has_per_group:
            parts.append("no per-group fused API (aiter >= 0.1.14 has one)")
        if api.ar_rms is not None:
            parts.append(f"AR+RMSNorm: {api.ar_rms.label}" + (" (gemma_norm)" if api.gemma_norm else ""))
        elif mod.ar_rms is not None:
            parts.append(f"AR+RMSNorm: {mod.ar_rms.label}" + (" (gemma_norm)" if mod.gemma_norm else ""))
        else:
            parts.append("no fused AR+RMSNorm API")
        if self.group_quant is not None:
            parts.append(
                "group quant: get_hip_quant(per_1x128)" + (" (transpose_scale)" if self.group_quant_transpose else "")
            )
        else:
            parts.append(f"no group quant ({self.group_quant_error})")
        if self.fp8 is not None:
            parts.append(f"fp8 {str(self.fp8).replace('torch.', '')}")
        return "; ".join(parts)


def _import(env: RocmEnvironment, name: str, notes: list[str]):
    try:
        return env.import_module(name)
    except Exception as e:  # noqa: BLE001 - a missing piece is a capability, not an error
        notes.append(f"{name}: {type(e).__name__}: {e}")
        return None


def probe_aiter(env: RocmEnvironment) -> AiterProbe:
    """Import aiter and detect its API. Any exception from ``import aiter`` (PyPI's
    unrelated ``aiter`` and aiter builds on non-ROCm boxes raise RuntimeError, not
    ImportError) means "unavailable", with the reason kept."""
    try:
        aiter = env.import_module("aiter")
    except BaseException as e:  # includes SystemExit from broken builds
        if isinstance(e, KeyboardInterrupt):
            raise
        return AiterProbe(error=f"{type(e).__name__}: {e}")
    notes: list[str] = []
    version = getattr(aiter, "__version__", None)
    if not isinstance(version, str):
        version = env.dist_version()

    ca_module = _import(env, MODULE_CA, notes)
    if ca_module is None:
        ca_module = _import(env, MODULE_CA_OLD, [])
        if ca_module is not None:
            notes.pop()
    ca_class = getattr(ca_module, "CustomAllreduce", None) if ca_module is not None else None
    class_api = ObjectApi.of(ca_class)

    comm_op = _import(env, MODULE_COMM_OP, notes)
    per_group, form = None, None
    if comm_op is not None:
        quant_fn = entry_of("communication_op", comm_op, FN_QUANT)
        if quant_fn is not None and quant_fn.accepts("quant_type"):
            per_group, form = quant_fn, "quant_type"
        else:
            per_group = entry_of("communication_op", comm_op, FN_PER_GROUP)
            form = "per_group_fn" if per_group is not None else None
    ar_rms_fn = entry_of("communication_op", comm_op, FN_AR_RMS) if comm_op is not None else None
    fn_transpose = per_group is not None and form == "quant_type" and per_group.accepts("transpose_scale")
    module_api = ModuleApi(
        per_group,
        form,
        ar_rms_fn,
        transpose_ok=fn_transpose and class_api.transpose_scale,
        always_two_kernels=fn_transpose and class_api.per_group is not None and not class_api.transpose_scale,
    )
    parallel_state = _import(env, MODULE_PARALLEL_STATE, notes) if not module_api.empty else None

    group_quant, gq_error, gq_transpose = None, None, False
    get_hip_quant = getattr(aiter, "get_hip_quant", None)
    per_1x128 = getattr(getattr(aiter, "QuantType", None), "per_1x128", None)
    if get_hip_quant is None or per_1x128 is None:
        gq_error = "aiter has no get_hip_quant / QuantType.per_1x128"
    else:
        try:
            group_quant = get_hip_quant(per_1x128)
        except Exception as e:  # noqa: BLE001
            gq_error = f"get_hip_quant(per_1x128) raised {type(e).__name__}: {e}"
        else:
            entry = entry_of("aiter", types.SimpleNamespace(per_1x128=group_quant), "per_1x128")
            gq_transpose = entry is not None and entry.accepts("transpose_scale")

    fp8 = getattr(getattr(aiter, "dtypes", None), "fp8", None)
    return AiterProbe(
        ca_module=ca_module,
        has_ipc_pool=ca_module is not None and hasattr(ca_module, POOL_CLASS),
        toolchain=probe_toolchain(env),
        version=version,
        ca_class=ca_class,
        class_api=class_api,
        module_api=module_api,
        parallel_state=parallel_state,
        group_quant=group_quant,
        group_quant_error=gq_error,
        group_quant_transpose=gq_transpose,
        fp8=fp8 if isinstance(fp8, torch.dtype) else None,
        notes=tuple(notes),
    )


def per_group_size_reason(group_size: int, element_size: int) -> str | None:
    """aiter's checks on group_size (``_validate_per_group_size``): whole 16-byte
    packs, a power-of-two number of them, at most one wavefront (64) per group."""
    pack = 16 // element_size
    if group_size % pack != 0:
        return f"group_size {group_size} is not a multiple of aiter's pack ({pack} elements)"
    lanes = group_size // pack
    if lanes & (lanes - 1) or lanes > 64:
        return f"group_size {group_size} needs a power-of-two number (<= 64) of {pack}-element packs"
    return None


# --- calls -----------------------------------------------------------------
# Each returns what the aiter entry returned, or None when a graph-aware entry
# declined the input. Tensor results are checked by the caller.


def _kwargs(entry: Entry, wanted: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``wanted`` minus keywords the entry does not take; ``required`` ones are
    passed regardless (aiter raising on them is a real failure)."""
    return {k: v for k, v in wanted.items() if k in required or entry.accepts(k)}


def call_object_per_group(
    entry: Entry, ca: Any, x, residual, weight, eps, *, group_size, use_1stage, registered, emit_bf16, transpose_scale
):
    fn = getattr(ca, entry.name)
    opts: dict[str, Any] = {"group_size": group_size, "use_1stage": use_1stage}
    if emit_bf16:
        opts["emit_bf16"] = True
    if transpose_scale:
        opts["transpose_scale"] = True
    if entry.graph_aware:
        return fn(x, residual, weight, eps, **_kwargs(entry, opts, ("group_size",)))
    opts["registered"] = registered
    return fn(x, residual, w=weight, eps=eps, **_kwargs(entry, opts, ("group_size",)))


def call_object_ar_rms(entry: Entry, ca: Any, x, residual, weight, eps, *, use_1stage, registered, gemma_norm):
    fn = getattr(ca, entry.name)
    opts: dict[str, Any] = {"use_1stage": use_1stage}
    if gemma_norm:
        opts["gemma_norm"] = True
    if entry.graph_aware:
        return fn(x, residual, weight, eps, **_kwargs(entry, opts, ("use_1stage",)))
    opts["registered"] = registered
    return fn(x, residual, w=weight, eps=eps, **_kwargs(entry, opts))


def _present(entry: Entry | None, what: str) -> Entry:
    """``entry``; a step is planned only where its entry exists, so None is a planning bug."""
    if entry is None:
        raise RuntimeError(f"this aiter has no {what} entry")
    return entry


def call_module_per_group(
    api: ModuleApi, comm_op: Any, x, residual, weight, eps, *, group_size, emit_bf16, transpose_scale
):
    entry = _present(api.per_group, "per-group communication_op")
    fn = getattr(comm_op, entry.name)
    opts: dict[str, Any] = {"group_size": group_size, "prefill_support": False}
    if emit_bf16:
        opts["emit_bf16"] = True
    if transpose_scale:
        opts["transpose_scale"] = True
    if api.per_group_form == "quant_type":
        opts["quant_type"] = "per_group"
        return fn(x, residual, weight, eps, **_kwargs(entry, opts, ("quant_type", "group_size")))
    return fn(x, residual, weight, eps, **_kwargs(entry, opts, ("group_size",)))


def call_module_ar_rms(api: ModuleApi, comm_op: Any, x, residual, weight, eps, *, gemma_norm):
    entry = _present(api.ar_rms, "all-reduce + RMSNorm communication_op")
    fn = getattr(comm_op, entry.name)
    opts: dict[str, Any] = {"prefill_support": False}
    if gemma_norm:
        opts["gemma_norm"] = True
    return fn(x, residual, weight, eps, **_kwargs(entry, opts))


def call_group_quant(probe: AiterProbe, x, quant_dtype, *, transpose_scale: bool):
    """``per_1x128`` quant of ``x`` -> (q, scale). With ``transpose_scale`` the
    kernel writes the scales transposed into its ``[M, K/128]`` buffer, returned
    here as the column-major view ``[M, K/128]`` with strides ``(1, M)``."""
    quant = probe.group_quant
    if quant is None:
        raise RuntimeError(probe.group_quant_error or "this aiter has no per_1x128 group quant")
    if not transpose_scale:
        return quant(x, quant_dtype=quant_dtype)
    q, scale = quant(x, quant_dtype=quant_dtype, transpose_scale=True)
    if isinstance(scale, torch.Tensor) and scale.dim() == 2 and scale.is_contiguous():
        m, groups = scale.shape
        scale = scale.view(groups, m).t()
    return q, scale
