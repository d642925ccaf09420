"""Measured launch shapes of the local add + RMSNorm + group-quant kernel.

Written by benchmarks/derive_launch_table.py from a launch-shape sweep
(benchmarks/sweep_local_launch.py); do not edit by hand: rerun the sweep and the script.
Empty: no sweep of the current kernel is committed yet, so launch.local_launch uses
RowTile.num_warps and one row per program at every size.

TABLE: hidden -> ((max_tokens, num_warps, rows_per_program), ...), by rising max_tokens;
an entry covers the token counts above the previous entry's max_tokens up to its own
(None: every larger count).
"""

SOURCE = None
GPU = None
TABLE: dict[int, tuple[tuple[int | None, int, int], ...]] = {}
