"""Which of aiter's kernel variants a call lands in, and which calls aiter's
kernels would throw on, hang on or corrupt: decided on the host, before the
call, so that a predictable rejection is never sent.

Every rule names the aiter source it comes from (ROCm/aiter, file @ tag).
``pack`` is one 16-byte vector: 8 elements of bf16/fp16, the only input types
these kernels take.

The kernels (``csrc/include/custom_all_reduce.cuh``):

* AR + RMSNorm (``dispatchFusedAllReduceRMSNorm``): the one-stage kernel
  (one block per token row) when asked and ``hidden / pack <= 1024``;
  otherwise reduce-scatter + a local-load RMSNorm kernel ("two-stage").
* AR + RMSNorm + per-group quant (``dispatchFusedAllReduceRMSNormQuantPerGroup``):
  ``hidden / pack <= 1024`` or it throws ("unsupported n"); the one-stage
  kernel when asked, else the two-stage kernel up to 512 KiB, else the split
  kernels (reduce-scatter + local load).

Limits, with their sources:

1. One-stage kernels above 80 tokens. ``kMaxBlocks = 80`` sync-signal slots.
   @ v0.1.13 - v0.1.16.post6 ``allreduce_fusion_kernel_1stage_launcher``
   throws "Token number is too large" for m > 80 and
   ``allreduce_fusion_kernel_1stage_per_group_launcher`` launches ``grid(m)``,
   overrunning the 80 slots for m > 80 (a hang or corruption). From v0.1.17
   both launch ``min(m, kMaxBlocks)`` blocks and loop. vLLM never asks for the
   one-stage kernel above 80 tokens (``AiterCustomAllreduce.use_1stage_fused_ar_rms``,
   vllm/distributed/device_communicators/aiter_custom_all_reduce.py): this
   backend applies that rule on every aiter generation.
2. vLLM's one-stage choice (the same function): at most 80 tokens and 1024
   packs per row; any size at 2 ranks; below 256 KiB at 4; below 128 KiB at 8.
   Outside it vLLM measured the two-stage kernel faster.
3. Plain AR + RMSNorm two-stage: the local-load kernel needs ``hidden / pack
   >= 64`` (bf16/fp16 hidden >= 512; else "n too small") and at most four
   512-thread loops (hidden <= 16384; else "n too large"), @ v0.1.13 - main.
4. Per-group kernel: ``hidden / pack <= 1024`` (hidden <= 8192) on every path.
5. bf16 added as integers. ``csrc/include/opus/opus.hpp`` registers
   ``bf16_t`` as ``unsigned short`` when ``__clang_major__ < 20`` (ROCm < 7),
   and the per-group two-stage and split kernels add the residual with
   ``vec[v] += res[v]`` on ``bf16_t`` packs (``allreduce_fusion_kernel_2stage_per_group``,
   ``local_device_load_rmsnorm_quant_per_group_naive``, v0.1.14 - main): an
   integer add of bit patterns, i.e. a garbage residual, q and scale. fp16 is
   ``_Float16`` there (real arithmetic); the plain AR + RMSNorm kernels and the
   one-stage per-group kernel convert to float32 first. What counts is the
   compiler aiter JIT-builds its kernels with, the ``hipcc`` of the ROCm
   install it finds (``aiter/jit/utils/cpp_extension.py``), not the HIP torch
   was built against: aiter_api.Toolchain reads it, and an unknown one counts
   as clang < 20. Multi-stage per-group kernels run on bf16 only when that
   install is ROCm 7 or newer.
6. World size 2, 4 or 8 (every fused dispatch throws on others; aiter's
   ``CustomAllreduce`` accepts 6 and disables nothing).
7. Input below 64 MiB: aiter's own callers (``communicator_cuda.py``
   ``total_bytes < 8 * 1024 * 8192``) and ``should_custom_ar`` stop there.
8. The two-stage race. Up to v0.1.13.post1, ``reduce_scatter_cross_device_store``
   (the first stage of the two-stage AR + RMSNorm kernel and of the per-group
   split kernels) ends with ``end_sync<ngpus, true>``: relaxed ordering, so the
   second stage may read peers' stores before they land ("progressively
   corrupted output at per-rank volumes above ~1.2 MB", the fix's note; PR
   #2890, first released in v0.1.14). Silent corruption, no error: on such an
   aiter (aiter_api.AiterProbe.two_stage_race) only one-stage kernels are
   sent, where vLLM's rule 2 picks them; elsewhere the portable path runs.
9. Up to v0.1.11 the one-stage kernels are templates for hidden 512, 1024, 2048
   and 4096 only (other sizes silently take the two-stage kernel) and the
   second stage launches nothing for a row that is not a multiple of 1 KiB
   from 1 to 32 KiB, printing "shape error" and leaving ``out`` / ``res_out``
   unwritten; its first stage races (limit 8) too. vLLM refuses these builds
   (``AiterCustomAllreduce.supports_dynamic_hidden_dim``: no ``_pool``); so does
   this backend (aiter_api.AiterProbe.no_fused).

aiter's own communicator (``aiter.dist.communication_op``) picks the variant
itself: per-group one-stage when ``AITER_AR_1STAGE`` forces it, else when the
input is at most ``AITER_AR_1STAGE_MAX_KB`` (its ``_ar_1stage_max_kb``, in
bytes despite the name) or, unset, 128 KiB (``fused_allreduce_rmsnorm_quant_per_group``
@ v0.1.14 - main); its AR + RMSNorm byte limit changed between versions, so
calls on that route must be safe under either variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACK_BYTES = 16
ONE_STAGE_MAX_TOKENS = 80  # kMaxBlocks (limit 1, rule 2)
ONE_STAGE_MAX_PACKS = 1024  # one-stage kernels: one thread per pack, 1024 threads a block
VLLM_ONE_STAGE_BYTES = {4: 256 * 1024, 8: 128 * 1024}  # exclusive; world size 2: no cap (rule 2)
AR_RMS_MIN_PACKS = 64  # limit 3: n too small
AR_RMS_MAX_PACKS = 4 * 512  # limit 3: n too large
PER_GROUP_MAX_PACKS = 1024  # limit 4
TWO_STAGE_MAX_BYTES = 512 * 1024  # per-group two-stage vs split
FUSED_MAX_BYTES = 64 * 1024 * 1024  # limit 7, exclusive
WORLD_SIZES = (2, 4, 8)  # limit 6
AITER_COMM_ONE_STAGE_BYTES = 128 * 1024  # aiter's communicator default (per-group)
HIP_CLANG_20 = 7  # ROCm major version whose clang is 20 (opus.hpp: "enable for rocm 7.0+")

ONE_STAGE, TWO_STAGE, SPLIT = "one-stage", "two-stage", "split"


@dataclass(frozen=True)
class KernelPlan:
    """The variant a call runs and the ``use_1stage`` flag that selects it."""

    use_1stage: bool
    variant: str


def packs(hidden: int, itemsize: int) -> int:
    return hidden * itemsize // PACK_BYTES


def hip_major(hip_version: str | None) -> int | None:
    """A HIP version string ("6.4.43482-0f2d60242", "7.0.51831") -> 6, 7; None if unreadable."""
    if not hip_version:
        return None
    head = str(hip_version).strip().split(".")[0]
    return int(head) if head.isdigit() else None


def bf16_adds_as_integers(dtype: torch.dtype, compiler_hip: str | None) -> bool:
    """Limit 5: whether aiter's multi-stage per-group kernels, built by the ROCm
    whose HIP version is ``compiler_hip``, add bf16 residuals as integers. An
    unknown compiler counts as old."""
    if dtype != torch.bfloat16:
        return False
    major = hip_major(compiler_hip)
    return major is None or major < HIP_CLANG_20


def vllm_prefers_one_stage(tokens: int, hidden: int, itemsize: int, world_size: int) -> bool:
    """Rule 2 (vLLM's ``use_1stage_fused_ar_rms``)."""
    if tokens > ONE_STAGE_MAX_TOKENS or packs(hidden, itemsize) > ONE_STAGE_MAX_PACKS:
        return False
    cap = VLLM_ONE_STAGE_BYTES.get(world_size)
    return cap is None or tokens * hidden * itemsize < cap


def one_stage_fits(tokens: int, hidden: int, itemsize: int) -> bool:
    """Limit 1 (as vLLM applies it) and the one-stage block size."""
    return tokens <= ONE_STAGE_MAX_TOKENS and packs(hidden, itemsize) <= ONE_STAGE_MAX_PACKS


def _race_reason(race: str) -> str:
    return (
        f"{race}; only its one-stage kernel is used, where vLLM picks it (<= {ONE_STAGE_MAX_TOKENS} tokens, byte caps)"
    )


def ar_rms_plan(
    tokens: int, hidden: int, itemsize: int, world_size: int, *, two_stage_race: str | None = None
) -> KernelPlan | str:
    """The plain AR + RMSNorm kernel for this call, or why none can take it.
    ``two_stage_race``: why this aiter's two-stage kernel may not run (limit 8)."""
    n = packs(hidden, itemsize)
    if vllm_prefers_one_stage(tokens, hidden, itemsize, world_size):
        return KernelPlan(True, ONE_STAGE)
    if two_stage_race is not None:
        return _race_reason(two_stage_race)
    if AR_RMS_MIN_PACKS <= n <= AR_RMS_MAX_PACKS:
        return KernelPlan(False, TWO_STAGE)
    if n < AR_RMS_MIN_PACKS and one_stage_fits(tokens, hidden, itemsize):
        return KernelPlan(True, ONE_STAGE)
    if n > AR_RMS_MAX_PACKS:
        return (
            f"hidden {hidden} > {AR_RMS_MAX_PACKS * PACK_BYTES // itemsize}: aiter's AR+RMSNorm "
            f"kernel throws 'n too large'"
        )
    return (
        f"hidden {hidden} < {AR_RMS_MIN_PACKS * PACK_BYTES // itemsize}: aiter's two-stage AR+RMSNorm "
        f"throws 'n too small', and its one-stage kernel is used up to {ONE_STAGE_MAX_TOKENS} tokens"
    )


def per_group_plan(
    tokens: int,
    hidden: int,
    dtype: torch.dtype,
    world_size: int,
    compiler_hip: str | None,
    *,
    two_stage_race: str | None = None,
) -> KernelPlan | str:
    """The AR + RMSNorm + per-group quant kernel for this call, or why none may take it."""
    itemsize = dtype.itemsize
    if packs(hidden, itemsize) > PER_GROUP_MAX_PACKS:
        return (
            f"hidden {hidden} > {PER_GROUP_MAX_PACKS * PACK_BYTES // itemsize}: aiter's per-group kernel "
            f"throws 'unsupported n'"
        )
    if vllm_prefers_one_stage(tokens, hidden, itemsize, world_size):
        return KernelPlan(True, ONE_STAGE)
    if two_stage_race is not None:
        return _race_reason(two_stage_race)
    if not bf16_adds_as_integers(dtype, compiler_hip):
        nbytes = tokens * hidden * itemsize
        return KernelPlan(False, TWO_STAGE if nbytes <= TWO_STAGE_MAX_BYTES else SPLIT)
    if one_stage_fits(tokens, hidden, itemsize):
        return KernelPlan(True, ONE_STAGE)
    return (
        f"the multi-stage per-group kernels add bf16 residuals as integers when built by clang < 20 "
        f"({_compiler(compiler_hip)}), and the one-stage kernel is used up to {ONE_STAGE_MAX_TOKENS} tokens"
    )


def _compiler(compiler_hip: str | None) -> str:
    return f"aiter's hipcc is HIP {compiler_hip}" if compiler_hip else "aiter's compiler unknown"


def aiter_comm_per_group_one_stage(nbytes: int, override: bool | None, max_bytes: int | None) -> bool:
    """The variant aiter's own communicator picks for a per-group call (module route)."""
    if override is not None:
        return bool(override)
    limit = max_bytes if max_bytes is not None and max_bytes >= 0 else AITER_COMM_ONE_STAGE_BYTES
    return nbytes <= limit


def module_route_reason(
    tokens: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    per_group: bool,
    one_stage_tokens: int | None,
    compiler_hip: str | None,
    override: bool | None,
    max_bytes: int | None,
    two_stage_race: str | None = None,
) -> str | None:
    """Why aiter's own communicator (which picks the variant itself) may not get
    this call: it must be safe in whichever variant aiter picks, and per-group
    calls also in the AR + RMSNorm kernel aiter falls back to when its fused
    kernel declines."""
    itemsize = dtype.itemsize
    n = packs(hidden, itemsize)
    nbytes = tokens * hidden * itemsize
    if one_stage_tokens is not None and tokens > one_stage_tokens:
        return (
            f"{tokens} tokens > {one_stage_tokens}: this aiter's one-stage launchers take one block per "
            f"token, and its communicator may pick them"
        )
    if two_stage_race is not None and not (
        # a row the one-stage kernels take, and both of the communicator's one-stage
        # rules (AR+RMSNorm: override or 128 KiB; per-group: also its byte setting)
        n <= ONE_STAGE_MAX_PACKS
        and aiter_comm_per_group_one_stage(nbytes, override, None)
        and aiter_comm_per_group_one_stage(nbytes, override, max_bytes)
    ):
        return f"{two_stage_race}, and aiter's communicator would pick it for {nbytes} bytes"
    if not AR_RMS_MIN_PACKS <= n <= AR_RMS_MAX_PACKS:
        return (
            f"hidden {hidden}: aiter's communicator may pick the two-stage AR+RMSNorm kernel, which "
            f"takes {AR_RMS_MIN_PACKS * PACK_BYTES // itemsize}-{AR_RMS_MAX_PACKS * PACK_BYTES // itemsize}"
        )
    if not per_group:
        return None
    if n > PER_GROUP_MAX_PACKS:
        return f"hidden {hidden} > {PER_GROUP_MAX_PACKS * PACK_BYTES // itemsize} (aiter's per-group kernel)"
    one_stage = aiter_comm_per_group_one_stage(nbytes, override, max_bytes)
    if not one_stage and bf16_adds_as_integers(dtype, compiler_hip):
        return (
            f"aiter's communicator would run a multi-stage per-group kernel, which adds bf16 as "
            f"integers under clang < 20 ({_compiler(compiler_hip)})"
        )
    return None
