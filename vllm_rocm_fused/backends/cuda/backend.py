"""The NVIDIA backend of the fused op: Triton kernels over torch symmetric memory.

Per call (host-side, cheap, the same on every rank): ``ineligible_reason`` rules out what
the kernels cannot do at all; ``dispatch.plan`` picks the algorithm (local / one-shot /
two-shot / split) and the path (fused-1 / fused-2 / generic) from the size and the
workspace's state. The symmetric workspace is created on the first eager call over a
group (collective; never during CUDA-graph capture), sized for VLLM_ROCM_FUSED_MAX_TOKENS;
a call captured before it exists takes the split algorithm instead.

Fallback chain: fused-1 (one kernel) -> fused-2 (fused all-reduce + add + RMSNorm, then
the group-quant kernel; or NCCL, then one add + RMSNorm + quant kernel) -> the portable
``native`` backend, which ``ops.backends`` runs when this backend is ineligible or raises.

Numerics: the symmetric-memory algorithms sum in float32 in rank order (every rank gets
the same bits, as ops/reference.py specifies). The split algorithm sums through NCCL in
x.dtype (bf16), as an unfused model's all-reduce does: h is rounded once before the
residual add. The kernels import only torch and Triton.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from ... import envs
from ...log import get_logger, log_once
from ...ops.backend_api import Backend, CallSpec, Outputs
from ...ops.comm import Communicator, ProcessGroupCommunicator
from . import dispatch
from .dispatch import LOCAL, ONE_SHOT, ONE_SHOT_LL, SPLIT, TWO_SHOT, DispatchPlan, SymmState
from .workspace import Layout, SymmWorkspace, WorkspaceSize, size_for_call

logger = get_logger("cuda")

EXTRAS_KEY = "cuda"
X_DTYPES = (torch.bfloat16, torch.float16)


class _CommState:
    """What this backend keeps on a communicator (``comm.extras["cuda"]``)."""

    def __init__(self) -> None:
        self.workspace: SymmWorkspace | None = None
        self.failed: str | None = None
        self.retired: list[SymmWorkspace] = []  # outgrown workspaces, kept for graphs that captured them
        self.pg_backend: str | None = None


def _state(comm: Communicator) -> _CommState:
    st = comm.extras.get(EXTRAS_KEY)
    if st is None:
        st = comm.extras[EXTRAS_KEY] = _CommState()
    return st


@functools.lru_cache(maxsize=None)
def _probe() -> str | None:
    if torch.version.hip is not None or torch.version.cuda is None:
        return "torch is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    try:
        pass  # whether it imports is the question
    except Exception as e:  # noqa: BLE001
        return f"Triton is not importable ({type(e).__name__}: {e})"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _elem_bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize


def wanted_size(spec: CallSpec) -> WorkspaceSize:
    """The workspace ``spec``'s communicator should have (workspace.size_for_call)."""
    return size_for_call(
        world_size=spec.world_size,
        hidden=spec.hidden,
        elem_bytes=_elem_bytes(spec.dtype),
        input_bytes=spec.input_bytes,
        max_tokens=envs.max_tokens(),
    )


def symm_state(spec: CallSpec, comm: Communicator) -> SymmState:
    """The planner's view of the communicator's workspace for this call."""
    elem = _elem_bytes(spec.dtype)
    want = wanted_size(spec)
    if comm.hypothetical:
        return _symm(want.layout(spec.world_size, max_grid=132), elem)
    st = _state(comm)
    if st.failed is not None:
        return SymmState(f"symmetric memory setup failed: {st.failed}", 0, 0)
    ws = st.workspace
    if ws is not None and want.fits_in(ws.layout):
        return _symm(ws.layout, elem)
    if spec.capturing:
        if ws is None:
            return SymmState("no symmetric workspace yet (the group's first call was under CUDA-graph capture)", 0, 0)
        return _symm(ws.layout, elem)
    # an eager call creates (or grows) the workspace before it runs
    return _symm(want.layout(spec.world_size, max_grid=1), elem)


def _symm(lay: Layout, elem: int) -> SymmState:
    return SymmState(None, lay.stage_bytes // elem, lay.out_elems, 4 * lay.ll_words // elem)


def ensure_workspace(
    comm: Communicator,
    spec: CallSpec,
    *,
    stage_bytes: int | None = None,
    with_twoshot: bool | None = None,
    ll_bytes: int | None = None,
) -> SymmWorkspace | None:
    """Create (or grow) the communicator's workspace; collective, eager only. Returns it,
    or None if setup failed (then ``failed`` holds why, on every rank alike). The keyword
    arguments replace parts of ``wanted_size(spec)`` (tests and benchmarks size it themselves)."""
    st = _state(comm)
    if st.failed is not None:
        return None
    want = wanted_size(spec)
    want = WorkspaceSize(
        stage_bytes=want.stage_bytes if stage_bytes is None else stage_bytes,
        with_twoshot=want.with_twoshot if with_twoshot is None else with_twoshot,
        ll_bytes=want.ll_bytes if ll_bytes is None else ll_bytes,
    )
    ws = st.workspace
    if ws is not None and want.fits_in(ws.layout):
        return ws
    if spec.capturing:
        return ws
    if ws is not None:
        want = want.grown_over(ws.layout)
    try:
        new = SymmWorkspace.create(
            comm.process_group,
            spec.device,
            stage_bytes=want.stage_bytes,
            with_twoshot=want.with_twoshot,
            ll_bytes=want.ll_bytes,
        )
    except Exception as e:  # noqa: BLE001 - the same on every rank (create agrees first)
        st.failed = f"{type(e).__name__}: {e}"
        log_once(
            logger,
            logging.WARNING,
            f"cuda-symm-failed:{comm.name}",
            "vllm-rocm-fused: symmetric memory setup failed on %s (%s); the CUDA backend uses "
            "NCCL + its fused norm/quant kernel there",
            comm.name,
            st.failed,
        )
        return None
    if ws is not None:
        st.retired.append(ws)
    st.workspace = new
    return new


class CudaBackend(Backend):
    name = "cuda"
    priority = 100

    def unavailable_reason(self) -> str | None:
        return _probe()

    def ineligible_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        if spec.device.type != "cuda":
            return f"x is on {spec.device.type}, not a CUDA device"
        if spec.dtype not in X_DTYPES:
            return f"x dtype {spec.dtype} is not bfloat16/float16"
        if spec.quantize and spec.quant_dtype != torch.float8_e4m3fn:
            return f"quant dtype {spec.quant_dtype} is not float8_e4m3fn (NVIDIA's FP8)"
        if spec.quantize and spec.device.index is not None and _capability(spec.device.index) < (8, 9):
            major, minor = _capability(spec.device.index)
            return f"FP8 conversion needs sm_89 or newer, this GPU is sm_{major}{minor}"
        reason = dispatch.norm_tile_reason(spec.hidden)
        if reason is not None:
            return reason
        if spec.world_size > 1:
            if spec.world_size > 8:
                return f"world size {spec.world_size} > 8 (the kernels unroll over at most 8 peers)"
            if comm is None:
                return "no communicator"
            if not comm.hypothetical:
                pg = comm.process_group
                if pg is None:
                    return "the communicator has no torch ProcessGroup"
                st = _state(comm)
                if st.pg_backend is None:
                    import torch.distributed as dist

                    st.pg_backend = str(dist.get_backend(pg)).lower()
                if "nccl" not in st.pg_backend:
                    return f"the process group's backend is {st.pg_backend}, not NCCL"
        return None

    def plan(self, spec: CallSpec, comm: Communicator | None) -> DispatchPlan:
        return dispatch.plan(
            num_tokens=spec.num_tokens,
            hidden=spec.hidden,
            elem_bytes=_elem_bytes(spec.dtype),
            world_size=spec.world_size,
            group_size=spec.group_size,
            quantize=spec.quantize,
            symm=symm_state(spec, comm) if comm is not None and spec.world_size > 1 else None,
        )

    def describe(self, spec: CallSpec, comm: Communicator | None) -> str:
        return self.plan(spec, comm).describe()

    def details(self) -> dict[str, str]:
        """Size thresholds per world size (doctor prints them, also on machines without a GPU)."""
        return dispatch_summary()

    def run(self, x, residual, weight, eps, comm, spec):
        ws = None
        if comm is not None and spec.world_size > 1 and not spec.capturing:
            ws = ensure_workspace(comm, spec)
        plan = self.plan(spec, comm)
        if ws is None and comm is not None and spec.world_size > 1:
            ws = _state(comm).workspace
        log_once(
            logger,
            logging.INFO,
            f"cuda-plan:{plan.algo}:{plan.path}",
            "vllm-rocm-fused: cuda backend, first %s call (T=%d, H=%d, TP=%d): %s",
            plan.algo,
            spec.num_tokens,
            spec.hidden,
            spec.world_size,
            plan.describe(),
        )
        outputs = execute(plan, x, residual, weight, eps, comm, spec, ws)
        return outputs, plan.path


def _collective_sum(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """Out-of-place sum of x over the group in x.dtype. A plain ProcessGroup sums with
    NCCL reduce-scatter + all-gather (no copy of x); glue communicators (vLLM's TP group)
    reduce the way their framework does, which is also what is safe in its CUDA graphs."""
    if not isinstance(comm, ProcessGroupCommunicator):
        return comm.all_reduce(x)
    import torch.distributed as dist

    pg = comm.process_group
    flat = x.reshape(-1)
    if flat.numel() % comm.world_size:
        out = flat.clone()
        dist.all_reduce(out, group=pg)
        return out.view_as(x)
    part = torch.empty(flat.numel() // comm.world_size, dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(part, flat, group=pg)
    out = torch.empty_like(flat)
    dist.all_gather_into_tensor(out, part, group=pg)
    return out.view_as(x)


def execute(
    plan: DispatchPlan,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    comm: Communicator | None,
    spec: CallSpec,
    ws: SymmWorkspace | None,
) -> Outputs:
    """Run ``plan``; returns (q, scale, residual, normed). Tests and the benchmark call it
    with forced plans; the backend's ``run`` with the dispatched one."""
    from ...kernels.add_rmsnorm_quant import add_rmsnorm_quant
    from ...kernels.group_quant import group_quant
    from ...kernels.oneshot_ar_norm_quant import oneshot_ar_norm_quant
    from ...kernels.oneshot_ll_ar_norm_quant import oneshot_ll_ar_norm_quant
    from ...kernels.twoshot_ar_norm_quant import twoshot_ar_norm_quant

    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    weight = weight.contiguous()
    # the norm kernel quantizes itself (fused-1, or a norm-only site), or leaves it to group_quant
    in_kernel = plan.fused_quant or not spec.quantize
    quantize, emit = (spec.quantize, spec.emit_bf16) if in_kernel else (False, False)

    if plan.algo in (ONE_SHOT_LL, ONE_SHOT, TWO_SHOT):
        if ws is None:
            raise ValueError(f"the {plan.algo} algorithm needs a symmetric workspace")
        kernel: Callable[..., Outputs] = {
            ONE_SHOT_LL: oneshot_ll_ar_norm_quant,
            ONE_SHOT: oneshot_ar_norm_quant,
            TWO_SHOT: twoshot_ar_norm_quant,
        }[plan.algo]
        out = kernel(
            x,
            residual,
            weight,
            eps,
            ws.peers(x.dtype),
            weight_offset=spec.weight_offset,
            group_size=spec.group_size,
            quantize=quantize,
            emit_bf16=emit,
            scale_layout=spec.scale_layout,
            quant_dtype=spec.quant_dtype,
        )
    elif plan.algo in (SPLIT, LOCAL):
        h = x
        if plan.algo == SPLIT and spec.num_tokens > 0:
            if comm is None:
                raise ValueError("the split algorithm needs a communicator")
            h = _collective_sum(comm, x)
        out = add_rmsnorm_quant(
            h,
            residual,
            weight,
            eps,
            out_dtype=x.dtype,
            weight_offset=spec.weight_offset,
            group_size=spec.group_size,
            quantize=quantize,
            emit_bf16=emit,
            scale_layout=spec.scale_layout,
            quant_dtype=spec.quant_dtype,
        )
    else:  # pragma: no cover - the planner returns one of the five
        raise ValueError(f"unknown algorithm {plan.algo!r}")
    if in_kernel:
        return out
    _, _, res, normed = out
    if normed is None:  # pragma: no cover - a norm-only launch always returns normed
        raise RuntimeError("the norm kernel returned no normed output")
    q, scale = group_quant(
        normed, group_size=spec.group_size, scale_layout=spec.scale_layout, quant_dtype=spec.quant_dtype
    )
    return q, scale, res, normed if spec.emit_bf16 else None


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 and nbytes % (1 << 20) == 0 else f"{nbytes >> 10} KiB"


def dispatch_summary() -> dict[str, str]:
    from ...kernels.launch import local_rule

    rows = {"dispatch TP=1": local_rule()}
    for w in (2, 4, 8):
        ll = dispatch.LL_MAX_BYTES[w]
        one = dispatch.ONESHOT_MAX_BYTES[w]
        two = dispatch.TWOSHOT_MAX_BYTES[w]
        quant_in = dispatch.PULL_QUANT_MIN_BYTES[w]
        text = f"LL one-shot <= {_size(ll)}, one-shot <= {_size(one)}"
        if quant_in < one:
            hiddens = "/".join(map(str, dispatch.PULL_QUANT_HIDDEN))
            text += f" (quant in the kernel from {_size(quant_in)} at hidden {hiddens}, else its own kernel)"
        if two > one:
            text += f", two-shot <= {_size(two)}"
        text += ", NCCL + fused norm/quant above"
        measured = dispatch.MEASURED_UP_TO_BYTES.get(w, 0)
        text += f" (measured up to {_size(measured)}, estimates above)" if measured else " (estimates)"
        rows[f"dispatch TP={w}"] = text
    return rows
