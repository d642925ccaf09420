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

Limits: 2 <= W <= 8; GROUP a power of two; T * H <= the workspace's LL capacity.
Graph safety: no host sync; the flag comes from the device-side call counter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import SymmPeers, empty_outputs, norm_tile, quant_constants, row_tile, scale_strides, tile_reason
from .row_math import CTL_ERRORS, add_rmsnorm, row_tile as tile_offsets, store_row_outputs
from .symm_sync import WAIT_TIMEOUT_NS, call_parity, finish_call, global_timer_ns

_TIMEOUT: tl.constexpr = tl.constexpr(WAIT_TIMEOUT_NS)


@triton.jit
def _pack(xv, flag_hi, NG_P2: tl.constexpr, GS: tl.constexpr):
    """[NG_P2, GS] 16-bit values -> [NG_P2, GS // 2] words: (elem 2k) | (elem 2k+1) << 16 | flag << 32."""
    bits = xv.to(tl.uint16, bitcast=True).to(tl.uint32)
    lo, hi = tl.split(tl.reshape(bits, (NG_P2, GS // 2, 2)))
    return (lo | (hi << 16)).to(tl.uint64) | flag_hi


@triton.jit
def _unpack(words, DTYPE: tl.constexpr, NG_P2: tl.constexpr, GS: tl.constexpr):
    lo = (words & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    hi = ((words >> 16) & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (NG_P2, GS))


@triton.jit(do_not_specialize=["n_rows", "scale_st", "scale_sg"])
def _oneshot_ll_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, normed_ptr, q_ptr, scale_ptr,
    ll, ctl_ptr,
    n_rows, hidden, n_groups, ll_cap, eps, weight_offset, scale_st, scale_sg,
    W: tl.constexpr, RANK: tl.constexpr, NG_P2: tl.constexpr, GS: tl.constexpr,
    NORM: tl.constexpr, HAS_RES: tl.constexpr, QUANT: tl.constexpr, EMIT: tl.constexpr,
    FP8_MAX: tl.constexpr, PHASE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs, mask = tile_offsets(n_groups, NG_P2, GS, GS)
    wg = tl.arange(0, NG_P2)[:, None]
    wj = tl.arange(0, GS // 2)[None, :]
    woffs = wg * (GS // 2) + wj
    wmask = wg < n_groups
    calls, parity = call_parity(ctl_ptr)
    flag = (calls + 1).to(tl.uint32)
    flag_hi = flag.to(tl.uint64) << 32
    row_words = hidden // 2
    half = parity.to(tl.int64) * W * ll_cap

    if PHASE != 2:  # push this rank's rows into every peer's slot for this rank
        for row in range(pid, n_rows, nprog):
            base = tl.cast(row, tl.int64) * hidden
            words = _pack(tl.load(x_ptr + base + offs, mask=mask, other=0.0), flag_hi, NG_P2, GS)
            wbase = half + RANK * ll_cap + tl.cast(row, tl.int64) * row_words
            for p in tl.static_range(W):
                if p != RANK:
                    tl.store(ll[p] + wbase + woffs, words.to(tl.int64, bitcast=True), mask=wmask)
    if PHASE != 1:
        if NORM:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        for row in range(pid, n_rows, nprog):
            base = tl.cast(row, tl.int64) * hidden
            acc = tl.zeros((NG_P2, GS), dtype=tl.float32)
            for p in tl.static_range(W):
                if p == RANK:
                    acc += tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                else:
                    ptrs = ll[RANK] + half + p * ll_cap + tl.cast(row, tl.int64) * row_words + woffs
                    words = tl.load(ptrs, mask=wmask, other=0, volatile=True).to(tl.uint64, bitcast=True)
                    missing = tl.sum(((words >> 32).to(tl.uint32) != flag).to(tl.int32) * wmask.to(tl.int32))
                    if PHASE == 0:
                        t0 = global_timer_ns()
                        while missing > 0:
                            words = tl.load(ptrs, mask=wmask, other=0, volatile=True).to(tl.uint64, bitcast=True)
                            missing = tl.sum(((words >> 32).to(tl.uint32) != flag).to(tl.int32)
                                             * wmask.to(tl.int32))
                            if global_timer_ns() - t0 > _TIMEOUT:
                                tl.atomic_add(ctl_ptr + CTL_ERRORS, 1)
                                missing = missing * 0
                    else:
                        if missing > 0:
                            tl.atomic_add(ctl_ptr + CTL_ERRORS, 1)
                    acc += _unpack(words, x_ptr.dtype.element_ty, NG_P2, GS).to(tl.float32)
            if NORM:
                if HAS_RES:
                    res = tl.load(res_ptr + base + offs, mask=mask, other=0.0)
                else:
                    res = acc
                r, normed = add_rmsnorm(acc, res, w, eps, hidden, weight_offset, out_ptr.dtype.element_ty, HAS_RES)
                store_row_outputs(row, offs, mask, n_groups, r, normed, out_ptr, normed_ptr, q_ptr, scale_ptr,
                                  scale_st, scale_sg, hidden, NG_P2, QUANT, EMIT, FP8_MAX)
            else:
                tl.store(out_ptr + base + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
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


def _launch(x, residual, weight, eps, peers, outputs, tile, *, norm, quantize, emit, weight_offset, quant_dtype,
            phase, num_warps=None):
    q, scale, res_out, normed = outputs
    tokens, hidden = x.shape
    reason = fits(tokens, hidden, tile.group, peers.ll_cap)
    if reason is not None:
        raise ValueError(reason)
    st, sg = scale_strides(scale) if quantize else (0, 0)
    _oneshot_ll_kernel[(peers.grid(tokens),)](
        x, residual, weight, res_out, normed, q, scale, peers.ll, peers.ctl,
        tokens, hidden, tile.n_groups, peers.ll_cap, float(eps), float(weight_offset), st, sg,
        W=peers.world_size, RANK=peers.rank, NG_P2=tile.ng_p2, GS=tile.gs,
        NORM=norm, HAS_RES=residual is not None, QUANT=quantize, EMIT=emit,
        FP8_MAX=quant_constants(quant_dtype) if quantize else 1.0, PHASE=phase,
        num_warps=num_warps or (tile.quant_num_warps if quantize else tile.num_warps),
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
    emit_normed: bool = False,
    scale_layout: str = "row",
    quant_dtype: torch.dtype = torch.float8_e4m3fn,
    phase: int = 0,
    outputs=None,
    num_warps: int | None = None,
):
    """Same contract as oneshot_ar_norm_quant.oneshot_ar_norm_quant (the peers need the LL region)."""
    tokens, hidden = x.shape
    if peers.ll is None:
        raise ValueError("this workspace has no LL region")
    if outputs is None:
        outputs = empty_outputs(tokens, hidden, x.dtype, x.device, group_size=group_size, quantize=quantize,
                                emit_normed=emit_normed, scale_layout=scale_layout, quant_dtype=quant_dtype)
    if tokens == 0:
        return outputs
    tile = row_tile(hidden, group_size) if quantize else norm_tile(hidden)
    _launch(x, residual, weight, eps, peers, outputs, tile, norm=True, quantize=quantize,
            emit=outputs[3] is not None, weight_offset=weight_offset, quant_dtype=quant_dtype, phase=phase,
            num_warps=num_warps)
    return outputs


def oneshot_ll_all_reduce(x: torch.Tensor, peers: SymmPeers, *, phase: int = 0, out=None) -> torch.Tensor:
    """The bare LL one-shot all-reduce (float32 sum rounded to x.dtype)."""
    tokens, hidden = x.shape
    out = torch.empty_like(x) if out is None else out
    if tokens == 0:
        return out
    _launch(x, None, None, 0.0, peers, (None, None, out, None), norm_tile(hidden), norm=False, quantize=False,
            emit=False, weight_offset=0.0, quant_dtype=torch.float8_e4m3fn, phase=phase)
    return out
