"""Backend registry, selection and fallback for the fused op.

A backend (``backend_api.Backend``) computes the op (all-reduce included) on some
hardware. Selection is host-side and cheap: each backend answers "why not?" as a
short reason string (None = eligible), ``auto`` takes the highest-priority eligible
one, and the portable ``native`` backend is always last.

Fast backends live in their own modules (``vllm_rocm_fused.backends.*``) and
are imported on first use; an import failure becomes their unavailability
reason. Path counters (fused-1 / fused-2 / generic) count calls as they pass
through Python: eager calls and compiled-graph calls alike, but not CUDA-graph
replays (those re-run what the capture recorded).

Every rank of a group takes the same backend for a call. The fast kernels handshake
with their peers (symmetric-memory flags, aiter's IPC signals), so a rank that leaves
a fast path alone, for the portable path's all-reduce, leaves the others waiting in
the kernel: the group hangs. Ranks therefore agree (``Communicator.agree_max``, a
few integers over the group's CPU group) on rare events only, never under graph
capture and never in steady state:

* the first call of a *call key* on a communicator (the call's facts with its token
  count rounded up to a power of two, the token bucket): every rank proposes the best
  backend it can use (eligible here, not broken here, its ``prepare`` done), and if
  the proposals differ, every rank takes the lowest one once each rank has checked it
  can run it. After that first call the ranks agree on whether it raised anywhere; if
  it did, every rank disables that backend for the key and the call is redone on the
  next agreed one (this recovers wherever no rank is left inside a handshake: every
  rank raised, or the rank that raised did so after its kernel finished, as the
  backends' output checks do; failures before the launch belong in ``prepare``);
* a backend disabled for a key on every rank at once (``disable``: the startup
  self-check's agreed verdict, or a first call that raised): that key is agreed again.

Later calls of an agreed key look the answer up: no collective, no sync. That is
enough because what makes a backend usable at a size is a function of the call's facts
and of state that changes only at these events or inside a backend's own agreed
collective (a symmetric workspace grows after every rank said it could), so ranks that
agreed once decide alike afterwards. Under capture, a key never agreed (a size vLLM
did not run eagerly first) takes the local choice, alike on every rank for the same
reason. A fast backend that raises at a later call, or under capture, cannot be left by
one rank alone: the error is raised (the process fails loudly) rather than hanging the
group. Calls without a group keep the simple rule: a fast backend that raises is
disabled for the process, logged once, and the call redone on ``native``.
"""

from __future__ import annotations

import collections
import importlib
import logging
import threading
import zlib
from dataclasses import dataclass

import torch

from .. import envs
from ..log import get_logger, log_once
from .backend_api import PATHS, Backend, CallSpec, Outputs
from .comm import Communicator
from .native import NativeBackend

logger = get_logger("backends")

# Modules that register fast backends when imported, in no particular order
# (priority decides). Missing or failing modules are reported, never raised.
FAST_BACKEND_MODULES: tuple[str, ...] = (
    "vllm_rocm_fused.backends.cuda",
    "vllm_rocm_fused.backends.rocm",
)


_backends: dict[str, Backend] = {}
_broken: dict[str, str] = {}
_import_errors: dict[str, str] = {}
_loaded = False
_lock = threading.Lock()
_path_counts: collections.Counter[str] = collections.Counter()
_backend_counts: collections.Counter[tuple[str, str]] = collections.Counter()
# (backend, call key) -> why it is not used for such calls (agreed on every rank)
_disabled: dict[tuple[str, CallKey], str] = {}
# communicator name -> (requested, call key) -> the backend its ranks agreed on
_agreed: dict[str, dict[tuple[str, CallKey], str]] = {}
# (communicator, requested, call key) agreed on and not yet run: its first run is confirmed
_unconfirmed: set[tuple[str, str, CallKey]] = set()


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under ``backend.name``."""
    if not backend.name:
        raise ValueError("backend.name must be a non-empty string")
    with _lock:
        _backends[backend.name] = backend
        _broken.pop(backend.name, None)
    return backend


def unregister_backend(name: str) -> None:
    with _lock:
        _backends.pop(name, None)
        _broken.pop(name, None)


def _load_fast_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in FAST_BACKEND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                _import_errors[module] = "not part of this build"
            else:
                _import_errors[module] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - any failure means "unavailable"
            _import_errors[module] = f"{type(e).__name__}: {e}"
    fault = envs.injected_fault()
    if fault is not None:  # tests of the self-check only (envs: never set when serving)
        from .fault_injection import FaultInjectedBackend

        register_backend(FaultInjectedBackend(fault))
        logger.warning(
            "vllm-rocm-fused: VLLM_ROCM_FUSED_FAULT_INJECT=%s: a deliberately wrong backend is registered", fault
        )


def backends() -> list[Backend]:
    """Registered backends, highest priority first (native last)."""
    _load_fast_backends()
    return sorted(_backends.values(), key=lambda b: -b.priority)


def get_backend(name: str) -> Backend:
    for backend in backends():
        if backend.name == name:
            return backend
    known = ", ".join(["auto"] + [b.name for b in backends()])
    raise ValueError(f"backend must be one of {known}; got {name!r}")


def known_backend_names() -> list[str]:
    return ["auto"] + [b.name for b in backends()]


def import_errors() -> dict[str, str]:
    _load_fast_backends()
    return dict(_import_errors)


def broken_backends() -> dict[str, str]:
    return dict(_broken)


def notify_weight_updated(weight: torch.Tensor) -> None:
    """Tell every loaded backend that ``weight`` changed in place (weight loaders call this)."""
    for backend in list(_backends.values()):
        backend.weight_updated(weight)


def reason_not_usable(backend: Backend, spec: CallSpec, comm: Communicator | None) -> str | None:
    """Why ``backend`` would not run ``spec`` now: unavailable, broken, disabled for
    this call key, or ineligible."""
    reason = backend.unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    if backend.name in _broken:
        return f"disabled after an error: {_broken[backend.name]}"
    return _reason_for_key(backend, spec, comm, call_key(spec))


def _reason_for_key(backend: Backend, spec: CallSpec, comm: Communicator | None, key: CallKey) -> str | None:
    disabled = _disabled.get((backend.name, key))
    if disabled is not None:
        return f"disabled for {bucket_text(key.bucket)}: {disabled}"
    reason = backend.ineligible_reason(spec, comm)
    if reason is not None:
        return f"ineligible: {reason}"
    return None


def explain(spec: CallSpec, comm: Communicator | None) -> list[tuple[str, str | None]]:
    """(backend name, reason it would not be used or None) for every backend, best first."""
    return [(b.name, reason_not_usable(b, spec, comm)) for b in backends()]


def _candidates(requested: str) -> list[Backend]:
    """The backends a call asking for ``requested`` may take, in order (native last)."""
    everything = backends()
    if requested == "auto":
        return everything
    wanted = get_backend(requested)
    return [wanted] + [b for b in everything if b.name == "native" and b is not wanted]


def select(requested: str, spec: CallSpec, comm: Communicator | None) -> Backend:
    """This rank's choice for ``spec``: the requested backend if usable, else (or for
    "auto") the best usable one; native is always usable. (A group's calls go through
    the ranks' agreement, ``run``.)"""
    for backend in _candidates(requested):
        if reason_not_usable(backend, spec, comm) is None:
            return backend
    return get_backend("native")


# --- call keys and what is disabled for them -----------------------------------


@dataclass(frozen=True)
class CallKey:
    """A call's facts with the token count replaced by its bucket: the unit the ranks
    agree on and the self-check disables."""

    bucket: int
    hidden: int
    dtype: torch.dtype
    device_type: str
    world_size: int
    group_size: int
    weight_offset: float
    emit_bf16: bool
    scale_layout: str
    quant_dtype: torch.dtype
    has_residual: bool
    quantize: bool


def token_bucket(num_tokens: int) -> int:
    """The smallest power of two >= num_tokens (0 for no tokens): calls in one bucket share
    the ranks' agreement and the self-check's verdict."""
    return 0 if num_tokens <= 0 else 1 << (num_tokens - 1).bit_length()


def bucket_text(bucket: int) -> str:
    """The token counts of ``bucket`` in words: "T=1", "T=2", "T=3-4", "T=129-256"."""
    if bucket <= 2:
        return f"T={bucket}"
    return f"T={bucket // 2 + 1}-{bucket}"


def call_key(spec: CallSpec) -> CallKey:
    return CallKey(
        bucket=token_bucket(spec.num_tokens),
        hidden=spec.hidden,
        dtype=spec.dtype,
        device_type=spec.device.type,
        world_size=spec.world_size,
        group_size=spec.group_size,
        weight_offset=spec.weight_offset,
        emit_bf16=spec.emit_bf16,
        scale_layout=spec.scale_layout,
        quant_dtype=spec.quant_dtype,
        has_residual=spec.has_residual,
        quantize=spec.quantize,
    )


def disable(name: str, spec: CallSpec, reason: str) -> None:
    """Stop using backend ``name`` for ``spec``'s call key (its token bucket and facts).
    Over a group, call it on every rank at the same point (the self-check does, after
    the ranks agreed on its verdict): the key is then agreed again at its next call."""
    if name == "native":
        raise ValueError("the native backend is the reference and cannot be disabled")
    key = call_key(spec)
    with _lock:
        _disabled[(name, key)] = reason
        for table in _agreed.values():
            for k in [k for k in table if k[1] == key]:
                del table[k]


def disabled_paths() -> list[tuple[str, CallKey, str]]:
    """(backend, call key, reason) of everything ``disable`` turned off, in order."""
    return [(name, key, reason) for (name, key), reason in _disabled.items()]


def reset_decisions() -> None:
    """Forget what the ranks agreed on and what was disabled (tests; a process serving
    a model never needs it)."""
    with _lock:
        _agreed.clear()
        _unconfirmed.clear()
        _disabled.clear()
        _broken.clear()


# --- the ranks' agreement ---------------------------------------------------------


def _fingerprint(candidates: list[Backend]) -> int:
    """Identifies the candidate list, so ranks whose registries differ notice it."""
    return zlib.crc32(",".join(b.name for b in candidates).encode())


def _can_take(backend: Backend, spec: CallSpec, comm: Communicator, key: CallKey) -> bool:
    """Whether this rank can run ``backend`` for the call: usable, and its host-side
    preparation (``prepare``) done. A failed preparation is logged; nothing is marked."""
    if backend.unavailable_reason() is not None or backend.name in _broken:
        return False
    if _reason_for_key(backend, spec, comm, key) is not None:
        return False
    try:
        backend.prepare(spec, comm)
    except Exception as e:  # noqa: BLE001 - this rank proposes a lower backend instead
        log_once(
            logger,
            logging.WARNING,
            f"prepare:{backend.name}:{key}",
            "vllm-rocm-fused: backend %r could not prepare a %s call on rank %d (%s: %s); the group "
            "agrees on another backend for it",
            backend.name,
            bucket_text(key.bucket),
            comm.rank,
            type(e).__name__,
            e,
        )
        return False
    return True


def _agree_on_backend(requested: str, spec: CallSpec, comm: Communicator, key: CallKey) -> int:
    """Index (in ``_candidates(requested)``) of the backend every rank takes for ``key``.
    Every rank runs the same rounds: propose the best this rank can take; equal
    proposals end it (one collective); else each rank says whether it can take the
    highest index proposed, and the ranks settle there or go one lower."""
    candidates = _candidates(requested)
    native = len(candidates) - 1
    fp = _fingerprint(candidates)
    floor = 0
    while True:
        mine = next((i for i in range(floor, native) if _can_take(candidates[i], spec, comm, key)), native)
        high, neg_low, fp_max, neg_fp_min = comm.agree_max([mine, -mine, fp, -fp])
        if fp_max != -neg_fp_min:
            log_once(
                logger,
                logging.WARNING,
                f"registry-mismatch:{comm.name}",
                "vllm-rocm-fused: the ranks of %s have different backends registered; the group uses native",
                comm.name,
            )
            return native
        if high == -neg_low:
            return high
        floor = high
        can = floor == mine or floor == native or _can_take(candidates[floor], spec, comm, key)
        (refused,) = comm.agree_max([0 if can else 1])
        if not refused:
            return floor
        floor += 1


def decide(requested: str, spec: CallSpec, comm: Communicator | None) -> Backend:
    """The backend a call of ``spec`` takes: over a group, the one its ranks agreed on
    (agreeing now, a collective, if this call key is new; see the module docstring);
    without one, this rank's choice. ``execute`` runs it."""
    return _decide(requested, spec, comm, call_key(spec))


def _decide(requested: str, spec: CallSpec, comm: Communicator | None, key: CallKey) -> Backend:
    if comm is None or spec.world_size <= 1:
        for backend in _candidates(requested):
            if backend.name not in _broken and backend.unavailable_reason() is None:
                if _reason_for_key(backend, spec, comm, key) is None:
                    return backend
        return get_backend("native")
    table = _agreed.setdefault(comm.name, {})
    candidates = _candidates(requested)
    agreed = table.get((requested, key))
    if agreed is None:
        if spec.capturing:
            log_once(
                logger,
                logging.WARNING,
                f"capture-unagreed:{comm.name}:{key}",
                "vllm-rocm-fused: the first %s call over %s came under graph capture, where the ranks "
                "cannot agree; every rank takes its own (identical) choice",
                bucket_text(key.bucket),
                comm.name,
            )
            return select(requested, spec, comm)
        try:
            index = _agree_on_backend(requested, spec, comm, key)
        except NotImplementedError as e:
            log_once(
                logger,
                logging.WARNING,
                f"cannot-agree:{comm.name}",
                "vllm-rocm-fused: %s; its calls take the portable path",
                e,
            )
            index = len(candidates) - 1
        agreed = table[(requested, key)] = candidates[index].name
        _unconfirmed.add((comm.name, requested, key))
    # From the agreed backend down, the first one usable at this size: the same walk
    # on every rank. A rank's own broken marks are left out: it cannot leave alone.
    start = next(i for i, b in enumerate(candidates) if b.name == agreed)
    for backend in candidates[start:]:
        if backend.unavailable_reason() is None and _reason_for_key(backend, spec, comm, key) is None:
            return backend
    return get_backend("native")


# --- running ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    outputs: Outputs
    backend: str
    path: str


def execute(
    requested: str,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    comm: Communicator | None,
    spec: CallSpec,
) -> Ran:
    """Decide (with the ranks, see the module docstring) and run, with the fallbacks;
    nothing counted or logged per path (``run`` does that; the self-check calls this)."""
    key = call_key(spec)
    while True:
        backend = _decide(requested, spec, comm, key)
        error: Exception | None = None
        try:
            outputs, path = backend.run(x, residual, weight, eps, comm, spec)
        except Exception as e:
            if backend.name == "native":
                raise
            error = e
        grouped = comm is not None and spec.world_size > 1
        # the first run of a fast backend the ranks agreed on confirms it (one collective)
        first = grouped and backend.name != "native" and _first_run(comm, requested, key)
        if first:
            assert comm is not None
            (failed_rank,) = comm.agree_max([comm.rank + 1 if error is not None else 0])
            if failed_rank:
                what = f"{type(error).__name__}: {error}" if error is not None else "see that rank's log"
                disable(backend.name, spec, f"raised on rank {failed_rank - 1} ({what})")
                _warn_disabled(backend.name, key, failed_rank - 1, what)
                continue
        elif error is not None and grouped:
            raise RuntimeError(
                f"vllm-rocm-fused: backend {backend.name!r} raised on rank {comm.rank if comm else 0} at a "
                f"{bucket_text(key.bucket)} call the group had agreed on; the other ranks may be inside its "
                f"collective, so this rank cannot fall back alone ({type(error).__name__}: {error})"
            ) from error
        elif error is not None:
            mark_broken(backend.name, error)
            continue
        return Ran(outputs, backend.name, path)


def _first_run(comm: Communicator | None, requested: str, key: CallKey) -> bool:
    """True once after the ranks agreed on ``key``: the call that confirms the agreement."""
    assert comm is not None
    entry = (comm.name, requested, key)
    if entry in _unconfirmed:
        _unconfirmed.discard(entry)
        return True
    return False


def _warn_disabled(name: str, key: CallKey, rank: int, what: str) -> None:
    logger.warning(
        "vllm-rocm-fused: backend %r raised at the first %s call (rank %d: %s); every rank disables it "
        "for such calls and redoes the call on the next backend",
        name,
        bucket_text(key.bucket),
        rank,
        what,
    )


def run(
    requested: str,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    comm: Communicator | None,
    spec: CallSpec,
    tag: str = "",
) -> Outputs:
    """``execute``, then count; with a ``tag`` (a model site), the first call of each
    (site, backend, path) is logged once."""
    ran = execute(requested, x, residual, weight, eps, comm, spec)
    _path_counts[ran.path] += 1
    _backend_counts[(ran.backend, ran.path)] += 1
    if tag:
        log_once(
            logger,
            logging.INFO,
            f"path:{tag}:{ran.backend}:{ran.path}",
            "vllm-rocm-fused: site %s ran %s via backend %s (first such call: %d tokens)",
            tag,
            ran.path,
            ran.backend,
            spec.num_tokens,
        )
    return ran.outputs


def mark_broken(name: str, error: BaseException) -> None:
    """Disable backend ``name`` for this process (calls without a group: nothing to agree)."""
    with _lock:
        _broken[name] = f"{type(error).__name__}: {error}"
    log_once(
        logger,
        logging.WARNING,
        f"broken:{name}",
        "vllm-rocm-fused: backend %r raised %s: %s; it is disabled for this process, the portable path takes over",
        name,
        type(error).__name__,
        error,
    )


def path_counters() -> dict[str, int]:
    """Calls per path since start (or the last reset): fused-1, fused-2, generic."""
    return {p: _path_counts.get(p, 0) for p in PATHS}


def backend_counters() -> dict[str, int]:
    return {f"{b}/{p}": n for (b, p), n in sorted(_backend_counts.items())}


def reset_counters() -> None:
    _path_counts.clear()
    _backend_counts.clear()


register_backend(NativeBackend())
