"""Cross-GPU block barrier over symmetric memory, and the call-parity ticket.

Protocol (the same idea as vLLM's custom all-reduce flags, plus double buffering):

* Every rank owns, in its symmetric buffer, an int32 flag array ``flags[block][src]``
  that peers write into, and in plain local memory a control tensor (row_math.CTL_*):
  a per-block epoch, the number of completed calls, a ticket and an error counter.
* A barrier of block ``b``: epoch = epochs[b] + 1; every thread stores ``epoch`` with
  ``st.release.sys`` into each peer's ``flags[b][rank]`` (after a ``bar.sync``, so the
  block's earlier writes to its own symmetric buffer are released with it), then spins
  with ``ld.acquire.sys`` on its local ``flags[b][p]`` until it reaches ``epoch`` for every
  peer p. Flags only grow (compared as a wrapping int32 difference), so redundant stores
  by several threads are harmless and nothing needs resetting: CUDA-graph replays and
  eager calls continue the same sequence. Block b of one rank only ever pairs with block
  b of the others, and all ranks launch the same grids in the same order, so every
  block's epoch agrees across ranks even when grids differ from call to call.
* Double buffering instead of a closing barrier: a call writes the half of the staging
  (and two-shot output) region picked by the parity of ``calls``. The last block of a call
  to take the ticket increments ``calls``; every block read it before taking its ticket,
  so all blocks of one call agree. Call n+2 reuses call n's half only after call n+1's
  barrier, which each peer reaches only after its call n finished reading (stream order).
  Hence: one workspace, one stream (calls on two streams could overlap).
* A wait gives up after WAIT_TIMEOUT_NS (60 s of %globaltimer) and counts in
  ``ctl[CTL_ERRORS]`` instead of hanging the GPU; tests and the benchmark check it is 0.

* Memory that peers write (staging, output regions) is read with ``.cg`` loads (L2, not
  the SM's L1, which is not coherent with writes from other GPUs).

Uses inline PTX (GPU only): the kernels' emulation phases for the Triton interpreter
skip these functions.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .row_math import CTL_CALLS, CTL_EPOCHS, CTL_ERRORS, CTL_TICKET

# How long a wait polls before it gives up: far longer than a peer JIT-compiling the same
# kernel takes (a poll-count bound is not: polls of local memory are fast). The literal sits
# in _wait_reach's PTX; keep the two in step.
WAIT_TIMEOUT_NS = 60_000_000_000


@triton.jit
def _store_release_sys(ptr, value):
    return tl.inline_asm_elementwise(
        "st.release.sys.global.b32 [$1], $2; mov.b32 $0, 0;",
        "=r,l,r",
        [ptr, value],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _wait_reach(ptr, epoch):
    """Spin until the int32 at ptr reaches epoch (wrapping compare), for at most
    WAIT_TIMEOUT_NS of %globaltimer; returns value - epoch (< 0 if it gave up)."""
    return tl.inline_asm_elementwise(
        """
        {
            .reg .pred %p_ok;
            .reg .b32 %v, %d;
            .reg .u64 %t0, %t1;
            mov.u64 %t0, %globaltimer;
        wait_loop:
            ld.acquire.sys.global.b32 %v, [$1];
            sub.s32 %d, %v, $2;
            setp.ge.s32 %p_ok, %d, 0;
            @%p_ok bra wait_done;
            mov.u64 %t1, %globaltimer;
            sub.u64 %t1, %t1, %t0;
            setp.lt.u64 %p_ok, %t1, 60000000000;
            @%p_ok bra wait_loop;
        wait_done:
            mov.b32 $0, %d;
        }
        """,
        "=r,l,r",
        [ptr, epoch],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def global_timer_ns():
    """%globaltimer (ns), for the time-outs of polling loops."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.uint64, is_pure=False, pack=1)


@triton.jit
def next_epoch(ctl_ptr, pid):
    """This block's next barrier epoch, advanced in the control tensor.

    Every thread loads the counter, but a scalar store is done by one thread: without the
    bar.sync between them, a warp that reaches the load late (e.g. still copying its part
    of the staging rows) would read the already advanced value and wait for an epoch one
    past its peers', splitting the block -- and then the ranks -- onto different epochs."""
    epoch = tl.load(ctl_ptr + CTL_EPOCHS + pid) + 1
    tl.debug_barrier()
    tl.store(ctl_ptr + CTL_EPOCHS + pid, epoch)
    return epoch


@triton.jit
def block_barrier(flags, ctl_ptr, pid, epoch, W: tl.constexpr, RANK: tl.constexpr):
    """Barrier of this block with block ``pid`` of every peer (see module doc).
    ``flags``: tuple of the W ranks' int32 flag arrays."""
    tl.debug_barrier()
    slot = pid * W
    for p in tl.static_range(W):
        if p != RANK:
            _store_release_sys(flags[p] + slot + RANK, epoch)
    for p in tl.static_range(W):
        if p != RANK:
            d = _wait_reach(flags[RANK] + slot + p, epoch)
            if d < 0:
                tl.atomic_add(ctl_ptr + CTL_ERRORS, 1)
    tl.debug_barrier()


@triton.jit
def call_parity(ctl_ptr):
    """(calls, parity) of the running call; read by every block before its ticket."""
    calls = tl.load(ctl_ptr + CTL_CALLS)
    return calls, calls & 1  # also right once the int32 counter wraps


@triton.jit
def finish_call(ctl_ptr, calls):
    """Take this block's ticket; the last block of the call advances ``calls``. The
    bar.sync first: every thread of the block has read ``calls`` before any block can
    advance it (the same load-then-store hazard as next_epoch's)."""
    tl.debug_barrier()
    t = tl.atomic_add(ctl_ptr + CTL_TICKET, 1, sem="acq_rel", scope="gpu")
    if t == tl.num_programs(0) - 1:
        tl.store(ctl_ptr + CTL_TICKET, 0)
        tl.store(ctl_ptr + CTL_CALLS, calls + 1)
