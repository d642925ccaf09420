"""The functional op over real gloo process groups of 2 and 4 spawned ranks."""

import pytest
import torch

from support.dist import run_ranks
from support.op_workers import forget_group_rank, functional_op_rank, rank_inputs
from vllm_rocm_fused.ops.reference import norm_quant_reference
from vllm_rocm_fused.ops.tolerance import compare

CASES = [
    (5, 256, "row", False, 1.0),
    (17, 384, "col", True, 0.0),
    (0, 128, "row", True, 1.0),
    (64, 2048, "col", False, 1.0),
]


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_gets_the_reference_of_the_summed_input(world_size):
    results = run_ranks(functional_op_rank, world_size, CASES)
    for i, (t, h, layout, emit, offset) in enumerate(CASES):
        ins = [rank_inputs(r, t, h, seed=i) for r in range(world_size)]
        total = torch.stack([x.float() for x, _, _ in ins]).sum(0)
        _, residual, weight = ins[0]
        ref = norm_quant_reference(
            total,
            residual,
            weight,
            1e-6,
            out_dtype=torch.bfloat16,
            weight_offset=offset,
            emit_bf16=emit,
            scale_layout=layout,
        )
        first = results[0][i]
        for rank in range(1, world_size):
            for a, b in zip(first, results[rank][i]):
                if a is None:
                    assert b is None
                else:  # every rank holds the same bits
                    assert (
                        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                        if a.dtype.itemsize == 1
                        else torch.equal(a, b)
                    )
        q, scale, res, normed = first
        assert scale.stride() == ref.scale.stride()
        if not emit:
            assert normed is None
        # the shared tolerance (ops/tolerance.py): the float32 sum order of gloo and of
        # torch.stack().sum() may differ in the last bit
        errors = compare(
            first,
            tuple(ref),
            h=total,
            residual=residual,
            weight=weight,
            eps=1e-6,
            weight_offset=offset,
            group_size=128,
            quant_dtype=q.dtype,
            scale_layout=layout,
            emit_bf16=emit,
            quantize=True,
        )
        assert errors.ok, errors.describe()


def test_forget_group_drops_its_communicator():
    """What a process does before destroy_process_group (the selftest's ranks): nothing
    of ours may keep the destroyed group alive until the interpreter exits."""
    for name, still_registered, fresh in run_ranks(forget_group_rank, 2):
        assert name.startswith("pg:")
        assert not still_registered
        assert fresh
