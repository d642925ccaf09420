"""The CUDA backend on one GPU (TP=1 and the kernels it shares with TP>1), against the
float64 oracle and the portable reference, on fresh random inputs."""

import sys
from pathlib import Path

import pytest
import torch

from support.cuda_workers import poison
from support.gpu import gpu
from support.oracle import assert_matches_oracle
from vllm_rocm_fused.backends.cuda.backend import execute
from vllm_rocm_fused.backends.cuda.dispatch import LOCAL, DispatchPlan
from vllm_rocm_fused.kernels.add_rmsnorm_quant import add_rmsnorm_quant
from vllm_rocm_fused.kernels.group_quant import group_quant
from vllm_rocm_fused.kernels.launch import empty_outputs
from vllm_rocm_fused.ops import backends, fused_allreduce_rmsnorm_quant
from vllm_rocm_fused.ops.fused import make_spec
from vllm_rocm_fused.ops.reference import FusedNormQuantOutput, group_quant_reference, norm_quant_reference

pytestmark = gpu

FP8 = torch.float8_e4m3fn
DEV = "cuda"
EPS = 1e-6


def inputs(t, h, *, dtype=torch.bfloat16, w_dtype=torch.bfloat16, seed=None):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    x = torch.randn(t, h, device=DEV, generator=g).to(dtype)
    res = (torch.randn(t, h, device=DEV, generator=g) * 2).to(dtype)
    w = (torch.randn(h, device=DEV, generator=g) * 0.3).to(w_dtype)
    return x, res, w


def poisoned(t, h, dtype, **kw):
    return poison(empty_outputs(t, h, dtype, torch.device(DEV), **kw))


def all_written(outs):
    return all(t is None or not t.float().isnan().any() for t in outs)


CASES = [
    # tokens, hidden, layout, emit, residual, weight_offset, x dtype, weight dtype
    (1, 4096, "row", False, True, 1.0, torch.bfloat16, torch.bfloat16),
    (3, 2048, "col", True, True, 0.0, torch.bfloat16, torch.float32),
    (17, 5120, "row", True, False, 1.0, torch.bfloat16, torch.bfloat16),
    (64, 4096, "col", False, True, 1.0, torch.float16, torch.float16),
    (257, 2048, "row", False, True, 1.0, torch.bfloat16, torch.float32),
    (1000, 5120, "col", True, True, 1.0, torch.bfloat16, torch.bfloat16),
    (5, 384, "row", True, True, 0.0, torch.bfloat16, torch.bfloat16),
    (2, 128, "col", False, True, 1.0, torch.float16, torch.float32),
    (4096, 4096, "row", False, True, 1.0, torch.bfloat16, torch.bfloat16),
    # hidden sizes whose 128-groups are not a power of two (rows in 2-3 parts), and 8192
    (2, 2560, "row", True, True, 1.0, torch.bfloat16, torch.bfloat16),
    (5, 3072, "col", False, True, 1.0, torch.bfloat16, torch.float32),
    (9, 6144, "row", False, True, 1.0, torch.bfloat16, torch.bfloat16),
    (33, 7168, "col", True, True, 1.0, torch.bfloat16, torch.bfloat16),
    (1, 8192, "row", False, True, 1.0, torch.bfloat16, torch.bfloat16),
    (2049, 5120, "row", False, True, 1.0, torch.bfloat16, torch.bfloat16),
    (700, 7168, "row", False, True, 1.0, torch.float16, torch.float16),
]


@pytest.mark.parametrize("t, h, layout, emit, has_res, offset, dtype, w_dtype", CASES)
def test_op_matches_oracle(cuda_only, t, h, layout, emit, has_res, offset, dtype, w_dtype):
    for _ in range(2):  # fresh inputs each time
        x, res, w = inputs(t, h, dtype=dtype, w_dtype=w_dtype)
        res = res if has_res else None
        out = fused_allreduce_rmsnorm_quant(
            x, res, w, EPS, weight_offset=offset, emit_bf16=emit, scale_layout=layout, backend="cuda"
        )
        assert_matches_oracle(
            out,
            x,
            res,
            w,
            EPS,
            out_dtype=dtype,
            group_size=128,
            weight_offset=offset,
            fp8_dtype=FP8,
            emit_bf16=emit,
            scale_layout=layout,
        )
    assert backends.backend_counters() == {"cuda/fused-1": 2}


@pytest.mark.parametrize(
    "t, h", [(1, 4096), (33, 5120), (300, 2048), (3, 2560), (17, 3072), (2, 6144), (65, 7168), (5, 8192)]
)
@pytest.mark.parametrize("layout", ["row", "col"])
def test_every_output_element_is_written(t, h, layout):
    x, res, w = inputs(t, h)
    for quantize, emit in [(True, True), (True, False), (False, True)]:
        outs = poisoned(
            t,
            h,
            torch.bfloat16,
            group_size=128,
            quantize=quantize,
            emit_bf16=emit,
            scale_layout=layout,
            quant_dtype=FP8,
        )
        add_rmsnorm_quant(
            x, res, w, EPS, weight_offset=1.0, quantize=quantize, emit_bf16=emit, scale_layout=layout, outputs=outs
        )
        assert all_written(outs)
        assert_matches_oracle(
            FusedNormQuantOutput(*outs),
            x,
            res,
            w,
            EPS,
            out_dtype=torch.bfloat16,
            group_size=128,
            weight_offset=1.0,
            fp8_dtype=FP8,
            emit_bf16=emit,
            scale_layout=layout,
        )


@pytest.mark.parametrize("h", [5120, 7168])
def test_every_launch_shape_the_sweep_times(h):
    """Each warps x slice candidate of benchmarks/sweep_local_launch.py (the shapes the
    dispatch table may pick: a row over 1 to 64 programs), at token counts that leave the
    last program's slice partly masked (7168 = 56 groups: slices of 16, 32 and 64)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from measurement import local_candidates

    for warps, slice_groups in local_candidates(h):
        for t in (1, 7, 130):
            x, res, w = inputs(t, h)
            outs = poisoned(
                t,
                h,
                torch.bfloat16,
                group_size=128,
                quantize=True,
                emit_bf16=False,
                scale_layout="row",
                quant_dtype=FP8,
            )
            add_rmsnorm_quant(
                x, res, w, EPS, weight_offset=1.0, outputs=outs, num_warps=warps, slice_groups=slice_groups
            )
            assert all_written(outs), (warps, slice_groups, t)
            assert_matches_oracle(
                FusedNormQuantOutput(*outs),
                x,
                res,
                w,
                EPS,
                out_dtype=torch.bfloat16,
                group_size=128,
                weight_offset=1.0,
                fp8_dtype=FP8,
                emit_bf16=False,
            )


def test_norm_only_and_two_kernel_paths(cuda_only):
    x, res, w = inputs(9, 4096)
    out = fused_allreduce_rmsnorm_quant(x, res, w, EPS, weight_offset=1.0, quantize=False, backend="cuda")
    assert out.q is None and out.scale is None
    assert_matches_oracle(
        out, x, res, w, EPS, out_dtype=torch.bfloat16, group_size=128, weight_offset=1.0, fp8_dtype=FP8, emit_bf16=False
    )
    for emit in (False, True):
        spec = make_spec(
            x,
            res,
            world_size=1,
            group_size=128,
            weight_offset=1.0,
            emit_bf16=emit,
            scale_layout="col",
            quant_dtype=FP8,
            quantize=True,
        )
        q, s, r, n = execute(DispatchPlan(LOCAL, "fused-2", False), x, res, w, EPS, None, spec, None)
        assert_matches_oracle(
            FusedNormQuantOutput(q, s, r, n),
            x,
            res,
            w,
            EPS,
            out_dtype=torch.bfloat16,
            group_size=128,
            weight_offset=1.0,
            fp8_dtype=FP8,
            emit_bf16=emit,
            scale_layout="col",
        )


@pytest.mark.parametrize("t, h, gs", [(7, 4096, 128), (5, 288, 96), (3, 4032, 96), (2, 256, 16), (257, 7168, 128)])
@pytest.mark.parametrize("layout", ["row", "col"])
def test_group_quant_kernel_matches_reference(t, h, gs, layout):
    x = (torch.randn(t, h, device=DEV) * 3).to(torch.bfloat16)
    q, s = group_quant(x, group_size=gs, scale_layout=layout)
    rq, rs = group_quant_reference(x, gs, FP8, layout)
    assert s.stride() == rs.stride()
    # torch on CUDA divides by a scalar as a multiplication by its reciprocal (one ulp off
    # the IEEE quotient the kernel computes, as the CPU reference does)
    torch.testing.assert_close(s, rs, rtol=2**-23, atol=0)
    same = (s == rs).repeat_interleave(gs, dim=1)
    assert torch.equal(q.view(torch.uint8)[same], rq.view(torch.uint8)[same])
    want = (x.float().view(t, -1, gs) / s.unsqueeze(-1)).clamp(-448, 448).view(t, h).to(FP8)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


def test_group_quant_special_values_divide_as_ieee():
    """The quant's reciprocal-and-correction division (row_math.quant_tile) against torch's IEEE
    division on values that stress it: zeros of both signs, an all-zero group (the amax floor),
    an infinite amax (x / inf: 0, and NaN for the inf itself), tiny and huge magnitudes, and
    every bf16 of one binade at once."""
    x = (torch.randn(4, 1024, device=DEV) * 3).to(torch.bfloat16)
    x[0, :128] = 0.0
    x[0, 5] = -0.0
    x[0, 200] = float("inf")
    x[0, 210] = -0.0
    x[1, :128] *= 1e-30
    x[1, 128:256] *= 1e30
    x[2] = (1.0 + torch.arange(1024, device=DEV) % 128 / 128.0).to(torch.bfloat16) * torch.where(
        torch.arange(1024, device=DEV) % 3 == 0, -1.0, 1.0
    )
    q, s = group_quant(x, group_size=128)
    want_s = (x.float().view(4, -1, 128).abs().amax(-1).clamp(min=1e-10) / 448.0).float()
    assert torch.equal(s.isinf(), want_s.isinf()) and s[0, 1].isinf()
    torch.testing.assert_close(s[~s.isinf()], want_s[~want_s.isinf()], rtol=2**-23, atol=0)
    want = (x.float().view(4, -1, 128) / s.unsqueeze(-1)).clamp(-448, 448).view(4, 1024).to(FP8)
    assert q.float()[0, 200].isnan() and want.float()[0, 200].isnan()
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[0, 200] = False
    assert torch.equal(q.view(torch.uint8)[keep], want.view(torch.uint8)[keep])  # -0 stays -0 too
    assert q[0, 5].view(torch.uint8) == 0x80


def test_zero_tokens(cuda_only):
    x, res, w = inputs(0, 4096)
    for layout in ("row", "col"):
        out = fused_allreduce_rmsnorm_quant(x, res, w, EPS, emit_bf16=True, scale_layout=layout, backend="cuda")
        assert out.q.shape == (0, 4096) and out.scale.shape == (0, 32) and out.residual.shape == (0, 4096)
        assert out.normed.shape == (0, 4096)


def test_saturating_and_all_zero_groups(cuda_only):
    t, h = 3, 4096
    x, res, w = inputs(t, h)
    x[0, :128] = 0
    res[0, :128] = 0  # row 0, group 0: all zero
    x[0, 128:256] = 3e4  # row 0, group 1: huge, saturates the norm's range of the row
    x[1] = 0
    res[1] = 0  # row 1: all zero
    w = torch.ones_like(w)
    out = fused_allreduce_rmsnorm_quant(x, res, w, EPS, backend="cuda")
    ref = norm_quant_reference(x, res, w, EPS, out_dtype=torch.bfloat16)
    floor = torch.tensor(1e-10, dtype=torch.float32) / 448.0
    assert out.scale[0, 0].item() == floor.item() and (out.q[0, :128].float() == 0).all()
    assert out.q[0, 128:256].float().abs().max().item() == 448.0
    assert (out.scale[1] == floor.item()).all() and (out.q[1].float() == 0).all()
    torch.testing.assert_close(out.scale, ref.scale, rtol=2**-8, atol=0)
    assert_matches_oracle(
        out, x, res, w, EPS, out_dtype=torch.bfloat16, group_size=128, weight_offset=0.0, fp8_dtype=FP8, emit_bf16=False
    )


def test_nan_and_inf_propagate_as_specified(cuda_only):
    """ops/reference.py's rule: a NaN makes its whole row NaN (normed, scales, q); an Inf
    makes its element NaN and the rest of the row 0 (its groups NaN-scaled, the row's other
    groups floor-scaled); the residual keeps the NaN/Inf; other rows are unaffected."""
    t, h = 4, 4096
    x, res, w = inputs(t, h)
    x[1, 5] = float("nan")
    x[2, 300] = float("inf")
    out = fused_allreduce_rmsnorm_quant(x, res, w, EPS, weight_offset=1.0, emit_bf16=True, backend="cuda")
    ref = norm_quant_reference(x, res, w, EPS, out_dtype=torch.bfloat16, weight_offset=1.0, emit_bf16=True)
    for got, want in [
        (out.normed, ref.normed),
        (out.scale, ref.scale),
        (out.q.float(), ref.q.float()),
        (out.residual, ref.residual),
    ]:
        assert torch.equal(got.float().isnan(), want.float().isnan())
        assert torch.equal(got.float().isinf(), want.float().isinf())
    assert out.normed[1].float().isnan().all() and out.scale[1].isnan().all() and out.q[1].float().isnan().all()
    assert out.normed[2, 300].isnan() and (out.normed[2, :256].float().nan_to_num(0) == 0).all()
    assert out.scale[2, 2].isnan() and out.scale[2, 0].item() == (torch.tensor(1e-10) / 448.0).item()
    assert out.residual[1, 5].isnan() and out.residual[2, 300].isinf()
    good = [0, 3]
    assert_matches_oracle(
        FusedNormQuantOutput(out.q[good], out.scale[good], out.residual[good], out.normed[good]),
        x[good],
        res[good],
        w,
        EPS,
        out_dtype=torch.bfloat16,
        group_size=128,
        weight_offset=1.0,
        fp8_dtype=FP8,
        emit_bf16=True,
    )


def test_graph_capture_and_replay_with_changing_inputs(cuda_only):
    t, h = 48, 4096
    x, res, w = inputs(t, h)
    fused_allreduce_rmsnorm_quant(x, res, w, EPS, weight_offset=1.0, backend="cuda")  # warm-up (compile)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_allreduce_rmsnorm_quant(x, res, w, EPS, weight_offset=1.0, scale_layout="col", backend="cuda")
    for _ in range(3):
        nx, nres, _ = inputs(t, h)
        x.copy_(nx)
        res.copy_(nres)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_oracle(
            out,
            x,
            res,
            w,
            EPS,
            out_dtype=torch.bfloat16,
            group_size=128,
            weight_offset=1.0,
            fp8_dtype=FP8,
            emit_bf16=False,
            scale_layout="col",
        )


def test_pdl_launch_waits_for_the_kernel_before_it(monkeypatch):
    """With programmatic dependent launch (launch.pdl_launch, Hopper on) the local kernel may
    start while the kernel before it runs: here that kernel lets dependents start at once
    (griddepcontrol.launch_dependents), spins ~1 ms, then writes the op's input. A control
    kernel launched the same way without waiting reads the input before it is written (so
    the overlap is real); the op reads it after (its griddepcontrol.wait), and its bytes
    equal the op launched without PDL on the finished input."""
    import triton
    import triton.language as tl

    from vllm_rocm_fused.kernels.launch import pdl_launch

    if not pdl_launch(torch.device(DEV)):
        pytest.skip("programmatic dependent launch is not used on this GPU / Triton")
    from triton.language.extra.cuda import gdc_launch_dependents

    @triton.jit
    def late_writer(src_ptr, dst_ptr, sink_ptr, n, spins, BLOCK: tl.constexpr):
        gdc_launch_dependents()
        acc = tl.load(sink_ptr)
        for _ in range(spins):
            acc = acc * 0.5 + 1.0
        tl.store(sink_ptr + 1 + tl.program_id(0), acc)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def peek(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)

    t, h, block = 64, 4096, 1024
    x, res, w = inputs(t, h)
    n = x.numel()
    grid = (triton.cdiv(n, block),)
    sink = torch.zeros(1 + grid[0], device=DEV)
    dst, seen = torch.full_like(x, float("nan")), torch.zeros_like(x)
    # compiled first: a kernel compiled at its first launch starts long after the writer ends
    late_writer[grid](x, seen, sink, n, 0, BLOCK=block)
    peek[grid](x, seen, n, BLOCK=block, launch_pdl=True)
    add_rmsnorm_quant(x, res, w, EPS, weight_offset=1.0)
    torch.cuda.synchronize()
    late_writer[grid](x, dst, sink, n, 1 << 18, BLOCK=block)
    peek[grid](dst, seen, n, BLOCK=block, launch_pdl=True)
    torch.cuda.synchronize()
    assert torch.equal(dst, x) and seen.isnan().any(), "the control did not start before the writer finished"

    dst.fill_(float("nan"))
    late_writer[grid](x, dst, sink, n, 1 << 18, BLOCK=block)
    with_pdl = add_rmsnorm_quant(dst, res, w, EPS, weight_offset=1.0)
    torch.cuda.synchronize()
    monkeypatch.setenv("VLLM_ROCM_FUSED_DISABLE_PDL", "1")
    assert not pdl_launch(torch.device(DEV))
    without = add_rmsnorm_quant(x, res, w, EPS, weight_offset=1.0)
    torch.cuda.synchronize()
    assert torch.equal(with_pdl[0].view(torch.uint8), without[0].view(torch.uint8))
    assert torch.equal(with_pdl[1], without[1]) and torch.equal(with_pdl[2], without[2])
