"""Two-shot all-reduce + residual add + RMSNorm + per-group FP8 quant, one kernel.

Algorithm (W ranks, symmetric memory, P2P peer pointers; no multicast). Rows are split
into W chunks of C = ceil(T / W); rank r owns chunk r. Program b handles chunk offsets
j = b, b + grid, ...:
  1. copy rows (q * C + j) of this rank's x, for every chunk q, into its staging half;
  2. barrier with program b of every peer;
  3. reduce-scatter: for the owned row r * C + j, sum the W staged rows (float32, rank
     order), add residual, RMSNorm, quantize; write q, scale, residual (and normed)
     locally and into this rank's symmetric output region, slot j;
  4. barrier again;
  5. all-gather: copy each peer's slot j (q, scale, residual, normed) into the local
     outputs at that peer's row p * C + j;
  6. the last program advances the call parity (symm_sync.py: double buffering).

Memory traffic per rank over NVLink: (W - 1) / W of the input (2 bytes/element) in step
3, plus (W - 1) / W of the outputs (q 1 + residual 2 [+ normed 2] bytes/element + scales)
in step 5: ~5 bytes/element against the one-shot's 2 (W - 1). It wins only at W >= 4
for large T; at W = 2 the one-shot moves fewer bytes with one barrier less.

Row math: row_math.py (parts of whole groups).

Limits: as the one-shot kernel, plus C * H <= the workspace's output capacity.
Graph safety: as the one-shot kernel (device-side flags and parity; no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Outputs, SymmPeers, prepare_rows, tile_reason
from .row_math import CTL_EPOCHS, inv_rms, norm_part, part_tile, quant_tile, sum_sq
from .symm_sync import block_barrier, call_parity, finish_call, next_epoch

# PHASE: 0 = the whole kernel (GPU); emulation on one device (Triton interpreter):
# 1 = copy-in, 2 = reduce + publish, 3 = gather (+ parity), each run on every rank in turn.


@triton.jit
def _copy_in_part(
    x_ptr,
    dst,
    base,
    row_ok,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    N_GROUPS: tl.constexpr,
):
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GROUP, N_GROUPS)
    m = mask & row_ok
    tl.store(dst + base + offs, tl.load(x_ptr + base + offs, mask=m), mask=m)


@triton.jit
def _sum_part(
    stage,
    half,
    base,
    res_ptr,
    w_ptr,
    row_ok,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    N_GROUPS: tl.constexpr,
    W: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """(s = the W staged rows' float32 sum in rank order (+ residual) of one part of an owned
    row, its weights, offsets, masks)."""
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GROUP, N_GROUPS)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    mask = mask & row_ok
    gmask = gmask & row_ok
    s = tl.zeros((NGP, GS), dtype=tl.float32)
    for p in tl.static_range(W):
        s += tl.load(stage[p] + half + base + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return s, w, offs, mask, g, gmask


@triton.jit
def _publish_part(
    s,
    w,
    inv,
    row,
    j,
    offs,
    mask,
    g,
    gmask,
    weight_offset,
    res_out_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    scale_st,
    scale_sg,
    o_res,
    o_normed,
    o_q,
    o_scale,
    ohalf,
    shalf,
    HIDDEN: tl.constexpr,
    N_GROUPS: tl.constexpr,
    RANK: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """One part of an owned row's outputs, locally and into this rank's output slot j."""
    base = tl.cast(row, tl.int64) * HIDDEN
    slot = tl.cast(j, tl.int64) * HIDDEN
    r = s.to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + base + offs, r, mask=mask)
    tl.store(o_res[RANK] + ohalf + slot + offs, r, mask=mask)
    normed = norm_part(s, inv, w, weight_offset, res_out_ptr.dtype.element_ty)
    if EMIT:
        tl.store(normed_ptr + base + offs, normed, mask=mask)
        tl.store(o_normed[RANK] + ohalf + slot + offs, normed, mask=mask)
    if QUANT:
        q, scale = quant_tile(normed, FP8_MAX)
        q8 = q.to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + base + offs, q8, mask=mask)
        tl.store(o_q[RANK] + ohalf + slot + offs, q8, mask=mask)
        tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g * scale_sg, scale, mask=gmask)
        tl.store(o_scale[RANK] + shalf + tl.cast(j, tl.int64) * N_GROUPS + g, scale, mask=gmask)


@triton.jit
def _gather_part(
    p_res,
    p_normed,
    p_q,
    p_scale,
    ohalf,
    shalf,
    row,
    j,
    row_ok,
    res_out_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    scale_st,
    scale_sg,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    HIDDEN: tl.constexpr,
    N_GROUPS: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
):
    """Copy one part of a peer's slot j (its row ``row``) into the local outputs."""
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GROUP, N_GROUPS)
    m = mask & row_ok
    base = tl.cast(row, tl.int64) * HIDDEN
    slot = tl.cast(j, tl.int64) * HIDDEN
    tl.store(res_out_ptr + base + offs, tl.load(p_res + ohalf + slot + offs, mask=m, cache_modifier=".cg"), mask=m)
    if EMIT:
        tl.store(
            normed_ptr + base + offs, tl.load(p_normed + ohalf + slot + offs, mask=m, cache_modifier=".cg"), mask=m
        )
    if QUANT:
        tl.store(q_ptr + base + offs, tl.load(p_q + ohalf + slot + offs, mask=m, cache_modifier=".cg"), mask=m)
        sm = gmask & row_ok
        sc = tl.load(p_scale + shalf + tl.cast(j, tl.int64) * N_GROUPS + g, mask=sm, cache_modifier=".cg")
        tl.store(scale_ptr + tl.cast(row, tl.int64) * scale_st + g * scale_sg, sc, mask=sm)


@triton.jit(do_not_specialize=["n_rows", "chunk", "scale_st", "scale_sg"])
def _twoshot_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    stage,
    flags,
    ctl_ptr,
    o_q,
    o_res,
    o_normed,
    o_scale,
    n_rows,
    chunk,
    stage_cap,
    out_cap,
    scale_cap,
    eps,
    weight_offset,
    scale_st,
    scale_sg,
    W: tl.constexpr,
    RANK: tl.constexpr,
    HIDDEN: tl.constexpr,
    GS: tl.constexpr,
    GROUP: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    HAS_RES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PHASE: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // GROUP
    O1: tl.constexpr = P0
    O2: tl.constexpr = P0 + P1
    O3: tl.constexpr = P0 + P1 + P2
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    calls, parity = call_parity(ctl_ptr)
    half = parity.to(tl.int64) * stage_cap
    ohalf = parity.to(tl.int64) * out_cap
    shalf = parity.to(tl.int64) * scale_cap

    if PHASE == 0 or PHASE == 1:
        for j in range(pid, chunk, nprog):
            for c in tl.static_range(W):
                row = c * chunk + j
                base = tl.cast(row, tl.int64) * HIDDEN
                dst = stage[RANK] + half
                row_ok = row < n_rows
                _copy_in_part(x_ptr, dst, base, row_ok, 0, P0, GS, GROUP, N_GROUPS)
                if P1 > 0:
                    _copy_in_part(x_ptr, dst, base, row_ok, O1, P1, GS, GROUP, N_GROUPS)
                if P2 > 0:
                    _copy_in_part(x_ptr, dst, base, row_ok, O2, P2, GS, GROUP, N_GROUPS)
                if P3 > 0:
                    _copy_in_part(x_ptr, dst, base, row_ok, O3, P3, GS, GROUP, N_GROUPS)
    if PHASE == 0:
        epoch = next_epoch(ctl_ptr, pid)
        block_barrier(flags, ctl_ptr, pid, epoch, W, RANK)
    if PHASE == 0 or PHASE == 2:
        for j in range(pid, chunk, nprog):
            row = RANK * chunk + j
            base = tl.cast(row, tl.int64) * HIDDEN
            row_ok = row < n_rows
            s0, w0, o0, m0, g0, gm0 = _sum_part(
                stage, half, base, res_ptr, w_ptr, row_ok, 0, P0, GS, GROUP, N_GROUPS, W, HAS_RES
            )
            ss = sum_sq(s0)
            if P1 > 0:
                s1, w1, o1, m1, g1, gm1 = _sum_part(
                    stage, half, base, res_ptr, w_ptr, row_ok, O1, P1, GS, GROUP, N_GROUPS, W, HAS_RES
                )
                ss += sum_sq(s1)
            if P2 > 0:
                s2, w2, o2, m2, g2, gm2 = _sum_part(
                    stage, half, base, res_ptr, w_ptr, row_ok, O2, P2, GS, GROUP, N_GROUPS, W, HAS_RES
                )
                ss += sum_sq(s2)
            if P3 > 0:
                s3, w3, o3, m3, g3, gm3 = _sum_part(
                    stage, half, base, res_ptr, w_ptr, row_ok, O3, P3, GS, GROUP, N_GROUPS, W, HAS_RES
                )
                ss += sum_sq(s3)
            inv = inv_rms(ss, HIDDEN, eps)
            _publish_part(
                s0,
                w0,
                inv,
                row,
                j,
                o0,
                m0,
                g0,
                gm0,
                weight_offset,
                res_out_ptr,
                normed_ptr,
                q_ptr,
                scale_ptr,
                scale_st,
                scale_sg,
                o_res,
                o_normed,
                o_q,
                o_scale,
                ohalf,
                shalf,
                HIDDEN,
                N_GROUPS,
                RANK,
                QUANT,
                EMIT,
                FP8_MAX,
            )
            if P1 > 0:
                _publish_part(
                    s1,
                    w1,
                    inv,
                    row,
                    j,
                    o1,
                    m1,
                    g1,
                    gm1,
                    weight_offset,
                    res_out_ptr,
                    normed_ptr,
                    q_ptr,
                    scale_ptr,
                    scale_st,
                    scale_sg,
                    o_res,
                    o_normed,
                    o_q,
                    o_scale,
                    ohalf,
                    shalf,
                    HIDDEN,
                    N_GROUPS,
                    RANK,
                    QUANT,
                    EMIT,
                    FP8_MAX,
                )
            if P2 > 0:
                _publish_part(
                    s2,
                    w2,
                    inv,
                    row,
                    j,
                    o2,
                    m2,
                    g2,
                    gm2,
                    weight_offset,
                    res_out_ptr,
                    normed_ptr,
                    q_ptr,
                    scale_ptr,
                    scale_st,
                    scale_sg,
                    o_res,
                    o_normed,
                    o_q,
                    o_scale,
                    ohalf,
                    shalf,
                    HIDDEN,
                    N_GROUPS,
                    RANK,
                    QUANT,
                    EMIT,
                    FP8_MAX,
                )
            if P3 > 0:
                _publish_part(
                    s3,
                    w3,
                    inv,
                    row,
                    j,
                    o3,
                    m3,
                    g3,
                    gm3,
                    weight_offset,
                    res_out_ptr,
                    normed_ptr,
                    q_ptr,
                    scale_ptr,
                    scale_st,
                    scale_sg,
                    o_res,
                    o_normed,
                    o_q,
                    o_scale,
                    ohalf,
                    shalf,
                    HIDDEN,
                    N_GROUPS,
                    RANK,
                    QUANT,
                    EMIT,
                    FP8_MAX,
                )
    if PHASE == 0:
        block_barrier(flags, ctl_ptr, pid, epoch + 1, W, RANK)
        tl.store(ctl_ptr + CTL_EPOCHS + pid, epoch + 1)  # two barriers this call
    if PHASE == 0 or PHASE == 3:
        for j in range(pid, chunk, nprog):
            for p in tl.static_range(W):
                if p != RANK:
                    row = p * chunk + j
                    row_ok = row < n_rows
                    _gather_part(
                        o_res[p],
                        o_normed[p],
                        o_q[p],
                        o_scale[p],
                        ohalf,
                        shalf,
                        row,
                        j,
                        row_ok,
                        res_out_ptr,
                        normed_ptr,
                        q_ptr,
                        scale_ptr,
                        scale_st,
                        scale_sg,
                        0,
                        P0,
                        GS,
                        GROUP,
                        HIDDEN,
                        N_GROUPS,
                        QUANT,
                        EMIT,
                    )
                    if P1 > 0:
                        _gather_part(
                            o_res[p],
                            o_normed[p],
                            o_q[p],
                            o_scale[p],
                            ohalf,
                            shalf,
                            row,
                            j,
                            row_ok,
                            res_out_ptr,
                            normed_ptr,
                            q_ptr,
                            scale_ptr,
                            scale_st,
                            scale_sg,
                            O1,
                            P1,
                            GS,
                            GROUP,
                            HIDDEN,
                            N_GROUPS,
                            QUANT,
                            EMIT,
                        )
                    if P2 > 0:
                        _gather_part(
                            o_res[p],
                            o_normed[p],
                            o_q[p],
                            o_scale[p],
                            ohalf,
                            shalf,
                            row,
                            j,
                            row_ok,
                            res_out_ptr,
                            normed_ptr,
                            q_ptr,
                            scale_ptr,
                            scale_st,
                            scale_sg,
                            O2,
                            P2,
                            GS,
                            GROUP,
                            HIDDEN,
                            N_GROUPS,
                            QUANT,
                            EMIT,
                        )
                    if P3 > 0:
                        _gather_part(
                            o_res[p],
                            o_normed[p],
                            o_q[p],
                            o_scale[p],
                            ohalf,
                            shalf,
                            row,
                            j,
                            row_ok,
                            res_out_ptr,
                            normed_ptr,
                            q_ptr,
                            scale_ptr,
                            scale_st,
                            scale_sg,
                            O3,
                            P3,
                            GS,
                            GROUP,
                            HIDDEN,
                            N_GROUPS,
                            QUANT,
                            EMIT,
                        )
        finish_call(ctl_ptr, calls)


def fits(tokens: int, hidden: int, group: int, world_size: int, stage_cap: int, out_cap: int) -> str | None:
    """Why a call of this shape cannot run here (None = it can); host-side."""
    reason = tile_reason(hidden, group)
    if reason is not None:
        return reason
    if tokens * hidden > stage_cap:
        return f"{tokens} x {hidden} elements exceed the staging capacity ({stage_cap})"
    chunk = -(-tokens // world_size)
    if chunk * hidden > out_cap or chunk * (hidden // group) > out_cap // 16:
        return f"a chunk of {chunk} x {hidden} elements exceeds the two-shot output capacity ({out_cap})"
    return None


def twoshot_ar_norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    peers: SymmPeers,
    *,
    weight_offset: float = 0.0,
    group_size: int = 128,
    quantize: bool = True,
    emit_bf16: bool = False,
    scale_layout: str = "row",
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
    phase: int = 0,
    outputs: Outputs | None = None,
) -> Outputs:
    """Same contract as oneshot_ar_norm_quant (the peers need the output region)."""
    tokens, hidden = x.shape
    if peers.out_res is None:
        raise ValueError("this workspace has no two-shot output region")
    run = prepare_rows(
        tokens,
        hidden,
        x.dtype,
        x.device,
        group_size=group_size,
        quantize=quantize,
        emit_bf16=emit_bf16,
        scale_layout=scale_layout,
        quant_dtype=quant_dtype,
        outputs=outputs,
    )
    q, scale, res_out, normed = run.outputs
    if tokens == 0:
        return run.outputs
    reason = fits(tokens, hidden, run.tile.group, peers.world_size, peers.stage_cap, peers.out_cap)
    if reason is not None:
        raise ValueError(reason)
    chunk = -(-tokens // peers.world_size)
    _twoshot_kernel[(peers.grid(chunk),)](
        x,
        residual,
        weight,
        res_out,
        normed,
        q,
        scale,
        peers.stage,
        peers.flags,
        peers.ctl,
        peers.out_q,
        peers.out_res,
        peers.out_normed,
        peers.out_scale,
        tokens,
        chunk,
        peers.stage_cap,
        peers.out_cap,
        peers.scale_cap,
        float(eps),
        float(weight_offset),
        run.scale_st,
        run.scale_sg,
        W=peers.world_size,
        RANK=peers.rank,
        HIDDEN=hidden,
        **run.tile.constexprs(),
        HAS_RES=residual is not None,
        QUANT=quantize,
        EMIT=normed is not None,
        FP8_MAX=run.fp8_max,
        PHASE=phase,
        num_warps=run.tile.num_warps,
    )
    return run.outputs
