"""Backend registry, selection and fallback for the fused op.

A backend (``backend_api.Backend``) computes the op (all-reduce included) on some
hardware. Selection is host-side and cheap: each backend answers "why not?" as a
short reason string (None = eligible), ``auto`` takes the highest-priority eligible
one, and the portable ``native`` backend is always last. A fast backend that raises
is marked broken for the process, logged once, and the call is redone on ``native``,
so a failing fast kernel never fails a request.

Fast backends live in their own modules (``vllm_rocm_fused.backends.*``) and
are imported on first use; an import failure becomes their unavailability
reason. Path counters (fused-1 / fused-2 / generic) count calls as they pass
through Python: eager calls and compiled-graph calls alike, but not CUDA-graph
replays (those re-run what the capture recorded).
"""

from __future__ import annotations

import collections
import importlib
import logging
import threading

import torch

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
    """Why ``backend`` would not run ``spec`` now: unavailable, broken or ineligible."""
    reason = backend.unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    if backend.name in _broken:
        return f"disabled after an error: {_broken[backend.name]}"
    reason = backend.ineligible_reason(spec, comm)
    if reason is not None:
        return f"ineligible: {reason}"
    return None


def explain(spec: CallSpec, comm: Communicator | None) -> list[tuple[str, str | None]]:
    """(backend name, reason it would not be used or None) for every backend, best first."""
    return [(b.name, reason_not_usable(b, spec, comm)) for b in backends()]


def select(requested: str, spec: CallSpec, comm: Communicator | None) -> Backend:
    """The backend that runs ``spec``: the requested one if usable, else (or for
    "auto") the best usable one; native is always usable."""
    candidates = backends()
    if requested != "auto":
        wanted = get_backend(requested)
        if reason_not_usable(wanted, spec, comm) is None:
            return wanted
        candidates = [b for b in candidates if b.name == "native"]
    for backend in candidates:
        if reason_not_usable(backend, spec, comm) is None:
            return backend
    return get_backend("native")


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
    """Select, run, count; on an exception from a fast backend, mark it broken and
    redo the call on native. With a ``tag`` (a model site), the first call of each
    (site, backend, path) is logged once."""
    backend = select(requested, spec, comm)
    try:
        outputs, path = backend.run(x, residual, weight, eps, comm, spec)
    except Exception as e:
        if backend.name == "native":
            raise
        mark_broken(backend.name, e)
        backend = get_backend("native")
        outputs, path = backend.run(x, residual, weight, eps, comm, spec)
    _path_counts[path] += 1
    _backend_counts[(backend.name, path)] += 1
    if tag:
        log_once(
            logger,
            logging.INFO,
            f"path:{tag}:{backend.name}:{path}",
            "vllm-rocm-fused: site %s ran %s via backend %s (first such call: %d tokens)",
            tag,
            path,
            backend.name,
            spec.num_tokens,
        )
    return outputs


def mark_broken(name: str, error: BaseException) -> None:
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
