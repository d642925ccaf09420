"""The kernels' host-side row layout and launch shapes (CPU, no kernel runs)."""

import pytest

pytest.importorskip("triton")

from vllm_rocm_fused.kernels import launch, local_launch_table
from vllm_rocm_fused.kernels.launch import MAX_PARTS, MAX_TILE, local_launch, norm_tile, row_parts, row_tile


def _is_pow2(n):
    return n > 0 and n & (n - 1) == 0


def test_row_parts_cover_the_groups_with_few_powers_of_two():
    for n_groups in range(1, 257):
        parts = row_parts(n_groups)
        assert len(parts) == MAX_PARTS
        used = [p for p in parts if p]
        assert all(_is_pow2(p) for p in used)
        assert used == sorted(used, reverse=True) and parts[len(used) :] == (0,) * (MAX_PARTS - len(used))
        assert sum(used) >= n_groups
        if bin(n_groups).count("1") <= MAX_PARTS:
            assert sum(used) == n_groups, parts  # no padding at all
        else:  # only the last part is padded
            assert sum(used[:-1]) < n_groups and sum(used) - n_groups < used[-1], parts


def test_every_multiple_of_128_up_to_16384_fits_without_padding_in_128_groups():
    qwen = {
        2048: (16, 0, 0, 0),
        2560: (16, 4, 0, 0),
        3072: (16, 8, 0, 0),
        4096: (32, 0, 0, 0),
        5120: (32, 8, 0, 0),
        6144: (32, 16, 0, 0),
        7168: (32, 16, 8, 0),
        8192: (64, 0, 0, 0),
    }
    for hidden in range(128, 16384 + 1, 128):
        tile = row_tile(hidden, 128)
        assert tile.elements <= MAX_TILE and launch.tile_reason(hidden, 128) is None
        if bin(hidden // 128).count("1") <= MAX_PARTS:
            assert tile.elements == hidden
        assert norm_tile(hidden).parts == tile.parts
        for warps in (tile.num_warps, tile.quant_num_warps):
            assert _is_pow2(warps) and 4 <= warps <= 16
        if hidden in qwen:
            assert tile.parts == qwen[hidden]
    assert launch.tile_reason(16384 + 128, 128) is not None


def test_norm_only_rows_of_other_widths():
    tile = norm_tile(12480)  # 195 groups of 64: 128 + 64 + 2 + 1
    assert (tile.group, tile.parts, tile.elements) == (64, (128, 64, 2, 1), 12480)
    assert row_tile(288, 96).gs == 128  # a 96-group is a 128-lane tile row, 32 lanes masked


def test_local_launch_uses_the_measured_table_and_a_rule_elsewhere(monkeypatch):
    monkeypatch.setattr(local_launch_table, "TABLE", {5120: ((16, 8, 2), (128, 16, 16), (None, 8, 64))})
    tile = row_tile(5120, 128)
    got = [(t, local_launch(5120, t, tile)) for t in (1, 16, 17, 128, 129, 8192)]
    assert [(g.num_warps, g.slice_groups, g.measured) for _, g in got] == [
        (8, 2, True),
        (8, 2, True),
        (16, 16, True),
        (16, 16, True),
        (8, 64, True),
        (8, 64, True),
    ]
    # not in the table: one program per row (the row's 24 groups padded to 32), 8 warps
    other = local_launch(3072, 64, row_tile(3072, 128))
    assert (other.num_warps, other.slice_groups, other.measured) == (8, 32, False)
    small = local_launch(640, 1, row_tile(640, 128))
    assert (small.num_warps, small.slice_groups, small.measured) == (4, 8, False)
    # the table is in 128-groups: another group width takes the rule (its whole padded row)
    norm = local_launch(5120, 1, row_tile(5120, 64))
    assert (norm.slice_groups, norm.measured) == (128, False)


def test_committed_table_is_well_formed():
    for hidden, entries in local_launch_table.TABLE.items():
        assert hidden % 128 == 0 and entries
        maxes = [m for m, _, _ in entries]
        assert maxes[-1] is None and maxes[:-1] == sorted(maxes[:-1]) and None not in maxes[:-1]
        row_g = 1 << (hidden // 128 - 1).bit_length()
        for _, warps, slice_groups in entries:
            assert _is_pow2(warps) and 1 <= warps <= 32
            assert _is_pow2(slice_groups) and slice_groups <= row_g
        assert entries[-1][2] == row_g, "the largest token counts run one program per row"


def test_local_kernel_takes_power_of_two_slices_of_the_row_only():
    import torch

    from vllm_rocm_fused.kernels.add_rmsnorm_quant import add_rmsnorm_quant

    x = torch.zeros(2, 5120, dtype=torch.bfloat16)
    w = torch.zeros(5120, dtype=torch.bfloat16)
    for bad in (3, 24, 128):  # 5120 = 40 groups: padded row of 64
        with pytest.raises(ValueError, match="slice_groups must be a power of two from 1 to 64"):
            add_rmsnorm_quant(x, x, w, 1e-6, slice_groups=bad)


def test_doctor_states_the_tp1_rule_from_the_table(monkeypatch):
    from vllm_rocm_fused.backends.cuda.backend import dispatch_summary

    monkeypatch.setattr(local_launch_table, "GPU", "NVIDIA H200")
    monkeypatch.setattr(local_launch_table, "TABLE", {5120: ((32, 8, 4), (None, 8, 64)), 8192: ((None, 8, 64),)})
    line = dispatch_summary()["dispatch TP=1"]
    assert "split at hidden 5120 up to 32 tokens" in line and "8192" not in line
    assert "measured on NVIDIA H200" in line and "other hidden sizes: one program per row" in line
    assert "launched with programmatic dependent launch on NVIDIA Hopper" in line
    monkeypatch.setattr(local_launch_table, "TABLE", {})
    assert "no measured launch table" in dispatch_summary()["dispatch TP=1"]
    monkeypatch.setenv("VLLM_ROCM_FUSED_DISABLE_PDL", "1")
    assert "without programmatic dependent launch" in dispatch_summary()["dispatch TP=1"]


def test_pdl_launch_only_on_hopper_and_newer_nvidia_and_never_interpreted(monkeypatch):
    """launch.pdl_launch: the local kernel is launched with programmatic dependent launch on
    an NVIDIA GPU of compute capability 9.0 or more, with a Triton that has griddepcontrol;
    never on the CPU, a ROCm build, an older GPU, in the interpreter, or with the switch set."""
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VLLM_ROCM_FUSED_DISABLE_PDL", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(launch, "_gdc_available", lambda: True)
    capability = {0: (9, 0), 1: (8, 0), 2: (10, 0)}
    monkeypatch.setattr(launch, "_capability", lambda index: capability[index])
    assert launch.pdl_launch(torch.device("cuda", 0)) and launch.pdl_launch(torch.device("cuda", 2))
    assert not launch.pdl_launch(torch.device("cuda", 1))
    assert not launch.pdl_launch(torch.device("cpu"))
    monkeypatch.setenv("VLLM_ROCM_FUSED_DISABLE_PDL", "1")
    assert not launch.pdl_launch(torch.device("cuda", 0))
    monkeypatch.delenv("VLLM_ROCM_FUSED_DISABLE_PDL")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not launch.pdl_launch(torch.device("cuda", 0))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(launch, "_gdc_available", lambda: False)
    assert not launch.pdl_launch(torch.device("cuda", 0))
    monkeypatch.setattr(launch, "_gdc_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert not launch.pdl_launch(torch.device("cuda", 0))
