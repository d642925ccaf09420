"""Low-latency one-shot all-reduce + residual add + RMSNorm + per-group FP8 quant.

The pull one-shot kernel pays, per call, a release fence, a flag trip and then a remote
read round trip before it can sum. This kernel pays one one-way NVLink trip: the "LL"
protocol (as in NCCL's LL and TensorRT-LLM's Lamport all-reduce), with the flag inside
the data.

Algorithm (W ranks, symmetric memory, P2P peer pointers; no multicast):
  1. each program packs its token rows of x as 64-bit words, two 16-bit elements + the
     32-bit flag (calls + 1, the same on every rank), and stores them straight into every
     peer's receive buffer (this rank's slot, the half picked by the call parity);
  2. per row: poll the local receive buffer (volatile loads) until every word of every
     peer carries this call's flag; an aligned 8-byte store is single-copy atomic, so a
     word with the right flag holds the right data: no fence, no separate barrier;
  3. sum the W rows in float32 in rank order (own row from x), add residual, RMSNorm,
     group quant, store; the last program advances the call counter.
Reuse: call n + 2 overwrites the half call n used. A rank gets there only after its call
n + 1 received every peer's data, which each peer sends only after finishing call n.
Stale words never match: flags grow by one per call (and the buffer starts zeroed).

Memory traffic per rank: (W - 1) x 2 x the input bytes of remote writes (flag words
double the bytes), local polling reads of the same amount, plus residual/weight reads and
the outputs. Latency-optimal for small T; the pull kernel and NCCL take over as bytes grow.

Row math: row_math.py (parts of whole groups, each peer's words read once).

Limits: 2 <= W <= 8; GROUP a power of two; T * H <= the workspace's LL capacity.
Graph safety: no host sync; the flag comes from the device-side call counter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Outputs, RowLaunch, SymmPeers, prepare_rows, tile_reason
from .row_math import CTL_ERRORS, finish_part, inv_rms, part_tile, sum_sq
from .symm_sync import WAIT_TIMEOUT_NS, call_parity, finish_call, global_timer_ns

_TIMEOUT: tl.constexpr = tl.constexpr(WAIT_TIMEOUT_NS)


@triton.jit
def _pack(xv, flag_hi, NG: tl.constexpr, GS: tl.constexpr):
    """[NG, GS] 16-bit values -> [NG, GS // 2] words: (elem 2k) | (elem 2k+1) << 16 | flag << 32."""
    bits = xv.to(tl.uint16, bitcast=True).to(tl.uint32)
    lo, hi = tl.split(tl.reshape(bits, (NG, GS // 2, 2)))
    return (lo | (hi << 16)).to(tl.uint64) | flag_hi


@triton.jit
def _unpack(words, DTYPE: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr):
    lo = (words & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    hi = ((words >> 16) & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (NG, GS))


@triton.jit
def _word_offsets(g, GS: tl.constexpr):
    return g[:, None] * (GS // 2) + tl.arange(0, GS // 2)[None, :]


@triton.jit
def _push_part(
    x_ptr,
    ll,
    base,
    wbase,
    flag_hi,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    N_GROUPS: tl.constexpr,
    W: tl.constexpr,
    RANK: tl.constexpr,
):
    """Pack one part of this rank's row and store it into every peer's slot for this rank."""
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GS, N_GROUPS)
    words = _pack(tl.load(x_ptr + base + offs, mask=mask, other=0.0), flag_hi, NGP, GS)
    woffs = _word_offsets(g, GS)
    for p in tl.static_range(W):
        if p != RANK:
            tl.store(ll[p] + wbase + woffs, words.to(tl.int64, bitcast=True), mask=gmask[:, None])


@triton.jit
def _receive_part(
    x_ptr,
    res_ptr,
    w_ptr,
    ll,
    ctl_ptr,
    base,
    rbase,
    ll_cap,
    flag,
    G_OFF: tl.constexpr,
    NGP: tl.constexpr,
    GS: tl.constexpr,
    N_GROUPS: tl.constexpr,
    W: tl.constexpr,
    RANK: tl.constexpr,
    HAS_RES: tl.constexpr,
    NORM: tl.constexpr,
    PHASE: tl.constexpr,
):
    """(s = the W ranks' float32 sum in rank order (+ residual) of one part, its weights,
    offsets, masks): own values from x, every peer's from this rank's receive buffer once each
    word carries this call's flag (``rbase``: the row's word offset within a source slot of
    the half)."""
    offs, mask, g, gmask = part_tile(G_OFF, NGP, GS, GS, N_GROUPS)
    woffs = _word_offsets(g, GS)
    wmask = gmask[:, None]
    if NORM:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:  # the bare all-reduce has no weight (w unused)
        w = tl.zeros((NGP, GS), dtype=tl.float32)
    s = tl.zeros((NGP, GS), dtype=tl.float32)
    for p in tl.static_range(W):
        if p == RANK:
            s += tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            ptrs = ll[RANK] + p * ll_cap + rbase + woffs
            words = tl.load(ptrs, mask=wmask, other=0, volatile=True).to(tl.uint64, bitcast=True)
            missing = tl.sum(((words >> 32).to(tl.uint32) != flag).to(tl.int32) * wmask.to(tl.int32))
            if PHASE == 0:
                t0 = global_timer_ns()
                while missing > 0:
                    words = tl.load(ptrs, mask=wmask, other=0, volatile=True).to(tl.uint64, bitcast=True)
                    missing = tl.sum(((words >> 32).to(tl.uint32) != flag).to(tl.int32) * wmask.to(tl.int32))
                    if global_timer_ns() - t0 > _TIMEOUT:
                        tl.atomic_add(ctl_ptr + CTL_ERRORS, 1)
                        missing = missing * 0
            else:
                if missing > 0:
                    tl.atomic_add(ctl_ptr + CTL_ERRORS, 1)
            s += _unpack(words, x_ptr.dtype.element_ty, NGP, GS).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return s, w, offs, mask, g, gmask


@triton.jit(do_not_specialize=["n_rows", "scale_st", "scale_sg"])
def _oneshot_ll_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    normed_ptr,
    q_ptr,
    scale_ptr,
    ll,
    ctl_ptr,
    n_rows,
    ll_cap,
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
    NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    QUANT: tl.constexpr,
    EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PHASE: tl.constexpr,
):
    N_GROUPS: tl.constexpr = HIDDEN // GS
    ROW_WORDS: tl.constexpr = HIDDEN // 2
    O1: tl.constexpr = P0
    O2: tl.constexpr = P0 + P1
    O3: tl.constexpr = P0 + P1 + P2
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    calls, parity = call_parity(ctl_ptr)
    flag = (calls + 1).to(tl.uint32)
    flag_hi = flag.to(tl.uint64) << 32
    half = parity.to(tl.int64) * W * ll_cap

    if PHASE != 2:  # push this rank's rows into every peer's slot for this rank
        for row in range(pid, n_rows, nprog):
            base = tl.cast(row, tl.int64) * HIDDEN
            wbase = half + RANK * ll_cap + tl.cast(row, tl.int64) * ROW_WORDS
            _push_part(x_ptr, ll, base, wbase, flag_hi, 0, P0, GS, N_GROUPS, W, RANK)
            if P1 > 0:
                _push_part(x_ptr, ll, base, wbase, flag_hi, O1, P1, GS, N_GROUPS, W, RANK)
            if P2 > 0:
                _push_part(x_ptr, ll, base, wbase, flag_hi, O2, P2, GS, N_GROUPS, W, RANK)
            if P3 > 0:
                _push_part(x_ptr, ll, base, wbase, flag_hi, O3, P3, GS, N_GROUPS, W, RANK)
    if PHASE != 1:
        for row in range(pid, n_rows, nprog):
            base = tl.cast(row, tl.int64) * HIDDEN
            rbase = half + tl.cast(row, tl.int64) * ROW_WORDS
            s0, w0, o0, m0, g0, gm0 = _receive_part(
                x_ptr,
                res_ptr,
                w_ptr,
                ll,
                ctl_ptr,
                base,
                rbase,
                ll_cap,
                flag,
                0,
                P0,
                GS,
                N_GROUPS,
                W,
                RANK,
                HAS_RES,
                NORM,
                PHASE,
            )
            if P1 > 0:
                s1, w1, o1, m1, g1, gm1 = _receive_part(
                    x_ptr,
                    res_ptr,
                    w_ptr,
                    ll,
                    ctl_ptr,
                    base,
                    rbase,
                    ll_cap,
                    flag,
                    O1,
                    P1,
                    GS,
                    N_GROUPS,
                    W,
                    RANK,
                    HAS_RES,
                    NORM,
                    PHASE,
                )
            if P2 > 0:
                s2, w2, o2, m2, g2, gm2 = _receive_part(
                    x_ptr,
                    res_ptr,
                    w_ptr,
                    ll,
                    ctl_ptr,
                    base,
                    rbase,
                    ll_cap,
                    flag,
                    O2,
                    P2,
                    GS,
                    N_GROUPS,
                    W,
                    RANK,
                    HAS_RES,
                    NORM,
                    PHASE,
                )
            if P3 > 0:
                s3, w3, o3, m3, g3, gm3 = _receive_part(
                    x_ptr,
                    res_ptr,
                    w_ptr,
                    ll,
                    ctl_ptr,
                    base,
                    rbase,
                    ll_cap,
                    flag,
                    O3,
                    P3,
                    GS,
                    N_GROUPS,
                    W,
                    RANK,
                    HAS_RES,
                    NORM,
                    PHASE,
                )
            if NORM:
                ss = sum_sq(s0)
                if P1 > 0:
                    ss += sum_sq(s1)
                if P2 > 0:
                    ss += sum_sq(s2)
                if P3 > 0:
                    ss += sum_sq(s3)
                inv = inv_rms(ss, HIDDEN, eps)
                finish_part(
                    s0,
                    w0,
                    inv,
                    row,
                    o0,
                    m0,
                    g0,
                    gm0,
                    weight_offset,
                    out_ptr,
                    normed_ptr,
                    q_ptr,
                    scale_ptr,
                    scale_st,
                    scale_sg,
                    HIDDEN,
                    QUANT,
                    EMIT,
                    FP8_MAX,
                )
                if P1 > 0:
                    finish_part(
                        s1,
                        w1,
                        inv,
                        row,
                        o1,
                        m1,
                        g1,
                        gm1,
                        weight_offset,
                        out_ptr,
                        normed_ptr,
                        q_ptr,
                        scale_ptr,
                        scale_st,
                        scale_sg,
                        HIDDEN,
                        QUANT,
                        EMIT,
                        FP8_MAX,
                    )
                if P2 > 0:
                    finish_part(
                        s2,
                        w2,
                        inv,
                        row,
                        o2,
                        m2,
                        g2,
                        gm2,
                        weight_offset,
                        out_ptr,
                        normed_ptr,
                        q_ptr,
                        scale_ptr,
                        scale_st,
                        scale_sg,
                        HIDDEN,
                        QUANT,
                        EMIT,
                        FP8_MAX,
                    )
                if P3 > 0:
                    finish_part(
                        s3,
                        w3,
                        inv,
                        row,
                        o3,
                        m3,
                        g3,
                        gm3,
                        weight_offset,
                        out_ptr,
                        normed_ptr,
                        q_ptr,
                        scale_ptr,
                        scale_st,
                        scale_sg,
                        HIDDEN,
                        QUANT,
                        EMIT,
                        FP8_MAX,
                    )
            else:
                tl.store(out_ptr + base + o0, s0.to(out_ptr.dtype.element_ty), mask=m0)
                if P1 > 0:
                    tl.store(out_ptr + base + o1, s1.to(out_ptr.dtype.element_ty), mask=m1)
                if P2 > 0:
                    tl.store(out_ptr + base + o2, s2.to(out_ptr.dtype.element_ty), mask=m2)
                if P3 > 0:
                    tl.store(out_ptr + base + o3, s3.to(out_ptr.dtype.element_ty), mask=m3)
        finish_call(ctl_ptr, calls)


def fits(tokens: int, hidden: int, group: int, ll_cap_words: int) -> str | None:
    """Why a call of this shape cannot run here (None = it can); host-side."""
    if group & (group - 1):
        return f"the LL kernel needs a power-of-two tile width, got {group}"
    reason = tile_reason(hidden, group)
    if reason is not None:
        return reason
    if tokens * hidden > 2 * ll_cap_words:
        return f"{tokens} x {hidden} elements exceed the LL buffer ({2 * ll_cap_words})"
    return None


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    peers: SymmPeers,
    run: RowLaunch,
    *,
    norm: bool,
    quantize: bool,
    weight_offset: float,
    phase: int,
    num_warps: int | None = None,
) -> None:
    q, scale, res_out, normed = run.outputs
    tokens, hidden = x.shape
    reason = fits(tokens, hidden, run.tile.group, peers.ll_cap)
    if reason is not None:
        raise ValueError(reason)
    _oneshot_ll_kernel[(peers.grid(tokens),)](
        x,
        residual,
        weight,
        res_out,
        normed,
        q,
        scale,
        peers.ll,
        peers.ctl,
        tokens,
        peers.ll_cap,
        float(eps),
        float(weight_offset),
        run.scale_st,
        run.scale_sg,
        W=peers.world_size,
        RANK=peers.rank,
        HIDDEN=hidden,
        **run.tile.constexprs(),
        NORM=norm,
        HAS_RES=residual is not None,
        QUANT=quantize,
        EMIT=normed is not None,
        FP8_MAX=run.fp8_max,
        PHASE=phase,
        num_warps=num_warps or (run.tile.quant_num_warps if quantize else run.tile.num_warps),
    )


def oneshot_ll_ar_norm_quant(
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
    num_warps: int | None = None,
) -> Outputs:
    """Same contract as oneshot_ar_norm_quant.oneshot_ar_norm_quant (the peers need the LL region)."""
    tokens, hidden = x.shape
    if peers.ll is None:
        raise ValueError("this workspace has no LL region")
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
    if tokens == 0:
        return run.outputs
    _launch(
        x,
        residual,
        weight,
        eps,
        peers,
        run,
        norm=True,
        quantize=quantize,
        weight_offset=weight_offset,
        phase=phase,
        num_warps=num_warps,
    )
    return run.outputs


def oneshot_ll_all_reduce(
    x: torch.Tensor, peers: SymmPeers, *, phase: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The bare LL one-shot all-reduce (float32 sum rounded to x.dtype)."""
    tokens, hidden = x.shape
    out = torch.empty_like(x) if out is None else out
    if tokens == 0:
        return out
    run = prepare_rows(
        tokens,
        hidden,
        x.dtype,
        x.device,
        group_size=hidden,
        quantize=False,
        emit_bf16=False,
        scale_layout="row",
        quant_dtype=torch.float8_e4m3fn,
        outputs=(None, None, out, None),
    )
    _launch(x, None, None, 0.0, peers, run, norm=False, quantize=False, weight_offset=0.0, phase=phase)
    return out
