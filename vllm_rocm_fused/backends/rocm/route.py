"""Where aiter's all-reduce for a Communicator comes from ("the route").

In order:

1. vLLM's TP group (``comm.coordinator``): on ROCm with ``VLLM_ROCM_USE_AITER=1``
   (and ``VLLM_ROCM_USE_AITER_CUSTOM_AR``, on by default) vLLM's
   ``CudaCommunicator`` holds an ``AiterCustomAllreduce`` wrapper as
   ``device_communicator.aiter_ar_comm`` whose ``aiter_ca`` is aiter's
   ``CustomAllreduce`` (vLLM 0.32 and 0.33, ``vllm/distributed/device_communicators/
   aiter_custom_all_reduce.py``). Sharing it shares its IPC buffers, and vLLM's
   ``GroupCoordinator.graph_capture`` enters its ``capture()`` context, so
   graph-captured calls may use registered buffers. ``ca_comm`` is checked too,
   for a vLLM that keeps aiter's object there.
2. aiter's own TP group (``aiter.dist.parallel_state``), when a program set it up
   and it spans exactly this communicator's ranks: the module functions of
   ``aiter.dist.communication_op``. aiter's communicator picks the kernel
   variant itself, so only calls safe in either variant are sent
   (kernel_limits.module_route_reason). (Its per-group function falls back by
   itself to fused AR+RMSNorm + group quant when the fused kernel declines an
   input; such a call is still counted as the step that was asked for, except
   on the releases where it always does, whose per-group function is not used.)
3. A ``CustomAllreduce`` built here for a plain process group (the functional
   op's ``group=``), cached in ``comm.extras``. aiter wants a non-NCCL group for
   its IPC handshake: a gloo group is used as is; for an NCCL group that spans
   the whole job a gloo twin is made (every rank of the job runs the call, so
   ``new_group`` is safe); an NCCL *subgroup* cannot get one from inside an op
   call (``new_group`` needs every rank of the job), so it stays on the
   portable path. Built only on non-capturing calls.

Resolution is cached per communicator; everything it looks at is the same on
every rank, so the answer is rank-symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ...ops.comm import Communicator
from .aiter_api import AiterProbe, ModuleApi, ObjectApi, entry_of

EXTRAS_KEY = "rocm.route"
# IPC buffer of a CustomAllreduce built here: vLLM's size (AiterCustomAllreduce.MAX_SIZE),
# so a 64 MiB message (aiter's fused limit) fits its unregistered copy-in path.
OWN_MAX_SIZE = 8192 * 1024 * 8 * 2

VLLM_HINT = (
    "start vLLM with VLLM_ROCM_USE_AITER=1 (VLLM_ROCM_USE_AITER_CUSTOM_AR=1 is the default) "
    "and without --disable-custom-all-reduce"
)


@dataclass
class Route:
    kind: str  # "object" (a CustomAllreduce) or "module" (communication_op functions)
    api: ObjectApi | ModuleApi
    source: str  # for doctor and the log
    ca: Any = None  # the CustomAllreduce ("object" routes); None while pending or hypothetical
    comm_op: Any = None  # aiter.dist.communication_op ("module" routes)
    aiter_comm: Any = None  # aiter's device communicator ("module" routes): it picks the kernel variant
    pending: bool = False  # "object" route of a process group, built on the first non-capturing call
    # input bytes -> why aiter's custom all-reduce declines that size (None: it takes it);
    # filled by the backend from aiter's should_custom_ar, which depends on the size only
    declines: dict[int, str | None] = field(default_factory=dict)

    @property
    def custom_ar(self) -> Any:
        """The CustomAllreduce whose ``should_custom_ar`` gates this route's calls
        (aiter's communicator's ``ca_comm`` on "module" routes); None while pending
        or hypothetical."""
        if self.kind == "module":
            return getattr(self.aiter_comm, "ca_comm", None)
        return self.ca

    @property
    def max_bytes(self) -> int | None:
        size = getattr(self.ca, "max_size", None)
        return size if isinstance(size, int) else None

    @property
    def fully_connected(self) -> bool:
        return bool(getattr(self.ca, "fully_connected", True))

    def aiter_one_stage_settings(self) -> tuple[bool | None, int | None]:
        """aiter's communicator's one-stage override (``AITER_AR_1STAGE``) and byte
        limit (``AITER_AR_1STAGE_MAX_KB``), as it reads them ("module" routes)."""
        override = getattr(self.aiter_comm, "_ar_1stage_override", None)
        limit = getattr(self.aiter_comm, "_ar_1stage_max_kb", None)
        return (
            override if isinstance(override, bool) else None,
            limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
        )


def _unwrap(candidate: Any) -> Any:
    """vLLM's AiterCustomAllreduce wrapper -> aiter's object (``aiter_ca``, which
    returns its ``_impl``); anything else is taken as aiter's object itself."""
    for attr in ("aiter_ca", "_impl"):
        inner = getattr(candidate, attr, None)
        if inner is not None and not ObjectApi.of(inner).empty:
            return inner
    return candidate


def _comm_ranks(comm: Communicator) -> list[int] | None:
    coordinator = getattr(comm, "coordinator", None)
    if coordinator is not None:
        ranks = getattr(coordinator, "ranks", None)
        return list(ranks) if ranks is not None else None
    pg = comm.process_group
    if pg is not None and dist.is_initialized():
        try:
            return list(dist.get_process_group_ranks(pg))
        except Exception:  # noqa: BLE001
            return None
    return None


def _aiter_tp_route(probe: AiterProbe, env, comm: Communicator) -> Route | None:
    """Route 2: aiter's own TP group, if set up over exactly these ranks."""
    ps = probe.parallel_state
    if probe.module_api.empty or ps is None:
        return None
    try:
        initialized = getattr(ps, "model_parallel_is_initialized", None)
        if initialized is not None and not initialized():
            return None
        tp = ps.get_tp_group()
    except Exception:  # noqa: BLE001 - not initialized
        return None
    ranks = _comm_ranks(comm)
    if ranks is None or list(getattr(tp, "ranks", []) or []) != ranks:
        return None
    try:
        comm_op = env.import_module("aiter.dist.communication_op")
    except Exception:  # noqa: BLE001
        return None
    return Route(
        "module",
        probe.module_api,
        "aiter's own TP group (aiter.dist.communication_op)",
        comm_op=comm_op,
        aiter_comm=getattr(tp, "device_communicator", None),
    )


def _vllm_route(coordinator: Any) -> Route | str:
    dc = getattr(coordinator, "device_communicator", None)
    disabled = None
    for attr in ("aiter_ar_comm", "ca_comm"):
        candidate = getattr(dc, attr, None)
        if candidate is None:
            continue
        ca = _unwrap(candidate)
        api = ObjectApi.of(ca)
        if api.empty:
            continue  # e.g. vLLM's own CustomAllreduce
        if getattr(ca, "disabled", False):
            disabled = f"vLLM's aiter custom all-reduce (device_communicator.{attr}) is disabled for this group"
            continue
        return Route("object", api, f"vLLM TP group (device_communicator.{attr})", ca=ca)
    return disabled or f"vLLM's TP group has no aiter custom all-reduce: {VLLM_HINT}"


def resolve(comm: Communicator, probe: AiterProbe, env) -> Route | str:
    """The cached route of ``comm`` (a pending one for a plain process group whose
    CustomAllreduce is not built yet), or why there is none."""
    cached = comm.extras.get(EXTRAS_KEY)
    if cached is not None:
        return cached
    if comm.hypothetical:
        # doctor's stand-in for vLLM's TP group: assume vLLM's object, judge by the class
        if not probe.class_api.empty:
            return Route("object", probe.class_api, f"vLLM TP group's aiter custom all-reduce (needs: {VLLM_HINT})")
        return "aiter's CustomAllreduce has no fused all-reduce + RMSNorm method"
    coordinator = getattr(comm, "coordinator", None)  # vLLM's TP group (layers.comm.VllmGroupCommunicator)
    if coordinator is not None:
        vllm_route = _vllm_route(coordinator)
        if isinstance(vllm_route, str):
            vllm_route = _aiter_tp_route(probe, env, comm) or vllm_route
        comm.extras[EXTRAS_KEY] = vllm_route
        return vllm_route
    aiter_route = _aiter_tp_route(probe, env, comm)
    if aiter_route is not None:
        comm.extras[EXTRAS_KEY] = aiter_route
        return aiter_route
    reason = _own_route_reason(comm, probe)
    if reason is not None:
        comm.extras[EXTRAS_KEY] = reason
        return reason
    return Route("object", probe.class_api, "CustomAllreduce built for this process group", pending=True)


def _own_route_reason(comm: Communicator, probe: AiterProbe) -> str | None:
    pg = comm.process_group
    if pg is None:
        return "this communicator has neither a vLLM TP group nor a process group"
    if probe.ca_class is None:
        return "aiter has no CustomAllreduce class to build one for this process group"
    if probe.class_api.empty:
        return "aiter's CustomAllreduce has no fused all-reduce + RMSNorm method"
    if _is_nccl(pg) and dist.get_world_size(pg) != dist.get_world_size():
        return (
            "aiter's CustomAllreduce needs a gloo twin of this NCCL subgroup, which only a call "
            "made by every rank of the job may create; pass a gloo group or use the vLLM layer"
        )
    return None


def _is_nccl(pg) -> bool:
    try:
        return str(dist.get_backend(pg)).lower() == "nccl"
    except Exception:  # noqa: BLE001
        return False


def build_own(comm: Communicator, probe: AiterProbe, device: torch.device) -> Route | str:
    """Build (collectively, on a non-capturing call) aiter's CustomAllreduce for a
    plain process group; cache the route or the reason it failed."""
    pg = comm.process_group
    ca_class = probe.ca_class
    try:
        if ca_class is None:  # resolve() returns no pending route then
            raise RuntimeError("aiter has no CustomAllreduce class")
        group = pg
        if _is_nccl(pg):
            group = dist.new_group(ranks=dist.get_process_group_ranks(pg), backend="gloo")
        init = entry_of("CustomAllreduce", ca_class, "__init__")
        sized = init is not None and init.accepts("max_size")
        ca = ca_class(group, device, max_size=OWN_MAX_SIZE) if sized else ca_class(group, device)
    except Exception as e:  # noqa: BLE001 - any failure leaves this group on the portable path
        result: Route | str = f"building aiter's CustomAllreduce failed: {type(e).__name__}: {e}"
    else:
        if getattr(ca, "disabled", False):
            result = (
                "aiter disabled the CustomAllreduce built for this group "
                "(one rank, several nodes or an unsupported world size; see aiter's log)"
            )
        else:
            result = Route("object", ObjectApi.of(ca), "CustomAllreduce built for this process group", ca=ca)
    comm.extras[EXTRAS_KEY] = result
    return result
