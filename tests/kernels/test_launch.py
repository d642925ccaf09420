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
    monkeypatch.setattr(local_launch_table, "TABLE", {5120: ((16, 16, 1), (1024, 8, 1), (None, 8, 2))})
    tile = row_tile(5120, 128)
    got = [(t, local_launch(5120, t, tile)) for t in (1, 16, 17, 1024, 1025, 8192)]
    assert [(g.num_warps, g.rows, g.measured) for _, g in got] == [
        (16, 1, True),
        (16, 1, True),
        (8, 1, True),
        (8, 1, True),
        (8, 2, True),
        (8, 2, True),
    ]
    other = local_launch(3072, 64, row_tile(3072, 128))
    assert (other.num_warps, other.rows, other.measured) == (row_tile(3072, 128).num_warps, 1, False)


def test_committed_table_is_well_formed():
    for hidden, entries in local_launch_table.TABLE.items():
        assert hidden % 128 == 0 and entries
        maxes = [m for m, _, _ in entries]
        assert maxes[-1] is None and maxes[:-1] == sorted(maxes[:-1]) and None not in maxes[:-1]
        for _, warps, rows in entries:
            assert _is_pow2(warps) and 1 <= warps <= 32 and rows in (1, 2, 4)
