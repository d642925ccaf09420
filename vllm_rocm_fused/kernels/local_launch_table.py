"""Measured launch shapes of the local add + RMSNorm + group-quant kernel.

Written by benchmarks/derive_launch_table.py from a launch-shape sweep
(benchmarks/sweep_local_launch.py); do not edit by hand: rerun the sweep and the script.
Source: benchmarks/results/h200_tp1_launch_sweep.json (NVIDIA H200); other GPUs use it as an estimate.
Sweep command: PYTHONPATH=. python benchmarks/sweep_local_launch.py --out benchmarks/results/h200_tp1_launch_sweep.json --precompile-workers 0 --deadline-s 45.

TABLE: hidden -> ((max_tokens, num_warps, rows_per_program), ...), by rising max_tokens;
an entry covers the token counts above the previous entry's max_tokens up to its own
(None: every larger count). Hidden sizes not listed use RowTile.num_warps and one row
per program (launch.local_launch).
"""

SOURCE = "benchmarks/results/h200_tp1_launch_sweep.json"
GPU = "NVIDIA H200"
TABLE: dict[int, tuple[tuple[int | None, int, int], ...]] = {
    2048: ((256, 16, 1), (None, 8, 1)),
    2560: ((256, 8, 1), (None, 4, 1)),
    3072: ((512, 8, 1), (None, 4, 1)),
    4096: ((256, 16, 1), (4096, 8, 1), (None, 4, 1)),
    5120: ((128, 16, 1), (None, 8, 1)),
    6144: ((256, 16, 1), (None, 8, 1)),
}
