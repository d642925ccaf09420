"""The ROCm backend: aiter's fused kernels, degrading one step at a time.

Steps, best first (``quantize=True`` sites):

1. ``fused-1``: one kernel, aiter's per-group all-reduce + add + RMSNorm + FP8
   quant (``emit_bf16`` for GDN sites, ``transpose_scale`` when the consumer
   reads column-major scales and aiter can write them; otherwise one small
   copy of the ``[T, H/128]`` scales). gfx950 only, hidden <= 8192.
2. ``fused-2``: aiter's fused all-reduce + add + RMSNorm, then aiter's
   per-1x128 quant with the FP8 type passed explicitly (and its
   ``transpose_scale`` for column-major consumers). Hidden <= 16384.
3. ``generic``: the portable path (the native backend's code).

``quantize=False`` sites (bf16 consumers: MoE router, final norm) take aiter's
fused all-reduce + add + RMSNorm alone (``fused-1``: one kernel does the whole
op), with its Gemma flag where it has one, else the portable path.

Which aiter: from 0.1.14 every step and kernel variant within aiter's limits;
0.1.12 - 0.1.13.post1 (and builds older than the race fix) only the one-stage
kernels, where vLLM's rule picks them; up to 0.1.11 none (the backend is
unavailable). Every fused call is first put to aiter's own
``CustomAllreduce.should_custom_ar`` for its size, so aiter's switches
(``AITER_CUSTOM_AR_MAX_SIZE`` / ``AITER_CUSTOM_AR_MIN_SIZE``, v0.1.18 on) turn
the fused kernels off as they turn aiter's custom all-reduce off.

Eligibility is host-side and rank-symmetric (shapes, dtype, world size, arch,
aiter's capabilities and version, the compiler aiter builds with, aiter's
custom all-reduce size window, the route, graph-capture state). Every
aiter limit known before a call is checked here (kernel_limits.py, with the
source of each rule): the kernel variant (``use_1stage``) is chosen so that a
predictable rejection, hang or corruption is never sent; a step that cannot
take a call is skipped for that call only. A step that raises anyway (an error
nobody predicted, or an output the host-side checks refuse) is not followed by
the next step on this rank alone, which would leave its peers in the step's
handshake: the error goes to the registry, which takes every rank of the group
off this backend for such calls alike and redoes the call on the portable path
(at a token bucket's first call; later it fails loudly, see ops/backends.py). A graph-aware aiter
method that declines an input (returns None) sends that call one step down
without disabling anything; inside ``capture()`` but outside a capturing
stream (vLLM's warm-up runs before each capture) those methods return zero
tensors, which are passed on as vLLM's own custom all-reduce's are.

Numerics: q, scale, residual and normed follow ops/reference.py, with these
deviations of aiter's kernels (all but the first inside the spec's
tolerances; tests/backends/rocm check each against a model of the kernel):

* Gemma weights reach the per-group kernel as ``1 + w`` rounded to the input
  dtype (logged once; see norm_weight.py);
* every kernel rounds the all-reduced sum to the input dtype before adding
  the residual; the multi-stage per-group kernels (above vLLM's one-stage
  cut) also normalize the rounded residual rather than the float32 sum;
* the fused kernel quantizes the float32 normed value (``y / scale``), and an
  all-zero group gets scale 1.0 instead of the floor (q is 0 either way);
  ``per_1x128`` (fused-2) quantizes the rounded normed value as the spec does
  but multiplies by ``1 / scale``, with ``scale = amax * (1 / FP8_MAX)``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from ...log import get_logger, log_once
from ...ops.backend_api import PATH_FUSED_1, PATH_FUSED_2, PATH_GENERIC, Backend, CallSpec
from ...ops.backends import get_backend
from ...ops.comm import Communicator
from ...ops.reference import as_col_major
from . import aiter_api
from . import kernel_limits as limits
from . import route as routes
from .aiter_api import AiterProbe, RocmEnvironment
from .norm_weight import KernelWeights

logger = get_logger("rocm")


@dataclass(frozen=True)
class Step:
    key: str  # broken-state and log key
    path: str  # what the path counters call it
    title: str


STEP_PER_GROUP = Step("per-group", PATH_FUSED_1, "aiter all-reduce + RMSNorm + group quant, one kernel")
STEP_AR_RMS_QUANT = Step("ar-rmsnorm+quant", PATH_FUSED_2, "aiter all-reduce + RMSNorm, then aiter group quant")
STEP_AR_RMS = Step("ar-rmsnorm", PATH_FUSED_1, "aiter all-reduce + RMSNorm, one kernel")
QUANT_STEPS = (STEP_PER_GROUP, STEP_AR_RMS_QUANT)
NORM_STEPS = (STEP_AR_RMS,)


@dataclass
class StepPlan:
    """The eligible steps for one call, best first, why each other one is not,
    and the aiter kernel variant each eligible step runs."""

    route: routes.Route | None
    steps: list[Step] = field(default_factory=list)
    why_not: dict[str, str] = field(default_factory=dict)  # step key (or "all") -> reason
    # step key -> the variant and use_1stage flag ("object" routes); None where
    # aiter's own communicator picks ("module" routes)
    kernels: dict[str, limits.KernelPlan | None] = field(default_factory=dict)

    def summary(self) -> str:
        return "; ".join(f"{k}: {r}" if k != "all" else r for k, r in self.why_not.items())


def _nbytes(spec: CallSpec) -> int:
    return spec.num_tokens * spec.hidden * spec.dtype.itemsize


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class RocmBackend(Backend):
    name = "rocm"
    priority = 100

    def __init__(self, env: RocmEnvironment | None = None) -> None:
        self.env = env or RocmEnvironment()
        self.weights = KernelWeights()
        self._probe: AiterProbe | None = None
        self._unavailable: tuple[str | None] | None = None  # cached: the machine does not change
        self._window: tuple[aiter_api.SizeWindow | None] | None = None  # doctor's stand-in route (cached)
        self._lock = threading.Lock()

    # --- state -------------------------------------------------------------

    def set_environment(self, env: RocmEnvironment) -> None:
        """Swap the machine/aiter probe (tests) and forget everything learned."""
        self.env = env
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._probe = None
            self._unavailable = None
            self._window = None
        self.weights.clear()

    def probe(self) -> AiterProbe:
        if self._probe is None:
            with self._lock:
                if self._probe is None:
                    self._probe = aiter_api.probe_aiter(self.env)
        return self._probe

    def weight_updated(self, weight: torch.Tensor) -> None:
        self.weights.refresh(weight)

    # --- Backend API -------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        if self._unavailable is None:
            self._unavailable = (self._unavailable_reason(),)
        return self._unavailable[0]

    def _unavailable_reason(self) -> str | None:
        hip = self.env.hip_version()
        if hip is None:
            return (
                f"torch {torch.__version__} is not a ROCm build (torch.version.hip is None); "
                "this backend runs in a ROCm vLLM image with aiter"
            )
        if not self.env.gpu_available():
            return f"no AMD GPU visible to torch (ROCm {hip})"
        probe = self.probe()
        if probe.error is not None:
            return f"aiter import failed: {probe.error}"
        if not probe.has_per_group and not probe.has_ar_rms:
            missing = f" (failed imports: {'; '.join(probe.notes)})" if probe.notes else ""
            return (
                f"aiter {probe.version or '(unknown version)'} has no fused all-reduce + RMSNorm API "
                f"(CustomAllreduce.fused_ar_rms; the per-group kernel needs aiter >= 0.1.14){missing}"
            )
        return probe.no_fused

    def ineligible_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        plan = self.plan(spec, comm)
        return None if plan.steps else plan.summary()

    def describe(self, spec: CallSpec, comm: Communicator | None) -> str:
        """E.g. "fused-2 one-stage via CustomAllreduce.fused_ar_rms + get_hip_quant(per_1x128);
        not fused-1: <why>" -- the step, aiter's kernel variant, the entry, and why
        each higher step is not taken."""
        plan = self.plan(spec, comm)
        if not plan.steps or plan.route is None:
            return f"{PATH_GENERIC}: {plan.summary()}"
        step, api = plan.steps[0], plan.route.api
        kernel = plan.kernels.get(step.key)
        variant = kernel.variant if kernel is not None else "variant picked by aiter's communicator"
        text = f"{step.path} {variant}"
        entry = self._entry_for(step, plan.route)
        if entry is not None:
            text += f" via {entry.label}"
        if step is STEP_AR_RMS_QUANT:
            text += " + get_hip_quant(per_1x128)"
        notes = []
        if spec.scale_layout == "col":
            if step is STEP_PER_GROUP and not api.transpose_scale:
                notes.append("scales transposed by a copy (no transpose_scale in this aiter)")
            elif step is STEP_AR_RMS_QUANT and not self.probe().group_quant_transpose:
                notes.append("scales transposed by a copy (per_1x128 without transpose_scale)")
        if spec.weight_offset != 0.0:
            gemma_flag = step is not STEP_PER_GROUP and api.gemma_norm and spec.weight_offset == 1.0
            folded = "(1 + w)" if spec.weight_offset == 1.0 else f"(w + {spec.weight_offset:g})"
            notes.append("gemma_norm" if gemma_flag else f"{folded} rounded to {_short(spec.dtype)}")
        if notes:
            text += f" ({', '.join(notes)})"
        steps = self._steps_for(spec)
        for s in steps[: steps.index(step)]:
            text += f"; not {s.path}: {plan.why_not.get(s.key, '?')}"
        return text

    def details(self) -> dict[str, str]:
        """What doctor prints about this backend beyond per-call reasons: the
        compiler aiter builds with and what it rules out, the aiter API
        generation and support level, aiter's custom all-reduce switches, and
        the routing rules every call goes through."""
        hip = self.env.hip_version()
        if hip is None:
            return {"aiter": "not probed (torch is not a ROCm build)"}
        probe = self.probe()
        if probe.error is not None:
            return {"ROCm": f"torch HIP {hip}", "aiter": f"import failed: {probe.error}"}
        out = {
            "ROCm": self.compiler_note(hip, probe.toolchain),
            "aiter": f"{probe.version or '(unknown version)'}: {probe.generation()}",
            "aiter support": probe.support(),
            "aiter switches": self._switches_note(probe),
            "kernel choice": (
                f"one-stage where vLLM picks it (<= {limits.ONE_STAGE_MAX_TOKENS} tokens; any size at TP=2, "
                f"< 256 KiB at TP=4, < 128 KiB at TP=8), else multi-stage; AR+RMSNorm two-stage for hidden "
                f"512-16384, per-group kernel for hidden <= 8192; inputs < 64 MiB that aiter's "
                f"CustomAllreduce.should_custom_ar takes"
            ),
        }
        if probe.notes:
            out["aiter imports that failed"] = "; ".join(probe.notes)
        return out

    @staticmethod
    def compiler_note(hip: str, toolchain: aiter_api.Toolchain) -> str:
        head = f"torch HIP {hip}; {toolchain.describe()}"
        if not limits.bf16_adds_as_integers(torch.bfloat16, toolchain.compiler_hip):
            return f"{head}: clang >= 20, every per-group kernel variant usable"
        assumed = "assumed" if toolchain.compiler_hip is None else "(ROCm < 7)"
        return (
            f"{head}: clang < 20 {assumed}, where aiter's multi-stage per-group kernels add bf16 residuals "
            f"as integers; bf16 per-group calls use its one-stage kernel (<= {limits.ONE_STAGE_MAX_TOKENS} "
            f"tokens) or fused-2"
        )

    def _switches_note(self, probe: AiterProbe) -> str:
        values = ", ".join(
            f"{name}={value}" if (value := self.env.variable(name)) is not None else f"{name} unset"
            for name in (aiter_api.MAX_SIZE_ENV, aiter_api.MIN_SIZE_ENV)
        )
        if not probe.has_size_switches:
            return (
                f"{values}: this aiter has no such switches (aiter 0.1.18 added them); every fused call "
                f"is still put to CustomAllreduce.should_custom_ar"
            )
        window = self._size_window(probe)
        if window is None:
            return f"{values}: aiter's resolvers of these switches failed; every fused call is put to should_custom_ar"
        if window.max_bytes <= 0:
            return f"{values}: aiter's custom all-reduce is off, so every call takes the portable path"
        return (
            f"{values}: aiter's custom all-reduce, and so the fused kernels, take inputs of "
            f"{window.min_bytes + 1}-{window.max_bytes} bytes (CustomAllreduce.should_custom_ar)"
        )

    def _size_window(self, probe: AiterProbe) -> aiter_api.SizeWindow | None:
        """The window of vLLM's CustomAllreduce (its buffer size), computed once by
        aiter's resolvers: doctor's stand-in route has no object to ask."""
        if self._window is None:
            self._window = (aiter_api.size_window(probe, routes.OWN_MAX_SIZE),)
        return self._window[0]

    # --- planning ----------------------------------------------------------

    @staticmethod
    def _steps_for(spec: CallSpec) -> tuple[Step, ...]:
        return QUANT_STEPS if spec.quantize else NORM_STEPS

    def plan(self, spec: CallSpec, comm: Communicator | None, *, build: bool = False) -> StepPlan:
        """Which steps may run ``spec`` (cheap, host-side). ``build``: allowed to
        build a CustomAllreduce for a plain process group (run, not capturing)."""
        reason = self._call_reason(spec, comm)
        if reason is not None or comm is None:
            return StepPlan(None, why_not={"all": reason or "no communicator"})
        probe = self.probe()
        if probe.no_fused is not None:
            return StepPlan(None, why_not={"all": probe.no_fused})
        route = routes.resolve(comm, probe, self.env)
        if isinstance(route, routes.Route) and route.pending:
            if spec.capturing:
                return StepPlan(
                    None,
                    why_not={
                        "all": "aiter's CustomAllreduce for this process group is built "
                        "on the first call outside graph capture"
                    },
                )
            if build:
                route = routes.build_own(comm, probe, spec.device)
        if isinstance(route, str):
            return StepPlan(None, why_not={"all": route})
        reason = self._route_reason(spec, route) or self._declined(spec, route, probe, comm.hypothetical)
        if reason is not None:
            return StepPlan(route, why_not={"all": reason})
        plan = StepPlan(route)
        arch = self.env.gpu_arch(spec.device)
        for step in self._steps_for(spec):
            why = self._step_reason(step, spec, route, arch, probe)
            kernel: limits.KernelPlan | None = None
            if why is None:
                chosen = self._kernel_for(step, spec, route, probe)
                if isinstance(chosen, str):
                    why = chosen
                else:
                    kernel = chosen
            if why is None:
                plan.steps.append(step)
                plan.kernels[step.key] = kernel
            else:
                plan.why_not[step.key] = why
        return plan

    def _kernel_for(
        self, step: Step, spec: CallSpec, route: routes.Route, probe: AiterProbe
    ) -> limits.KernelPlan | str | None:
        """The kernel variant ``step`` runs for ``spec`` (None: aiter's
        communicator picks it, safely for this call), or why no variant may take it."""
        per_group = step is STEP_PER_GROUP
        compiler = probe.toolchain.compiler_hip
        race = probe.two_stage_race
        if route.kind == "module":
            override, max_bytes = route.aiter_one_stage_settings()
            return limits.module_route_reason(
                spec.num_tokens,
                spec.hidden,
                spec.dtype,
                per_group=per_group,
                one_stage_tokens=probe.one_stage_tokens,
                compiler_hip=compiler,
                override=override,
                max_bytes=max_bytes,
                two_stage_race=race,
            )
        if per_group:
            return limits.per_group_plan(
                spec.num_tokens, spec.hidden, spec.dtype, spec.world_size, compiler, two_stage_race=race
            )
        return limits.ar_rms_plan(
            spec.num_tokens, spec.hidden, spec.dtype.itemsize, spec.world_size, two_stage_race=race
        )

    def _call_reason(self, spec: CallSpec, comm: Communicator | None) -> str | None:
        if comm is None or spec.world_size <= 1:
            return "no all-reduce (one rank): aiter's fused kernels are all-reduce kernels"
        if not self.env.device_ok(spec.device):
            return f"tensors on {spec.device}, not a ROCm GPU"
        if spec.world_size not in limits.WORLD_SIZES:
            return f"world size {spec.world_size}: aiter's fused kernels take 2, 4 or 8 ranks"
        if spec.dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {_short(spec.dtype)}: aiter's fused kernels take bfloat16/float16"
        if spec.num_tokens == 0:
            return "no tokens"
        if not spec.has_residual:
            return "no residual: aiter's fused kernels add one"
        if (spec.hidden * spec.dtype.itemsize) % limits.PACK_BYTES:
            return f"hidden {spec.hidden} is not a whole number of 16-byte packs"
        nbytes = _nbytes(spec)
        if nbytes >= limits.FUSED_MAX_BYTES:
            return f"input {nbytes >> 20} MiB >= 64 MiB, aiter's fused-path limit"
        arch = self.env.gpu_arch(spec.device)
        arch_fp8 = aiter_api.ARCH_FP8.get(arch or "")
        if arch_fp8 is None:
            return f"GPU arch {arch}: this backend uses aiter's fused kernels on gfx942 and gfx950 only"
        if spec.quantize:
            probe = self.probe()
            if probe.fp8 is not None and probe.fp8 != arch_fp8:
                return f"aiter's FP8 type is {_short(probe.fp8)}, {arch}'s is {_short(arch_fp8)}"
            if spec.quant_dtype != arch_fp8:
                return (
                    f"quant dtype {_short(spec.quant_dtype)} is not {arch}'s FP8 ({_short(arch_fp8)}), "
                    "the only type aiter's kernels write"
                )
        return None

    @staticmethod
    def _route_reason(spec: CallSpec, route: routes.Route) -> str | None:
        max_bytes = route.max_bytes
        if max_bytes is not None and _nbytes(spec) > max_bytes:
            return f"input {_nbytes(spec)} bytes > the custom all-reduce's {max_bytes}-byte buffer"
        if spec.world_size > 2 and not route.fully_connected:
            return "aiter's custom all-reduce is not fully connected on this node"
        return None

    def _declined(self, spec: CallSpec, route: routes.Route, probe: AiterProbe, hypothetical: bool) -> str | None:
        """Why aiter's custom all-reduce would not take this call itself: its own
        ``should_custom_ar`` (aiter's switches included), asked once per input size
        and route with a contiguous stand-in of the call's shape. Its answer depends
        on the size and on state aiter fixed at construction (disabled, world size,
        fully connected, buffer size and, from v0.1.18, AITER_CUSTOM_AR_MAX_SIZE /
        MIN_SIZE), which is the same on every rank when every rank has the same
        environment, as vLLM's workers do. It looks at no registration or capture
        state. Doctor's stand-in route has no object: it uses the window aiter's
        resolvers give for vLLM's buffer size."""
        nbytes = _nbytes(spec)
        if nbytes in route.declines:
            return route.declines[nbytes]
        ca = route.custom_ar
        reason: str | None
        if ca is None:
            if not hypothetical:
                return None  # pending: asked once the object is built
            window = self._size_window(probe)
            reason = window.reason(nbytes) if window is not None else None
        else:
            try:
                accepts = aiter_api.custom_ar_accepts(ca, spec.num_tokens, spec.hidden, spec.dtype)
            except Exception as e:  # noqa: BLE001 - an unanswerable gate keeps the kernels off
                reason = f"CustomAllreduce.should_custom_ar raised {type(e).__name__}: {e}"
            else:
                reason = None if accepts is not False else self._decline_note(ca, nbytes)
        route.declines[nbytes] = reason
        return reason

    @staticmethod
    def _decline_note(ca, nbytes: int) -> str:
        window = aiter_api.SizeWindow.of(ca)
        why = window.reason(nbytes) if window is not None else None
        return why or f"aiter's custom all-reduce declines a {nbytes}-byte input (CustomAllreduce.should_custom_ar)"

    def _step_reason(
        self, step: Step, spec: CallSpec, route: routes.Route, arch: str | None, probe: AiterProbe
    ) -> str | None:
        api = route.api
        version = probe.version or "(unknown version)"
        if step is STEP_PER_GROUP:
            if api.per_group is None:
                return f"aiter {version} has no per-group fused API for this route (added in aiter 0.1.14)"
            if isinstance(api, aiter_api.ModuleApi) and api.always_two_kernels:
                return (
                    f"aiter {version}'s communication_op passes transpose_scale to a CustomAllreduce method "
                    "without it and so always runs two kernels; fused-2 runs them itself"
                )
            if arch != "gfx950":
                return f"the one-kernel per-group dispatch is used on gfx950 (MI355) only; this GPU is {arch}"
            reason = aiter_api.per_group_size_reason(spec.group_size, spec.dtype.itemsize)
            if reason is not None:
                return reason
            if spec.emit_bf16 and not api.emit_bf16:
                return f"{api.per_group.label} cannot also emit the bf16 activation (no emit_bf16)"
            return None
        if api.ar_rms is None:
            return f"aiter {version} has no fused all-reduce + RMSNorm API for this route"
        if step is STEP_AR_RMS_QUANT:
            if probe.group_quant is None:
                return probe.group_quant_error or "aiter has no group quant"
            if spec.group_size != 128:
                return f"group_size {spec.group_size}: aiter's per_1x128 quant takes 128"
        return None

    @staticmethod
    def _entry_for(step: Step, route: routes.Route | None):
        if route is None:
            return None
        return route.api.per_group if step is STEP_PER_GROUP else route.api.ar_rms

    # --- running -----------------------------------------------------------

    def run(self, x, residual, weight, eps, comm, spec):
        plan = self.plan(spec, comm, build=True)
        x = x.contiguous()
        residual = residual.contiguous() if residual is not None else None
        route = plan.route
        for i, step in enumerate(plan.steps):
            assert route is not None  # a plan with steps has its route
            fallback = plan.steps[i + 1].path if i + 1 < len(plan.steps) else PATH_GENERIC
            # A step that raises is not left for the next one here: this rank going one
            # step down alone would leave its peers in the step's handshake. The error
            # goes to the registry, which takes every rank of the group off this backend
            # for such calls alike (ops/backends.py), or fails loudly.
            out = self._run_step(step, route, plan.kernels.get(step.key), x, residual, weight, eps, spec)
            if out is None:
                log_once(
                    logger,
                    logging.INFO,
                    f"rocm-declined:{step.key}",
                    "vllm-rocm-fused: aiter declined %s for a %s input; that call used %s",
                    step.path,
                    tuple(x.shape),
                    fallback,
                )
                continue
            log_once(
                logger,
                logging.INFO,
                f"rocm-path:{step.key}:{route.source}",
                "vllm-rocm-fused: rocm backend runs %s (%s) via %s, aiter %s",
                step.path,
                step.title,
                route.source,
                self.probe().version,
            )
            return out, step.path
        outputs, _ = get_backend("native").run(x, residual, weight, eps, comm, spec)
        return outputs, PATH_GENERIC

    @staticmethod
    def _registered(ca, spec: CallSpec) -> bool:
        """Registered (zero-copy) inputs only while vLLM's graph capture holds the
        object's capture() context, which registers them at its end; everywhere
        else aiter copies the input into its own IPC buffer."""
        return (
            spec.capturing
            and bool(getattr(ca, "_IS_CAPTURING", False))
            and bool(getattr(ca, "enable_register_for_capturing", True))
        )

    def _kernel_weight(self, weight: torch.Tensor, offset: float, dtype: torch.dtype) -> torch.Tensor:
        if offset != 0.0:
            log_once(
                logger,
                logging.INFO,
                "rocm-gemma-weight",
                "vllm-rocm-fused: aiter's kernels read the norm weight in %s and the per-group one has "
                "no Gemma mode, so norms with weight_offset=%g get (w + %g) rounded to %s, once per "
                "layer weight (the reference keeps it in float32: at most one extra rounding of the "
                "normed value)",
                _short(dtype),
                offset,
                offset,
                _short(dtype),
            )
        return self.weights.get(weight, offset, dtype)

    def _run_step(self, step, route, kernel: limits.KernelPlan | None, x, residual, weight, eps, spec):
        one_stage = kernel is not None and kernel.use_1stage
        api = route.api
        if step is STEP_PER_GROUP:
            w = self._kernel_weight(weight, spec.weight_offset, x.dtype)
            transpose = spec.scale_layout == "col" and api.transpose_scale
            if route.kind == "module":
                res = aiter_api.call_module_per_group(
                    api,
                    route.comm_op,
                    x,
                    residual,
                    w,
                    eps,
                    group_size=spec.group_size,
                    emit_bf16=spec.emit_bf16,
                    transpose_scale=transpose,
                )
            else:
                res = aiter_api.call_object_per_group(
                    api.per_group,
                    route.ca,
                    x,
                    residual,
                    w,
                    eps,
                    group_size=spec.group_size,
                    use_1stage=one_stage,
                    registered=self._registered(route.ca, spec),
                    emit_bf16=spec.emit_bf16,
                    transpose_scale=transpose,
                )
            if res is None:
                return None
            _expect(len(res) == (4 if spec.emit_bf16 else 3), f"{len(res)} outputs from the per-group kernel")
            q, res_out, scale = res[0], res[1], res[2]
            normed = res[3] if spec.emit_bf16 else None
            q, scale = _check_quant(q, scale, spec)
            _check_like_x(res_out, spec, "residual")
            if normed is not None:
                _check_like_x(normed, spec, "bf16 output")
            return q, scale, res_out, normed

        gemma = spec.weight_offset == 1.0 and api.gemma_norm
        if gemma:
            w = self.weights.get(weight, 0.0, x.dtype)
        else:
            w = self.weights.get(weight, spec.weight_offset, x.dtype)
        if route.kind == "module":
            res = aiter_api.call_module_ar_rms(api, route.comm_op, x, residual, w, eps, gemma_norm=gemma)
        else:
            res = aiter_api.call_object_ar_rms(
                api.ar_rms,
                route.ca,
                x,
                residual,
                w,
                eps,
                use_1stage=one_stage,
                registered=self._registered(route.ca, spec),
                gemma_norm=gemma,
            )
        if res is None:
            return None
        normed, res_out = res[0], res[1]
        _check_like_x(normed, spec, "normed output")
        _check_like_x(res_out, spec, "residual")
        if step is STEP_AR_RMS:
            return None, None, res_out, normed
        probe = self.probe()
        transpose = spec.scale_layout == "col" and probe.group_quant_transpose
        q, scale = aiter_api.call_group_quant(probe, normed, spec.quant_dtype, transpose_scale=transpose)
        q, scale = _check_quant(q, scale, spec)
        return q, scale, res_out, normed if spec.emit_bf16 else None


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"aiter returned an unexpected result: {what}")


def _check_like_x(t, spec: CallSpec, what: str) -> None:
    _expect(
        isinstance(t, torch.Tensor) and tuple(t.shape) == (spec.num_tokens, spec.hidden) and t.dtype == spec.dtype,
        f"{what} {getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}",
    )


def _check_quant(q, scale, spec: CallSpec):
    """Host-side metadata checks (no sync): a wrong FP8 type or scale shape would
    silently change numerics downstream, so it disables the step instead.
    Returns (q, scale) with scale in the requested layout."""
    tokens, groups = spec.num_tokens, spec.hidden // spec.group_size
    _expect(
        isinstance(q, torch.Tensor) and q.dtype == spec.quant_dtype and tuple(q.shape) == (tokens, spec.hidden),
        f"q {getattr(q, 'dtype', q)} {getattr(q, 'shape', '')}, wanted {spec.quant_dtype}",
    )
    _expect(
        isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and tuple(scale.shape) == (tokens, groups),
        f"scale {getattr(scale, 'dtype', scale)} {getattr(scale, 'shape', '')}, wanted float32 {(tokens, groups)}",
    )
    if spec.scale_layout == "col":
        if scale.stride() != (1, tokens):
            scale = as_col_major(scale)
    elif not scale.is_contiguous():
        scale = scale.contiguous()
    return q, scale
