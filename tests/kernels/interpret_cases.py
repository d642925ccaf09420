"""The Triton kernels under the Triton interpreter, ranks emulated on one CPU device.

Run as a script with TRITON_INTERPRET=1 (test_kernels_interpreted.py does): the
interpreter must be on before Triton decorates the kernels, so this cannot share a
process with tests that import them normally. Multi-GPU kernels run in their emulation
phases (every rank's copy-in, then every rank's reduce, ...), which is the order their
barriers enforce on GPUs, so this checks indexing, masking, chunking, layouts, the
all-reduce order and the call parity for world sizes 2, 4 and 8 without a GPU.

Interpreter quirks this accounts for: float32 -> bf16 casts truncate (so cases use
float16, which it rounds correctly), and float32 -> fp8 casts that round up into the
next power of two come out wrong (those elements are left out of the q comparison;
tests/gpu checks every element on real hardware).
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from support.emulated_symm import emulated_peers  # noqa: E402
from vllm_rocm_fused.kernels.add_rmsnorm_quant import add_rmsnorm_quant  # noqa: E402
from vllm_rocm_fused.kernels.group_quant import group_quant  # noqa: E402
from vllm_rocm_fused.kernels.launch import empty_outputs  # noqa: E402
from vllm_rocm_fused.kernels.oneshot_ar_norm_quant import oneshot_all_reduce, oneshot_ar_norm_quant  # noqa: E402
from vllm_rocm_fused.kernels.oneshot_ll_ar_norm_quant import oneshot_ll_all_reduce  # noqa: E402
from vllm_rocm_fused.kernels.oneshot_ll_ar_norm_quant import oneshot_ll_ar_norm_quant  # noqa: E402
from vllm_rocm_fused.kernels.twoshot_ar_norm_quant import twoshot_ar_norm_quant  # noqa: E402
from vllm_rocm_fused.ops.reference import group_quant as ref_group_quant  # noqa: E402
from vllm_rocm_fused.ops.reference import norm_quant_reference  # noqa: E402

FP8 = torch.float8_e4m3fn
DT = torch.float16
EPS = 1e-6


def carry_positions(v: torch.Tensor) -> torch.Tensor:
    """Where the interpreter's float32 -> fp8 cast may be off by a factor of two: values
    in the top half-step below a power of two round up onto it (and values just above one
    may fall into that zone after a one-ulp change of normed); margins included. Ties it
    rounds away from zero: at most one step off, which the check allows."""
    lg = torch.log2(v.abs().clamp(min=2 ** -9))
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
        torch.testing.assert_close(normed, ref.normed, rtol=2 ** -10, atol=1e-6, msg=lambda m: f"{what}: {m}")
        return
    assert scale.stride() == ref.scale.stride(), f"{what}: scale strides {scale.stride()} != {ref.scale.stride()}"
    torch.testing.assert_close(scale, ref.scale, rtol=2 ** -9, atol=0, msg=lambda m: f"{what}: scale {m}")
    if emit:
        torch.testing.assert_close(normed, ref.normed, rtol=2 ** -10, atol=1e-6, msg=lambda m: f"{what}: {m}")
    else:
        assert normed is None
    t, h = q.shape
    ref_n = ref.normed if ref.normed is not None else None
    v = (ref_n.float().view(t, h // group_size, group_size) / ref.scale.unsqueeze(-1)).clamp(-448, 448).view(t, h)
    keep = ~carry_positions(v)
    diff = (q.float() - v.to(FP8).float()).abs()
    step = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2 ** -6)))) / 8
    bad = keep & (diff > step * 1.001)
    assert not bad.any(), (f"{what}: {int(bad.sum())} q elements off by more than one fp8 step: v {v[bad][:3]}, "
                           f"q {q.float()[bad][:3]}, want {v.to(FP8).float()[bad][:3]}")


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
    return norm_quant_reference(h, res, w, EPS, out_dtype=DT, group_size=group_size, weight_offset=offset,
                                emit_bf16=True, scale_layout=layout, quant_dtype=FP8, quantize=quantize)


def case_single():
    n = 0
    for t, h, gs in [(5, 256, 128), (3, 384, 128), (4, 192, 64), (2, 288, 96), (1, 128, 128), (0, 256, 128)]:
        for layout in ("row", "col"):
            for emit, has_res, quantize, w_dtype in [(True, True, True, DT), (False, False, True, torch.float32),
                                                     (False, True, False, DT)]:
                xs, res, w = inputs(1, t, h, seed=n, w_dtype=w_dtype)
                res = res if has_res else None
                ref = reference(xs, res, w, offset=1.0, group_size=gs, layout=layout, quantize=quantize)
                out = empty_outputs(t, h, DT, "cpu", group_size=gs, quantize=quantize, emit_normed=emit,
                                    scale_layout=layout, quant_dtype=FP8)
                poison(out)
                add_rmsnorm_quant(xs[0], res, w, EPS, weight_offset=1.0, group_size=gs, quantize=quantize,
                                  emit_normed=emit, scale_layout=layout, quant_dtype=FP8, outputs=out)
                check(out, ref, quantize=quantize, emit=emit, group_size=gs, what=f"single {t}x{h}/{gs} {layout}")
                n += 1
    return n


def case_single_hidden_sizes():
    """Qwen3.5's hidden sizes and others whose group counts are not powers of two (parts
    16+4, 16+8, 32+8, 32+16, 32+16+8; small rows of 2 to 4 parts and a padded fourth part),
    both scale layouts, normed emitted or not, quantize off, 1 and 2 rows per program."""
    n = 0
    combos = [("row", False, True, 1), ("col", True, True, 2), ("row", True, False, 2)]
    sizes = [(1, 2048), (3, 2560), (2, 3072), (3, 5120), (1, 6144), (2, 7168),
             (3, 640), (2, 896), (3, 1920), (2, 3968)]
    for t, h in sizes:
        for layout, emit, quantize, rows in combos:
            xs, res, w = inputs(1, t, h, seed=1000 + n)
            ref = reference(xs, res, w, offset=1.0, group_size=128, layout=layout, quantize=quantize)
            out = empty_outputs(t, h, DT, "cpu", group_size=128, quantize=quantize, emit_normed=emit,
                                scale_layout=layout, quant_dtype=FP8)
            poison(out)
            add_rmsnorm_quant(xs[0], res, w, EPS, weight_offset=1.0, group_size=128, quantize=quantize,
                              emit_normed=emit, scale_layout=layout, quant_dtype=FP8, outputs=out,
                              rows_per_program=rows)
            check(out, ref, quantize=quantize, emit=emit, group_size=128,
                  what=f"single {t}x{h} {layout} emit={emit} quantize={quantize} rows={rows}")
            n += 1
    return n


def case_group_quant():
    n = 0
    for t, h, gs in [(5, 384, 128), (3, 288, 96), (2, 256, 16), (2, 5120, 128), (3, 640, 128)]:
        for layout in ("row", "col"):
            x = torch.randn(t, h).to(DT) * 3
            q, s = group_quant(x, group_size=gs, scale_layout=layout, quant_dtype=FP8)
            rq, rs = ref_group_quant(x, gs, FP8, layout)
            assert s.stride() == rs.stride()
            torch.testing.assert_close(s, rs, rtol=0, atol=0)
            v = (x.float().view(t, h // gs, gs) / rs.unsqueeze(-1)).clamp(-448, 448).view(t, h)
            keep = ~carry_positions(v)
            step = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2 ** -6)))) / 8
            bad = keep & ((q.float() - rq.float()).abs() > step * 1.001)  # ties: one step
            assert not bad.any(), f"group quant {t}x{h}/{gs}: {v[bad][:4]} {q.float()[bad][:4]} {rq.float()[bad][:4]}"
            n += 1
    return n


def run_ranks(fn_per_phase, world, phases):
    for ph in phases:
        for r in range(world):
            fn_per_phase(r, ph)


def case_oneshot():
    return _oneshot_cases(oneshot_ar_norm_quant, oneshot_all_reduce)


def case_oneshot_ll():
    return _oneshot_cases(oneshot_ll_ar_norm_quant, oneshot_ll_all_reduce)


def _oneshot_cases(kernel, bare_kernel):
    n = 0
    for world in (2, 4, 8):
        peers = emulated_peers(world, stage_cap=16384, ll_cap=8192, dtype=DT, max_grid=4)
        calls = 0
        cases = [(1, 256, "row", True, True, True), (5, 128, "col", False, True, True),
                 (9, 256, "row", False, False, True), (7, 256, "col", True, True, False),
                 (4, 256, "row", True, True, True)]
        # rows in several parts: 640 = 4 + 1 groups of 128, 1920 = 8 + 4 + 2 + 1, 5120 = 32 + 8
        cases += {2: [(3, 640, "col", True, True, True), (2, 1920, "row", False, True, True),
                      (3, 5120, "row", False, True, True)],
                  4: [(2, 1920, "col", True, True, False)], 8: []}[world]
        for t, h, layout, emit, has_res, quantize in cases:
            xs, res, w = inputs(world, t, h, seed=100 + n)
            res = res if has_res else None
            ref = reference(xs, res, w, offset=1.0, group_size=128, layout=layout, quantize=quantize)
            outs = [empty_outputs(t, h, DT, "cpu", group_size=128, quantize=quantize, emit_normed=emit,
                                  scale_layout=layout, quant_dtype=FP8) for _ in range(world)]
            for o in outs:
                poison(o)

            def step(r, ph):
                kernel(xs[r], res, w, EPS, peers[r], weight_offset=1.0, quantize=quantize,
                       emit_normed=emit, scale_layout=layout, phase=ph, outputs=outs[r])

            run_ranks(step, world, (1, 2))
            calls += 1
            for r in range(world):
                check(outs[r], ref, quantize=quantize, emit=emit, group_size=128,
                      what=f"{kernel.__name__} W={world} rank {r} {t}x{h} {layout}")
                assert int(peers[r].ctl[0]) == calls, "call counter did not advance once per call"
                assert int(peers[r].ctl[1]) == 0, "ticket not reset"
                assert int(peers[r].ctl[2]) == 0, "a wait found data missing"
            n += 1
        # the bare all-reduce (the benchmark's floor) on the same workspace
        for t, h in [(6, 256)] + ([(2, 1920)] if world == 2 else []):
            xs, _, _ = inputs(world, t, h, seed=999)
            outs = [torch.empty(t, h, dtype=DT) for _ in range(world)]
            run_ranks(lambda r, ph: bare_kernel(xs[r], peers[r], phase=ph, out=outs[r]), world, (1, 2))
            want = sum(x.float() for x in xs).to(DT)
            for r in range(world):
                assert torch.equal(outs[r], want), f"bare all-reduce W={world} rank {r} {t}x{h}"
            n += 1
    return n


def case_twoshot():
    n = 0
    for world in (2, 4, 8):
        peers = emulated_peers(world, stage_cap=17 * 256, out_cap=(17 * 256) // world + 640, dtype=DT, max_grid=2)
        calls = 0
        cases = [(1, 256, "row", True, True, True), (5, 256, "col", False, True, True),
                 (17, 256, "row", True, False, True), (16, 128, "col", False, True, True),
                 (7, 256, "row", True, True, False), (3, 256, "col", True, True, True)]
        if world == 2:
            cases.append((5, 640, "row", True, True, True))  # 4 + 1 groups: a row in two parts
        for t, h, layout, emit, has_res, quantize in cases:
            xs, res, w = inputs(world, t, h, seed=200 + n)
            res = res if has_res else None
            ref = reference(xs, res, w, offset=0.0 if n % 2 else 1.0, group_size=128, layout=layout, quantize=quantize)
            outs = [empty_outputs(t, h, DT, "cpu", group_size=128, quantize=quantize, emit_normed=emit,
                                  scale_layout=layout, quant_dtype=FP8) for _ in range(world)]
            for o in outs:  # poison: every element must be written
                poison(o)

            def step(r, ph):
                twoshot_ar_norm_quant(xs[r], res, w, EPS, peers[r], weight_offset=0.0 if n % 2 else 1.0,
                                      quantize=quantize, emit_normed=emit, scale_layout=layout, phase=ph,
                                      outputs=outs[r])

            run_ranks(step, world, (1, 2, 3))
            calls += 1
            for r in range(world):
                check(outs[r], ref, quantize=quantize, emit=emit, group_size=128,
                      what=f"two-shot W={world} rank {r} {t}x{h} {layout}")
                assert int(peers[r].ctl[0]) == calls
            n += 1
    return n


def main() -> int:
    torch.manual_seed(0)
    total = 0
    for case in (case_single, case_single_hidden_sizes, case_group_quant, case_oneshot, case_oneshot_ll, case_twoshot):
        k = case()
        print(f"{case.__name__}: {k} cases ok", flush=True)
        total += k
    print(f"all {total} interpreted cases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
