"""Which algorithm and path the CUDA backend takes for a call: a pure function of
host-side facts (the CallSpec and the workspace's state), identical on every rank.

Algorithms:
  local     no group (TP=1): one fused add + RMSNorm + group-quant kernel;
  one-shot-ll  every rank writes its input, flag in each word, into every peer's buffer,
            and sums what it receives, in one fused kernel (lowest latency, 2x the bytes);
  one-shot  every rank reads all peers' inputs (symmetric memory) in one fused kernel;
  two-shot  reduce-scatter, norm + quant of the owned rows, all-gather, in one kernel;
  split     the communicator's all-reduce (NCCL), then one fused add + RMSNorm + quant
            kernel: the bandwidth-optimal choice for large inputs.
Paths (ops.backends): fused-1 = one kernel does everything; fused-2 = two steps (fused
all-reduce + add + RMSNorm kernel then the group-quant kernel, or the split algorithm);
generic = the split algorithm with separate norm and quant kernels (only when the
row does not fit the fused tile).

The size thresholds come from graph-replayed measurements on an H200 pair
(benchmarks/results/h200_tp2.json, BENCHMARKS.md); world sizes 4 and 8 are not measured
yet and use estimates marked as such.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...kernels.launch import MAX_TILE, norm_tile, tile_reason

LOCAL, ONE_SHOT_LL, ONE_SHOT, TWO_SHOT, SPLIT = "local", "one-shot-ll", "one-shot", "two-shot", "split"

WORLD_SIZES = (2, 3, 4, 5, 6, 7, 8)

# Largest input (T * H * element bytes) that goes through the LL one-shot kernel, then the
# pull one-shot kernel; larger inputs use two-shot up to TWOSHOT_MAX_BYTES, then the split
# algorithm (NCCL + one fused kernel).
#
# TP=2, measured on the H200 pair (benchmarks/results/h200_tp2.json: hidden 2048, 4096,
# 5120 x 1-8192 tokens, graph replays; BENCHMARKS.md):
# * up to 1 MiB (T <= 128 at hidden 4096) the LL fused-1 kernel is the fastest variant
#   (within noise of the pull kernels at the few sizes where it is not);
# * above, the pull one-shot (quant placed as PULL_QUANT_MIN_BYTES says) is the fastest
#   at every measured size up to 8192 x 5120 (80 MiB): 4-28% under the best split-3 chain
#   (NCCL, torch symm_mem, our one-shots), and under NCCL + one fused kernel and two-shot;
#   so the pull one-shot takes every input up to 80 MiB and NCCL nothing.
# TP=3-8: estimates (one-shot reads (W-1)x the input over NVLink), pending measurements.
LL_MAX_BYTES: dict[int, int] = {
    2: 1 << 20,
    3: 512 << 10,
    4: 256 << 10,
    5: 256 << 10,
    6: 128 << 10,
    7: 128 << 10,
    8: 128 << 10,
}
ONESHOT_MAX_BYTES: dict[int, int] = {
    2: 80 << 20,
    3: 4 << 20,
    4: 2 << 20,
    5: 1 << 20,
    6: 1 << 20,
    7: 512 << 10,
    8: 512 << 10,
}
# The pull one-shot kernel also quantizes (fused-1) for inputs of at least this many bytes
# at the hidden sizes where that was measured to win (PULL_QUANT_HIDDEN); otherwise the
# group-quant kernel follows it (fused-2). The fused kernels give each program (at most one
# per SM, so that all are co-resident for the barrier) one row at a time, and the quant
# lengthens that serial per-row tail. Measured at TP=2 (16 warps for a 4096-element row,
# launch.RowTile.quant_num_warps): hidden 4096 in-kernel quant loses at 2 MiB (256 tokens:
# 22.5 against 16.7 us) and wins from 4 MiB (512 tokens: 24.4 against 25.3; 8192 tokens:
# 253.3 against 283.1); hidden 2048 draws level from 1 MiB (12.8 / 13.0) and wins from 2 MiB.
# Below the LL limit the LL kernel takes the call anyway. The reason is not world-size
# specific, so TP 3-8 use the same rule (unmeasured).
PULL_QUANT_MIN_BYTES: dict[int, int] = {w: 4 << 20 for w in WORLD_SIZES}
# Hidden 5120 lost at every size in that run (8192 tokens: 585 against 397 us), with its 40
# groups padded to a 64-group register tile. The kernels hold it unpadded (row_math.py:
# 32 + 8 groups), and no TP>=2 run has measured the in-kernel quant that way at hidden sizes
# other than these two, so elsewhere the quant keeps its own kernel.
PULL_QUANT_HIDDEN: tuple[int, ...] = (2048, 4096)
# Two-shot is not dispatched at any world size: at TP=2 it lost to the one-shot at every
# measured size (it moves ~5 bytes per element against the one-shot's 2 (W - 1) and pays two
# handshakes); TP 4/8, where it should win for large inputs, are not measured yet. It passes
# the GPU tests (forced plans, back to back at uneven token counts).
TWOSHOT_MAX_BYTES: dict[int, int] = {w: 0 for w in WORLD_SIZES}
# Up to which input size each world size's choices rest on measurements (0 = none).
MEASURED_UP_TO_BYTES: dict[int, int] = {2: 80 << 20}


def ll_max_bytes(world_size: int) -> int:
    return LL_MAX_BYTES.get(world_size, 0)


def symm_max_bytes(world_size: int) -> int:
    """The most input bytes any symmetric-memory algorithm takes at this world size."""
    return max(ONESHOT_MAX_BYTES.get(world_size, 0), TWOSHOT_MAX_BYTES.get(world_size, 0))


@dataclass(frozen=True)
class SymmState:
    """What the planner knows about a communicator's symmetric workspace.

    unusable: None when the workspace exists (or will be created by this eager call, or
    is hypothetical), else the reason it cannot be used now.
    stage_elems / out_elems / ll_elems: its capacities in elements of the call's dtype
    (out_elems 0 = no two-shot region, ll_elems 0 = no LL region)."""

    unusable: str | None
    stage_elems: int
    out_elems: int
    ll_elems: int = 0


@dataclass(frozen=True)
class DispatchPlan:
    algo: str
    path: str
    fused_quant: bool  # the quant runs inside the same kernel as the norm
    notes: tuple[str, ...] = ()
    quantize: bool = True  # False: a norm-only site (bf16 out, no quant at all)

    def describe(self) -> str:
        what = {
            LOCAL: "add + RMSNorm",
            ONE_SHOT_LL: "LL one-shot symmetric-memory all-reduce + add + RMSNorm",
            ONE_SHOT: "one-shot symmetric-memory all-reduce + add + RMSNorm",
            TWO_SHOT: "two-shot symmetric-memory all-reduce + add + RMSNorm",
            SPLIT: "NCCL all-reduce, then add + RMSNorm",
        }[self.algo]
        if not self.quantize:
            what += " (bf16 out, no quant)"
        elif self.fused_quant:
            what += " + group quant in one kernel"
        else:
            what += ", then group quant"
        text = f"{self.path}: {what}"
        if self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return text


def norm_tile_reason(hidden: int) -> str | None:
    if hidden % 16:
        return f"hidden {hidden} is not a multiple of 16"
    if norm_tile(hidden).elements > MAX_TILE:
        return f"hidden {hidden} exceeds the {MAX_TILE}-element register tile"
    return None


def plan(
    *,
    num_tokens: int,
    hidden: int,
    elem_bytes: int,
    world_size: int,
    group_size: int,
    quantize: bool,
    symm: SymmState | None,
) -> DispatchPlan:
    """The plan for one call. ``symm`` is None when there is no group (world_size 1).
    Assumes the backend is eligible (norm_tile_reason(hidden) is None)."""
    notes: list[str] = []
    fused_quant = quantize and tile_reason(hidden, group_size) is None
    if quantize and not fused_quant:
        notes.append(f"fused-1 needs the quant in the norm's tile: {tile_reason(hidden, group_size)}")
    if world_size == 1 or symm is None:
        return DispatchPlan(
            LOCAL, "fused-1" if fused_quant or not quantize else "fused-2", fused_quant, tuple(notes), quantize
        )

    nbytes = num_tokens * hidden * elem_bytes
    ll_max = LL_MAX_BYTES.get(world_size, 0)
    one_max = ONESHOT_MAX_BYTES.get(world_size, 0)
    two_max = TWOSHOT_MAX_BYTES.get(world_size, 0)
    group = group_size if fused_quant else norm_tile(hidden).group
    algo = None
    if symm.unusable is not None and nbytes <= max(ll_max, one_max, two_max):
        notes.append(f"symmetric memory: {symm.unusable}")
    elif nbytes <= ll_max and _ll_reason(num_tokens, hidden, symm) is None:
        algo = ONE_SHOT_LL
    elif nbytes <= one_max:
        if nbytes <= ll_max:
            notes.append(f"one-shot-ll: {_ll_reason(num_tokens, hidden, symm)}")
        why = _stage_reason(num_tokens, hidden, symm)
        if why is None:
            algo = ONE_SHOT
            why_apart = _pull_quant_apart_reason(nbytes, hidden, group_size, world_size) if fused_quant else None
            if why_apart is not None:
                fused_quant = False
                notes.append(f"the group quant as its own kernel: {why_apart}")
        else:
            notes.append(f"one-shot: {why}")
    elif nbytes <= two_max:
        why = _stage_reason(num_tokens, hidden, symm) or _out_reason(num_tokens, hidden, group, world_size, symm)
        if why is None:
            algo = TWO_SHOT
        else:
            notes.append(f"two-shot: {why}")
    else:
        limit = max(ll_max, one_max, two_max)
        notes.append(
            f"{nbytes} input bytes > {limit}: NCCL wins at this size"
            + ("" if nbytes <= MEASURED_UP_TO_BYTES.get(world_size, 0) else " (estimate, not measured)")
            + ("; two-shot is not dispatched (see dispatch.py)" if two_max == 0 and world_size > 2 else "")
        )
    if algo is None:
        path = "fused-2" if fused_quant or not quantize else "generic"
        return DispatchPlan(SPLIT, path, fused_quant, tuple(notes), quantize)
    return DispatchPlan(
        algo, "fused-1" if fused_quant or not quantize else "fused-2", fused_quant, tuple(notes), quantize
    )


def _pull_quant_apart_reason(nbytes: int, hidden: int, group_size: int, world_size: int) -> str | None:
    """Why the pull one-shot kernel should leave the quant to the group-quant kernel (None: it
    should not)."""
    if hidden not in PULL_QUANT_HIDDEN or group_size != 128:
        return (
            f"the in-kernel quant is measured faster only at hidden "
            f"{'/'.join(map(str, PULL_QUANT_HIDDEN))} in 128-groups (TP=2)"
        )
    limit = PULL_QUANT_MIN_BYTES.get(world_size, 0)
    if nbytes < limit:
        return f"{nbytes} input bytes < {limit}: faster than in the one-shot kernel at this size (measured)"
    return None


def _ll_reason(tokens: int, hidden: int, symm: SymmState) -> str | None:
    if tokens * hidden > symm.ll_elems:
        return f"{tokens} x {hidden} elements exceed the LL buffer ({symm.ll_elems})"
    return None


def _stage_reason(tokens: int, hidden: int, symm: SymmState) -> str | None:
    if tokens * hidden > symm.stage_elems:
        return (
            f"{tokens} x {hidden} elements exceed the symmetric staging buffer "
            f"({symm.stage_elems}; VLLM_ROCM_FUSED_MAX_TOKENS sizes it)"
        )
    return None


def _out_reason(tokens: int, hidden: int, group: int, world_size: int, symm: SymmState) -> str | None:
    chunk = -(-tokens // world_size)
    if chunk * hidden > symm.out_elems or chunk * (hidden // group) > symm.out_elems // 16:
        return f"a {chunk}-row chunk exceeds the two-shot output region ({symm.out_elems} elements)"
    return None
