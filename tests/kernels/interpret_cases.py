"""The Triton kernels under the Triton interpreter, ranks emulated on one CPU device.

Each case is one check with its own id (``CASES``). test_kernels_interpreted.py makes every
id a test and runs the selected ones in one interpreter process (``TRITON_INTERPRET=1`` must
be set before Triton decorates the kernels, so they cannot share the test process, which
imports them normally); that process prints one JSON line per case, so a failing case fails
its own test and the others still run. ``python interpret_cases.py [ID ...]`` (with
TRITON_INTERPRET=1) runs them by hand; this module imports the kernels only then.

Multi-GPU kernels run in their emulation phases (every rank's copy-in, then every rank's
reduce, ...), which is the order their barriers enforce on GPUs, so this checks indexing,
masking, chunking, layouts, the all-reduce order and the call parity for world sizes 2, 4
and 8 without a GPU. The cases of one kernel and world size share one emulated workspace
and run in order (back-to-back calls alternate the buffer halves), each checking that its
call advanced the call counter once.

Interpreter quirks this accounts for: float32 -> bf16 casts truncate (so cases use
float16, which it rounds correctly), and float32 -> fp8 casts that round up into the
next power of two come out wrong (those elements are left out of the q comparison;
tests/gpu checks every element on real hardware).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    from support.emulated_symm import emulated_peers
    from vllm_rocm_fused.kernels.add_rmsnorm_quant import add_rmsnorm_quant
    from vllm_rocm_fused.kernels.group_quant import group_quant
    from vllm_rocm_fused.kernels.launch import empty_outputs
    from vllm_rocm_fused.kernels.oneshot_ar_norm_quant import oneshot_all_reduce, oneshot_ar_norm_quant
    from vllm_rocm_fused.kernels.oneshot_ll_ar_norm_quant import oneshot_ll_all_reduce, oneshot_ll_ar_norm_quant
    from vllm_rocm_fused.kernels.twoshot_ar_norm_quant import twoshot_ar_norm_quant
    from vllm_rocm_fused.ops.reference import group_quant_reference, norm_quant_reference

FP8 = torch.float8_e4m3fn
DT = torch.float16
EPS = 1e-6


def carry_positions(v: torch.Tensor) -> torch.Tensor:
    """Where the interpreter's float32 -> fp8 cast may be off by a factor of two: values
    in the top half-step below a power of two round up onto it (and values just above one
    may fall into that zone after a one-ulp change of normed); margins included. Ties it
    rounds away from zero: at most one step off, which the check allows."""
    lg = torch.log2(v.abs().clamp(min=2**-9))
    return (torch.ceil(lg) - lg < 0.1) | (lg - torch.floor(lg) < 0.03)


def poison(outputs):
    """NaN in every output element (0xFF bytes are NaN in fp8 e4m3fn too)."""
    for tensor in outputs:
        if tensor is None:
            continue
        if tensor.dtype == FP8:
            tensor.view(torch.uint8).fill_(0xFF)
        else:
            tensor.fill_(float("nan"))


def check(out, ref, *, quantize, emit, group_size, what):
    q, scale, res, normed = out
    for tensor in out:  # inputs are finite, so a NaN is an element never written
        assert tensor is None or not tensor.float().isnan().any(), f"{what}: unwritten (poisoned) elements"
    assert torch.equal(res, ref.residual), f"{what}: residual differs"
    if not quantize:
        assert q is None and scale is None
        torch.testing.assert_close(normed, ref.normed, rtol=2**-10, atol=1e-6, msg=lambda m: f"{what}: {m}")
        return
    assert scale.stride() == ref.scale.stride(), f"{what}: scale strides {scale.stride()} != {ref.scale.stride()}"
    torch.testing.assert_close(scale, ref.scale, rtol=2**-9, atol=0, msg=lambda m: f"{what}: scale {m}")
    if emit:
        torch.testing.assert_close(normed, ref.normed, rtol=2**-10, atol=1e-6, msg=lambda m: f"{what}: {m}")
    else:
        assert normed is None
    t, h = q.shape
    ref_n = ref.normed if ref.normed is not None else None
    v = (ref_n.float().view(t, h // group_size, group_size) / ref.scale.unsqueeze(-1)).clamp(-448, 448).view(t, h)
    keep = ~carry_positions(v)
    diff = (q.float() - v.to(FP8).float()).abs()
    step = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2**-6)))) / 8
    bad = keep & (diff > step * 1.001)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} q elements off by more than one fp8 step: v {v[bad][:3]}, "
        f"q {q.float()[bad][:3]}, want {v.to(FP8).float()[bad][:3]}"
    )


def inputs(world, t, h, seed, *, w_dtype=DT):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, h, generator=g).to(DT) for _ in range(world)]
    res = (torch.randn(t, h, generator=g) * 2).to(DT)
    w = (torch.randn(h, generator=g) * 0.3).to(w_dtype)
    return xs, res, w


def reference(xs, res, w, *, offset, group_size, layout, quantize):
    h = xs[0].float()
    for x in xs[1:]:
        h = h + x.float()
    return norm_quant_reference(
        h,
        res,
        w,
        EPS,
        out_dtype=DT,
        group_size=group_size,
        weight_offset=offset,
        emit_bf16=True,
        scale_layout=layout,
        quant_dtype=FP8,
        quantize=quantize,
    )


# case id -> the check; filled below in the order the cases run
CASES: dict[str, Callable[[], None]] = {}


def _case(case_id: str, fn: Callable[..., None], **params) -> None:
    assert case_id not in CASES, case_id
    CASES[case_id] = functools.partial(fn, **params)


def single(t, h, gs, layout, emit, has_res, quantize, w_dtype, seed):
    xs, res, w = inputs(1, t, h, seed=seed, w_dtype=w_dtype)
    res = res if has_res else None
    ref = reference(xs, res, w, offset=1.0, group_size=gs, layout=layout, quantize=quantize)
    out = empty_outputs(
        t, h, DT, "cpu", group_size=gs, quantize=quantize, emit_bf16=emit, scale_layout=layout, quant_dtype=FP8
    )
    poison(out)
    add_rmsnorm_quant(
        xs[0],
        res,
        w,
        EPS,
        weight_offset=1.0,
        group_size=gs,
        quantize=quantize,
        emit_bf16=emit,
        scale_layout=layout,
        quant_dtype=FP8,
        outputs=out,
    )
    check(out, ref, quantize=quantize, emit=emit, group_size=gs, what=f"single {t}x{h}/{gs} {layout}")


def _single_cases():
    n = 0
    for t, h, gs in [(5, 256, 128), (3, 384, 128), (4, 192, 64), (2, 288, 96), (1, 128, 128), (0, 256, 128)]:
        for layout in ("row", "col"):
            for emit, has_res, quantize, w_dtype in [
                (True, True, True, DT),
                (False, False, True, torch.float32),
                (False, True, False, DT),
            ]:
                _case(
                    f"single-{t}x{h}-g{gs}-{layout}-emit{int(emit)}-res{int(has_res)}-quant{int(quantize)}",
                    single,
                    t=t,
                    h=h,
                    gs=gs,
                    layout=layout,
                    emit=emit,
                    has_res=has_res,
                    quantize=quantize,
                    w_dtype=w_dtype,
                    seed=n,
                )
                n += 1


def single_hidden_size(t, h, layout, emit, quantize, slice_groups, seed):
    xs, res, w = inputs(1, t, h, seed=seed)
    ref = reference(xs, res, w, offset=1.0, group_size=128, layout=layout, quantize=quantize)
    out = empty_outputs(
        t, h, DT, "cpu", group_size=128, quantize=quantize, emit_bf16=emit, scale_layout=layout, quant_dtype=FP8
    )
    poison(out)
    add_rmsnorm_quant(
        xs[0],
        res,
        w,
        EPS,
        weight_offset=1.0,
        group_size=128,
        quantize=quantize,
        emit_bf16=emit,
        scale_layout=layout,
        quant_dtype=FP8,
        outputs=out,
        slice_groups=slice_groups,
    )
    check(
        out,
        ref,
        quantize=quantize,
        emit=emit,
        group_size=128,
        what=f"single {t}x{h} {layout} emit={emit} quantize={quantize} slice={slice_groups}",
    )


def _single_hidden_size_cases():
    """Qwen3.5's hidden sizes and others whose group counts are not powers of two (a padded
    row tile: 20 groups in 32, 5 in 8, 15 in 16, 31 in 32 ...), both scale layouts, normed
    emitted or not, quantize off; one program per row (slice None: the default) and a row
    split over programs of 4 or 2 groups (the last slice partly masked where the groups do
    not divide: 5, 7, 15, 31 groups; 2-4 programs per row sum the row's squares as a
    butterfly, 5 or more read the row again: both forms of add_rmsnorm_quant)."""
    n = 0
    combos = [("row", False, True, None), ("col", True, True, 4), ("row", True, False, 2)]
    sizes = [(1, 2048), (3, 2560), (2, 3072), (3, 5120), (1, 6144), (2, 7168), (3, 640), (2, 896), (3, 1920), (2, 3968)]
    for t, h in sizes:
        for layout, emit, quantize, slice_groups in combos:
            _case(
                f"hidden-{t}x{h}-{layout}-emit{int(emit)}-quant{int(quantize)}-slice{slice_groups or 'row'}",
                single_hidden_size,
                t=t,
                h=h,
                layout=layout,
                emit=emit,
                quantize=quantize,
                slice_groups=slice_groups,
                seed=1000 + n,
            )
            n += 1


def group_quant_case(t, h, gs, layout, seed):
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(seed)).to(DT) * 3
    q, s = group_quant(x, group_size=gs, scale_layout=layout, quant_dtype=FP8)
    rq, rs = group_quant_reference(x, gs, FP8, layout)
    assert s.stride() == rs.stride()
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    v = (x.float().view(t, h // gs, gs) / rs.unsqueeze(-1)).clamp(-448, 448).view(t, h)
    keep = ~carry_positions(v)
    step = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2**-6)))) / 8
    bad = keep & ((q.float() - rq.float()).abs() > step * 1.001)  # ties: one step
    assert not bad.any(), f"group quant {t}x{h}/{gs}: {v[bad][:4]} {q.float()[bad][:4]} {rq.float()[bad][:4]}"


def group_quant_special_values():
    """Signed zeros, an all-zero group (the amax floor) and an infinite amax: q = x / scale
    as the reference divides (x / inf = 0 for the finite x of that group; -0 stays -0),
    which the quant's reciprocal-and-correction division must keep. (The infinite element's
    q is NaN, which the interpreter's fp8 cast does not keep: tests/gpu checks it.)"""
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(7)).to(DT)
    x[0, :128] = 0.0
    x[0, 5] = -0.0
    x[0, 200] = float("inf")
    x[1, 300] = -0.0
    q, s = group_quant(x, group_size=128, scale_layout="row", quant_dtype=FP8)
    rq, rs = group_quant_reference(x, 128, FP8, "row")
    assert torch.equal(s.isinf(), rs.isinf()) and s[0, 1].isinf()
    torch.testing.assert_close(s[~s.isinf()], rs[~rs.isinf()], rtol=0, atol=0)
    finite = torch.ones_like(x, dtype=torch.bool)
    finite[0, 200] = False
    assert not q.float()[finite].isnan().any() and rq.float()[0, 200].isnan()
    assert (q.float()[0, 128:256][finite[0, 128:256]] == 0).all()  # x / inf
    for r, c in [(0, 5), (1, 300)]:  # -0 keeps its sign bit
        assert q[r, c].view(torch.uint8) == rq[r, c].view(torch.uint8) == 0x80, (r, c)
    assert (q[0, :128].view(torch.uint8) & 0x7F == 0).all()


def _group_quant_cases():
    n = 0
    for t, h, gs in [(5, 384, 128), (3, 288, 96), (2, 256, 16), (2, 5120, 128), (3, 640, 128)]:
        for layout in ("row", "col"):
            _case(f"group-quant-{t}x{h}-g{gs}-{layout}", group_quant_case, t=t, h=h, gs=gs, layout=layout, seed=n)
            n += 1
    _case("group-quant-special-values", group_quant_special_values)


def run_ranks(fn_per_phase, world, phases):
    for ph in phases:
        for r in range(world):
            fn_per_phase(r, ph)


# One emulated workspace per (kernel family, world size), shared by that family's cases in order.
_workspaces: dict[tuple[str, int], list] = {}


def _peers(family: str, world: int):
    if (family, world) not in _workspaces:
        if family == "twoshot":
            peers = emulated_peers(world, stage_cap=17 * 256, out_cap=(17 * 256) // world + 640, dtype=DT, max_grid=2)
        else:
            peers = emulated_peers(world, stage_cap=16384, ll_cap=8192, dtype=DT, max_grid=4)
        _workspaces[(family, world)] = peers
    return _workspaces[(family, world)]


def _run_counted(peers, world, step, phases):
    """Run one call on every emulated rank; return each rank's call-counter advance."""
    before = [int(p.ctl[0]) for p in peers]
    run_ranks(step, world, phases)
    return [int(peers[r].ctl[0]) - before[r] for r in range(world)]


def oneshot(kernel_name, world, t, h, layout, emit, has_res, quantize, seed):
    kernel = {"oneshot": oneshot_ar_norm_quant, "oneshot-ll": oneshot_ll_ar_norm_quant}[kernel_name]
    peers = _peers(kernel_name, world)
    xs, res, w = inputs(world, t, h, seed=seed)
    res = res if has_res else None
    ref = reference(xs, res, w, offset=1.0, group_size=128, layout=layout, quantize=quantize)
    outs = [
        empty_outputs(
            t, h, DT, "cpu", group_size=128, quantize=quantize, emit_bf16=emit, scale_layout=layout, quant_dtype=FP8
        )
        for _ in range(world)
    ]
    for o in outs:
        poison(o)

    def step(r, ph):
        kernel(
            xs[r],
            res,
            w,
            EPS,
            peers[r],
            weight_offset=1.0,
            quantize=quantize,
            emit_bf16=emit,
            scale_layout=layout,
            phase=ph,
            outputs=outs[r],
        )

    advanced = _run_counted(peers, world, step, (1, 2))
    for r in range(world):
        check(
            outs[r],
            ref,
            quantize=quantize,
            emit=emit,
            group_size=128,
            what=f"{kernel.__name__} W={world} rank {r} {t}x{h} {layout}",
        )
        assert advanced[r] == 1, "call counter did not advance once per call"
        assert int(peers[r].ctl[1]) == 0, "ticket not reset"
        assert int(peers[r].ctl[2]) == 0, "a wait found data missing"


def bare_all_reduce(kernel_name, world, t, h):
    """The bare all-reduce (the benchmark's floor) on the family's workspace."""
    bare_kernel = {"oneshot": oneshot_all_reduce, "oneshot-ll": oneshot_ll_all_reduce}[kernel_name]
    peers = _peers(kernel_name, world)
    xs, _, _ = inputs(world, t, h, seed=999)
    outs = [torch.empty(t, h, dtype=DT) for _ in range(world)]
    run_ranks(lambda r, ph: bare_kernel(xs[r], peers[r], phase=ph, out=outs[r]), world, (1, 2))
    want = sum(x.float() for x in xs).to(DT)
    for r in range(world):
        assert torch.equal(outs[r], want), f"bare all-reduce W={world} rank {r} {t}x{h}"


def _oneshot_cases(kernel_name):
    n = 0
    for world in (2, 4, 8):
        cases = [
            (1, 256, "row", True, True, True),
            (5, 128, "col", False, True, True),
            (9, 256, "row", False, False, True),
            (7, 256, "col", True, True, False),
            (4, 256, "row", True, True, True),
        ]
        # rows in several parts: 640 = 4 + 1 groups of 128, 1920 = 8 + 4 + 2 + 1, 5120 = 32 + 8
        cases += {
            2: [
                (3, 640, "col", True, True, True),
                (2, 1920, "row", False, True, True),
                (3, 5120, "row", False, True, True),
            ],
            4: [(2, 1920, "col", True, True, False)],
            8: [],
        }[world]
        for i, (t, h, layout, emit, has_res, quantize) in enumerate(cases):
            _case(
                f"{kernel_name}-W{world}-{i}-{t}x{h}-{layout}-emit{int(emit)}-res{int(has_res)}-quant{int(quantize)}",
                oneshot,
                kernel_name=kernel_name,
                world=world,
                t=t,
                h=h,
                layout=layout,
                emit=emit,
                has_res=has_res,
                quantize=quantize,
                seed=100 + n,
            )
            n += 1
        for t, h in [(6, 256)] + ([(2, 1920)] if world == 2 else []):
            _case(
                f"{kernel_name}-W{world}-bare-{t}x{h}", bare_all_reduce, kernel_name=kernel_name, world=world, t=t, h=h
            )
            n += 1


def twoshot(world, t, h, layout, emit, has_res, quantize, offset, seed):
    peers = _peers("twoshot", world)
    xs, res, w = inputs(world, t, h, seed=seed)
    res = res if has_res else None
    ref = reference(xs, res, w, offset=offset, group_size=128, layout=layout, quantize=quantize)
    outs = [
        empty_outputs(
            t, h, DT, "cpu", group_size=128, quantize=quantize, emit_bf16=emit, scale_layout=layout, quant_dtype=FP8
        )
        for _ in range(world)
    ]
    for o in outs:  # poison: every element must be written
        poison(o)

    def step(r, ph):
        twoshot_ar_norm_quant(
            xs[r],
            res,
            w,
            EPS,
            peers[r],
            weight_offset=offset,
            quantize=quantize,
            emit_bf16=emit,
            scale_layout=layout,
            phase=ph,
            outputs=outs[r],
        )

    advanced = _run_counted(peers, world, step, (1, 2, 3))
    for r in range(world):
        check(
            outs[r],
            ref,
            quantize=quantize,
            emit=emit,
            group_size=128,
            what=f"two-shot W={world} rank {r} {t}x{h} {layout}",
        )
        assert advanced[r] == 1


def _twoshot_cases():
    n = 0
    for world in (2, 4, 8):
        cases = [
            (1, 256, "row", True, True, True),
            (5, 256, "col", False, True, True),
            (17, 256, "row", True, False, True),
            (16, 128, "col", False, True, True),
            (7, 256, "row", True, True, False),
            (3, 256, "col", True, True, True),
        ]
        if world == 2:
            cases.append((5, 640, "row", True, True, True))  # 4 + 1 groups: a row in two parts
        for i, (t, h, layout, emit, has_res, quantize) in enumerate(cases):
            _case(
                f"twoshot-W{world}-{i}-{t}x{h}-{layout}-emit{int(emit)}-res{int(has_res)}-quant{int(quantize)}",
                twoshot,
                world=world,
                t=t,
                h=h,
                layout=layout,
                emit=emit,
                has_res=has_res,
                quantize=quantize,
                offset=0.0 if n % 2 else 1.0,
                seed=200 + n,
            )
            n += 1


_single_cases()
_single_hidden_size_cases()
_group_quant_cases()
_oneshot_cases("oneshot")
_oneshot_cases("oneshot-ll")
_twoshot_cases()


def main(ids: list[str]) -> int:
    """Run the cases ``ids`` (all when empty) in CASES' order; one JSON line per case."""
    assert INTERPRETED, "run with TRITON_INTERPRET=1"
    unknown = sorted(set(ids) - set(CASES))
    if unknown:
        print(f"unknown case ids: {unknown}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    wanted = set(ids) or set(CASES)
    failed = 0
    for case_id, fn in CASES.items():
        if case_id not in wanted:
            continue
        t0 = time.monotonic()
        try:
            fn()
            result = {"id": case_id, "ok": True}
        except Exception:  # noqa: BLE001 - reported per case, the next case runs
            result = {"id": case_id, "ok": False, "error": traceback.format_exc()}
            failed += 1
        result["seconds"] = round(time.monotonic() - t0, 2)
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
