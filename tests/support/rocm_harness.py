"""Harness for the ROCm backend tests: a fake ROCm box (CPU tensors) with a fake
aiter of a chosen API generation, vLLM-like TP groups simulated in-process, and
the fixtures (import ``rocm`` and ``plugin_log`` into a test module to use them)."""

from __future__ import annotations

import importlib
import itertools
import logging

import pytest
import torch

from support import fake_aiter
from vllm_rocm_fused.layers.comm import VllmGroupCommunicator
from vllm_rocm_fused.log import forget_once_keys
from vllm_rocm_fused.ops import backends
from vllm_rocm_fused.ops.comm import register_communicator
from vllm_rocm_fused.ops.fused import call_fused_op
from vllm_rocm_fused.ops.reference import norm_quant_reference

_names = itertools.count()

FNUZ, FN = torch.float8_e4m3fnuz, torch.float8_e4m3fn
ARCH_FP8 = {"gfx942": FNUZ, "gfx950": FN}
PER_GROUP = "CustomAllreduce.fused_ar_rms_per_group_quant"
AR_RMS = "CustomAllreduce.fused_ar_rms"
HIP_QUANT = "per_group_quant_hip"


class Case:
    """One rank's inputs and its simulated peers: the all-reduced input is the exact
    float32 sum ``x + sum(peers)``, as aiter's kernels (and the fake) compute it."""

    def __init__(self, tokens=4, hidden=256, world_size=2, seed=0, dtype=torch.bfloat16, zero_group=True):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(tokens, hidden, generator=g).to(dtype)
        self.residual = (torch.randn(tokens, hidden, generator=g) * 2).to(dtype)
        weight = torch.randn(hidden, generator=g) * 0.3
        if zero_group:
            weight[:128] = -1.0  # Gemma (1 + w) == 0: an all-zero quant group
        self.weight = weight.to(dtype)
        self.peers = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(world_size - 1)]
        self.world_size = world_size

    @property
    def h(self) -> torch.Tensor:
        h = self.x.to(torch.float32)
        for p in self.peers:
            h = h + p.to(torch.float32)
        return h

    def group(self) -> fake_aiter.SimulatedGroup:
        return fake_aiter.SimulatedGroup(self.world_size, [p.to(torch.float32) for p in self.peers])


class SimulatedTpCommunicator(VllmGroupCommunicator):
    """vLLM's TP group whose peers are simulated in this process: they hold this rank's
    host-side state, so the ranks' agreement (ops.backends) is this rank's own answer."""

    def agree_max(self, values: list[int]) -> list[int]:
        return list(values)


class RocmHarness:
    def __init__(self, backend) -> None:
        self.backend = backend
        self.fake: fake_aiter.FakeAiter | None = None

    def use(
        self,
        generation: str,
        arch: str = "gfx950",
        hip: str | None = "7.0.51831",
        *,
        compiler_hip: str | None = None,
        jit_visible: bool = True,
    ) -> fake_aiter.FakeAiter:
        """Install fake aiter ``generation`` on a fake ``arch`` box whose torch is built
        for ROCm ``hip`` and whose aiter JIT-builds with the hipcc of ROCm ``compiler_hip``
        (default: the same)."""
        self.fake = fake_aiter.install(generation, arch, hip, compiler_hip=compiler_hip, jit_visible=jit_visible)
        self.backend.set_environment(fake_aiter.FakeRocmEnv(arch, hip))
        return self.fake

    def ca_class(self) -> type:
        """aiter's CustomAllreduce, imported the way vLLM imports it."""
        return importlib.import_module("aiter.dist.device_communicators.custom_all_reduce").CustomAllreduce

    def vllm_comm(
        self, case: Case, *, slot: str = "aiter_ar_comm", wrap: bool = True, ca=None, register: bool = True
    ) -> SimulatedTpCommunicator:
        """A communicator over a simulated vLLM TP group whose device communicator
        holds aiter's CustomAllreduce (in vLLM's wrapper, as vLLM 0.32/0.33 do)."""
        group = case.group()
        if ca is None:
            ca = self.ca_class()(group, torch.device("cpu"), max_size=8192 * 1024 * 8 * 2)
        holder = fake_aiter.VllmAiterWrapper(ca) if wrap else ca
        coordinator = fake_aiter.FakeCoordinator(group, name=f"tp:test{next(_names)}", **{slot: holder})
        comm = SimulatedTpCommunicator(coordinator)
        if register:
            register_communicator(comm)
        return comm


@pytest.fixture
def rocm():
    """The ROCm backend on a fake box. Fails the test if the backend sent any call
    real aiter would have rejected, hung or corrupted on."""
    backend = backends.get_backend("rocm")
    saved_env = backend.env
    forget_once_keys()
    backends.reset_counters()
    backends.reset_decisions()  # what the ranks agreed on and disabled is per test
    harness = RocmHarness(backend)
    yield harness
    violations = list(fake_aiter.STATE.violations)
    fake_aiter.uninstall()
    fake_aiter.STATE.violations.clear()
    backend.set_environment(saved_env)
    forget_once_keys()
    backends.reset_counters()
    backends.reset_decisions()
    assert not violations, f"the backend sent calls real aiter would not run: {violations}"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def plugin_log():
    """Records logged under the plugin's logger (vLLM's "vllm" logger may not
    propagate to the root, where caplog listens)."""
    logger = logging.getLogger("vllm.rocm_fused")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def run_op(
    comm,
    case: Case,
    *,
    arch="gfx950",
    quantize=True,
    emit_bf16=False,
    scale_layout="row",
    weight_offset=1.0,
    group_size=128,
    backend="auto",
    weight=None,
):
    """The fused torch op (as the vLLM layer calls it) on ``case`` over ``comm``."""
    return call_fused_op(
        case.x,
        case.residual,
        case.weight if weight is None else weight,
        1e-6,
        comm.name,
        group_size=group_size,
        weight_offset=weight_offset,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=ARCH_FP8[arch],
        quantize=quantize,
        backend=backend,
    )


def aiter_expected(
    case: Case, *, kernel: str, multi_stage: bool = False, weight=None, offset: float = 0.0, group_size: int = 128
):
    """What aiter's kernels compute for ``case``, from the spec (ops/reference.py)
    given aiter's roundings: the all-reduced sum rounded to x.dtype before the
    residual add (every kernel), and for the multi-stage per-group kernels the
    norm reading that rounded residual. Returns (residual, normed, y) with ``y``
    the unrounded float64 normed value the fused per-group kernel quantizes.
    ``kernel``: "ar_rms" or "per_group"."""
    w = case.weight if weight is None else weight
    h_rounded = case.h.to(case.x.dtype)
    out = norm_quant_reference(
        h_rounded, case.residual, w, 1e-6, out_dtype=case.x.dtype, weight_offset=offset, quantize=False
    )
    residual, normed = out.residual, out.normed
    s = h_rounded.double() + case.residual.double()
    if kernel == "per_group" and multi_stage:
        s = residual.double()
        normed = norm_quant_reference(
            residual, None, w, 1e-6, out_dtype=case.x.dtype, weight_offset=offset, quantize=False
        ).normed
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.double() + offset)
    return residual, normed, y


def hip_quant_expected(x: torch.Tensor, fp8: torch.dtype, group_size: int = 128):
    """``per_group_quant_hip`` (quant_kernels.cu): scale = max(amax, 1e-10) * float32(1/FP8_MAX),
    q = fp8(x * float32(1/scale))."""
    t, k = x.shape
    g = x.float().view(t, k // group_size, group_size)
    qmax = torch.finfo(fp8).max
    scale = g.abs().amax(-1).clamp(min=1e-10) * torch.tensor(1 / qmax, dtype=torch.float32)
    q = (g * (1 / scale).unsqueeze(-1)).clamp(-qmax, qmax).to(fp8).view(t, k)
    return q, scale


def last_path() -> str:
    """The one path every call since the last counter reset took."""
    counts = {p: n for p, n in backends.path_counters().items() if n}
    assert len(counts) == 1, counts
    return next(iter(counts))
