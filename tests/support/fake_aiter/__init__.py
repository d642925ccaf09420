"""A test double of aiter: the same Python API surface, one module per API
generation, computing aiter's numbers with plain torch (through the project's
reference), recording every call's arguments, and failing on demand.

Generations (each module cites the aiter file, tag and line of every signature):

  ``v0_1_11``       v0.1.11.post1: no IPCBufferPool; fixed-size one-stage templates, unwritten outputs
                    for odd rows, racing two-stage kernel (the backend must not use it at all)
  ``v0_1_13``       v0.1.12 - v0.1.13.post1: fused AR+RMSNorm only, no per-group kernel, racing
                    two-stage kernel (one-stage only)
  ``v0_1_14``       per-group methods with emit_bf16, no transpose_scale; module ``_per_group`` function
  ``v0_1_16``       v0.1.14's methods; module ``..._quant(quant_type=)`` without transpose_scale + ``_per_group``
  ``v0_1_17``       transpose_scale, gemma_norm, module ``..._quant(quant_type="per_group")``; looping one-stage
  ``v0_1_18``       v0.1.17 with transpose_scale missing on the per-group methods again;
                    AITER_CUSTOM_AR_MAX_SIZE / MIN_SIZE in should_custom_ar (also in v0_1_20)
  ``v0_1_20``       v0.1.19.post2 - v0.1.20.post1 / main (2026-08): v0.1.17's API, emit_bf16 on fused_ar_rms
  ``ancient``       no fused AR+RMSNorm API at all
  ``import_error``  ``import aiter`` raises RuntimeError

``install`` puts a meta-path finder in front of ``sys.meta_path`` that builds the
``aiter`` package tree of one generation when (and only when) it is imported, so
the backend's lazy ``importlib.import_module("aiter")`` meets it exactly as it
would meet a real aiter, import-time exceptions included.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from vllm_rocm_fused.backends.rocm.aiter_api import RocmEnvironment

from . import base
from .base import ARCH_FP8, STATE, FakeGroupCoordinator, KernelHazard, SimulatedGroup

GENERATIONS = (
    "v0_1_11",
    "v0_1_13",
    "v0_1_14",
    "v0_1_16",
    "v0_1_17",
    "v0_1_18",
    "v0_1_20",
    "ancient",
    "import_error",
)
# the generations the backend uses (a fused AR+RMSNorm API, 0.1.12 on), oldest first
USABLE = ("v0_1_13", "v0_1_14", "v0_1_16", "v0_1_17", "v0_1_18", "v0_1_20")
# the usable generations whose two-stage kernel races (the backend sends one-stage calls only)
RACING_TWO_STAGE = ("v0_1_13",)
# every generation with a fused AR+RMSNorm API, the refused one included
WITH_FUSED_API = ("v0_1_11", *USABLE)

__all__ = [
    "GENERATIONS",
    "RACING_TWO_STAGE",
    "USABLE",
    "WITH_FUSED_API",
    "FakeAiter",
    "KernelHazard",
    "FakeCoordinator",
    "FakeRocmEnv",
    "SimulatedGroup",
    "VllmAiterWrapper",
    "install",
    "uninstall",
]


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, generation: ModuleType) -> None:
        self.generation = generation
        self._tree: dict | None = None

    def tree(self) -> dict:
        if self._tree is None:
            self._tree = self.generation.modules()  # may raise: an import-time failure
        return self._tree

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "aiter" and not fullname.startswith("aiter."):
            return None
        if fullname != "aiter" and fullname not in self.tree():
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        is_pkg = fullname == "aiter" or "__path__" in self.tree()[fullname]
        return importlib.util.spec_from_loader(fullname, self, is_package=is_pkg)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        attrs = dict(self.tree()[module.__name__])
        attrs.pop("__path__", None)
        module.__dict__.update(attrs)


@dataclass
class FakeAiter:
    generation: ModuleType
    state: base.FakeState

    @property
    def version(self) -> str | None:
        return self.generation.VERSION

    @property
    def CustomAllreduce(self) -> type:
        return self.generation.CustomAllreduce

    def fail(self, name: str, error: BaseException) -> None:
        """Make the entry ``name`` (e.g. "CustomAllreduce.fused_ar_rms_per_group_quant") raise."""
        self.state.failures[name] = error

    def calls(self, name: str) -> list[base.Call]:
        return self.state.named(name)

    @property
    def violations(self) -> list[str]:
        """Calls real aiter would have rejected, hung or corrupted on."""
        return self.state.violations

    def set_tp_group(self, ranks: list[int], ca) -> None:
        """Set up aiter's own TP group (aiter.dist.parallel_state), as a program using aiter's
        distributed layer would."""
        self.state.tp_group = FakeGroupCoordinator(ranks, ca)


def _drop_aiter_modules() -> None:
    for name in [n for n in sys.modules if n == "aiter" or n.startswith("aiter.")]:
        del sys.modules[name]


def install(
    generation: str,
    arch: str = "gfx950",
    hip: str | None = "7.0.51831",
    *,
    compiler_hip: str | None = None,
    jit_visible: bool = True,
) -> FakeAiter:
    """Make ``import aiter`` (and its submodules) return ``generation``, its kernels
    JIT-built by the hipcc of ROCm ``compiler_hip`` (default: ``hip``, torch's), which
    aiter's JIT module reports unless ``jit_visible`` is False. Undo with ``uninstall``."""
    uninstall()
    gen = importlib.import_module(f"{__name__}.{generation}")
    compiler_hip = hip if compiler_hip is None else compiler_hip
    STATE.calls.clear()
    STATE.failures.clear()
    STATE.violations.clear()
    STATE.tp_group = None
    STATE.hip = compiler_hip
    STATE.jit = {"HIP_VERSION": compiler_hip, "ROCM_HOME": "/opt/rocm"} if jit_visible else None
    STATE.fp8 = ARCH_FP8.get(arch, torch.float8_e4m3fn)
    sys.meta_path.insert(0, _Finder(gen))
    return FakeAiter(gen, STATE)


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
    _drop_aiter_modules()


class FakeRocmEnv(RocmEnvironment):
    """A ROCm box whose "GPU" tensors are CPU tensors: what the backend probes,
    replaced in its one injection point (``RocmBackend.set_environment``)."""

    def __init__(self, arch: str = "gfx950", hip: str | None = "7.0.51831") -> None:
        self.arch = arch
        self.hip = hip

    def hip_version(self):
        return self.hip

    def gpu_available(self):
        return self.hip is not None

    def device_ok(self, device):
        return device.type in ("cpu", "cuda", "meta")

    def gpu_arch(self, device):
        return self.arch

    def dist_version(self):
        return None


class VllmAiterWrapper:
    """vLLM's AiterCustomAllreduce (vllm/distributed/device_communicators/
    aiter_custom_all_reduce.py, vLLM 0.32): holds aiter's object as ``aiter_ca``."""

    def __init__(self, ca) -> None:
        self._impl = ca

    @property
    def aiter_ca(self):
        return self._impl

    @property
    def disabled(self) -> bool:
        return self._impl.disabled

    def capture(self):
        return self._impl.capture()


class FakeCoordinator:
    """The parts of vLLM's GroupCoordinator the plugin reads."""

    def __init__(self, group: SimulatedGroup, *, aiter_ar_comm=None, ca_comm=None, name: str = "tp:0") -> None:
        self.group = group
        self.unique_name = name
        self.world_size = group.world_size
        self.rank_in_group = group.rank
        self.ranks = list(group.ranks)
        self.device_group = None
        self.device_communicator = type("CudaCommunicator", (), {})()
        self.device_communicator.aiter_ar_comm = aiter_ar_comm
        self.device_communicator.ca_comm = ca_comm

    def _all_reduce_out_place(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(x)
