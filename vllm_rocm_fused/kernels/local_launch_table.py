"""Measured launch shapes of the local add + RMSNorm + group-quant kernel.

Written by benchmarks/derive_launch_table.py from a launch-shape sweep
(benchmarks/sweep_local_launch.py); do not edit by hand: rerun the sweep and the script.
No sweep of the current kernel is committed yet: every hidden size runs
launch.local_launch's default (one program per row).

TABLE: hidden -> ((max_tokens, num_warps, slice_groups), ...), by rising max_tokens.
"""

SOURCE = None
GPU = None
TABLE: dict[int, tuple[tuple[int | None, int, int], ...]] = {}
