"""The reference (the spec) against an independent float64 oracle."""

import itertools

import pytest
import torch

from support.oracle import assert_matches_oracle
from vllm_rocm_fused.ops import fused_allreduce_rmsnorm_quant

HIDDENS = (128, 256, 384, 2048, 4096, 5120)
TOKENS = (0, 1, 3, 17, 257)


def _inputs(t, h, dtype, seed, with_residual=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, h, generator=g) * scale).to(dtype)
    residual = (torch.randn(t, h, generator=g) * 2).to(dtype) if with_residual else None
    weight = (torch.randn(h, generator=g) * 0.3).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("h", HIDDENS)
@pytest.mark.parametrize("t", TOKENS)
def test_reference_matches_oracle_shapes(h, t):
    # All option combinations at every shape would be slow at H=5120, T=257:
    # sweep options at a rotating subset per shape, every option seen per H.
    combos = list(itertools.product((True, False), (0.0, 1.0), ("row", "col"), (False, True)))
    for i, (with_res, offset, layout, emit) in enumerate(combos):
        if t >= 17 and h >= 2048 and i % 4 != (h + t) % 4:
            continue
        x, residual, weight = _inputs(t, h, torch.bfloat16, seed=h * 1000 + t * 10 + i, with_residual=with_res)
        out = fused_allreduce_rmsnorm_quant(
            x,
            residual,
            weight,
            1e-6,
            weight_offset=offset,
            emit_bf16=emit,
            scale_layout=layout,
            backend="native",
            quant_dtype=torch.float8_e4m3fn,
        )
        assert_matches_oracle(
            out,
            x,
            residual,
            weight,
            1e-6,
            out_dtype=torch.bfloat16,
            group_size=128,
            weight_offset=offset,
            fp8_dtype=torch.float8_e4m3fn,
            emit_bf16=emit,
            scale_layout=layout,
        )


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("fp8", (torch.float8_e4m3fn, torch.float8_e4m3fnuz))
@pytest.mark.parametrize("group_size", (64, 128))
def test_reference_dtypes_and_group_sizes(dtype, fp8, group_size):
    for seed in range(3):
        x, residual, weight = _inputs(33, 512, dtype, seed=seed, scale=[0.01, 1.0, 30.0][seed])
        out = fused_allreduce_rmsnorm_quant(
            x, residual, weight, 1e-5, group_size=group_size, weight_offset=1.0, emit_bf16=True, quant_dtype=fp8
        )
        assert_matches_oracle(
            out,
            x,
            residual,
            weight,
            1e-5,
            out_dtype=dtype,
            group_size=group_size,
            weight_offset=1.0,
            fp8_dtype=fp8,
            emit_bf16=True,
        )


def test_no_quant_mode_matches_oracle():
    x, residual, weight = _inputs(9, 384, torch.bfloat16, seed=7)
    out = fused_allreduce_rmsnorm_quant(x, residual, weight, 1e-6, weight_offset=1.0, quantize=False)
    assert out.q is None and out.scale is None and out.normed is not None
    assert_matches_oracle(
        out,
        x,
        residual,
        weight,
        1e-6,
        out_dtype=torch.bfloat16,
        group_size=128,
        weight_offset=1.0,
        fp8_dtype=torch.float8_e4m3fn,
        emit_bf16=True,
    )


def test_zero_tokens_give_empty_outputs():
    x = torch.empty(0, 256, dtype=torch.bfloat16)
    out = fused_allreduce_rmsnorm_quant(
        x, x.clone(), torch.ones(256, dtype=torch.bfloat16), 1e-6, emit_bf16=True, scale_layout="col"
    )
    assert out.q.shape == (0, 256) and out.q.dtype == torch.float8_e4m3fn
    assert out.scale.shape == (0, 2) and out.scale.dtype == torch.float32
    assert out.residual.shape == (0, 256) and out.normed.shape == (0, 256)


def test_inputs_are_not_modified():
    x, residual, weight = _inputs(5, 256, torch.bfloat16, seed=3)
    copies = [t.clone() for t in (x, residual, weight)]
    out = fused_allreduce_rmsnorm_quant(x, residual, weight, 1e-6)
    for before, after in zip(copies, (x, residual, weight)):
        assert torch.equal(before, after)
    assert out.residual.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    # without a residual the new residual equals x but is a separate tensor
    out = fused_allreduce_rmsnorm_quant(x, None, weight, 1e-6)
    assert torch.equal(out.residual, x) and out.residual.data_ptr() != x.data_ptr()


def test_all_zero_and_saturating_groups():
    h = 256
    x = torch.zeros(3, h, dtype=torch.bfloat16)
    x[1, :128] = 1.0  # a zero second group next to a nonzero first one... after norm
    x[2] = torch.linspace(-1e4, 1e4, h).to(torch.bfloat16)
    weight = torch.ones(h, dtype=torch.bfloat16)
    out = fused_allreduce_rmsnorm_quant(x, None, weight, 1e-6, emit_bf16=True)
    assert torch.isfinite(out.scale).all() and (out.scale > 0).all()
    assert (out.q[0].float() == 0).all() and (out.q[1, 128:].float() == 0).all()
    # every group's largest magnitude maps to the FP8 maximum
    qmax = torch.finfo(torch.float8_e4m3fn).max
    nonzero_groups = out.q.float().view(3, 2, 128).abs().amax(-1)
    assert nonzero_groups[2].eq(qmax).all() and nonzero_groups[1, 0] == qmax


def test_nan_and_inf_follow_the_documented_rule():
    x, residual, weight = _inputs(4, 256, torch.bfloat16, seed=11)
    x[1, 5] = float("nan")
    x[2, 200] = float("inf")
    out = fused_allreduce_rmsnorm_quant(x, residual, weight, 1e-6, emit_bf16=True)
    # NaN row: everything NaN
    assert torch.isnan(out.normed[1]).all() and torch.isnan(out.scale[1]).all()
    assert torch.isnan(out.q[1].float()).all()
    # Inf row: the Inf element NaN, the rest 0; its group NaN, the other group floor-scaled zeros
    assert torch.isnan(out.normed[2, 200]) and (out.normed[2, :200] == 0).all()
    assert torch.isnan(out.scale[2, 1]) and torch.isfinite(out.scale[2, 0])
    assert (out.q[2, :128].float() == 0).all() and torch.isnan(out.q[2, 200].float())
    assert torch.isinf(out.residual[2, 200]) and torch.isnan(out.residual[1, 5])
    for row in (0, 3):
        assert torch.isfinite(out.normed[row]).all() and torch.isfinite(out.scale[row]).all()
