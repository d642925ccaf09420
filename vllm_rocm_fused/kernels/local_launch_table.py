"""Measured launch shapes of the local add + RMSNorm + group-quant kernel.

Written by benchmarks/derive_launch_table.py from a launch-shape sweep
(benchmarks/sweep_local_launch.py); do not edit by hand: rerun the sweep and the script.
Source: benchmarks/results/h200_tp1_launch_sweep.json (NVIDIA H200); other GPUs use it as an estimate.
Sweep command: PYTHONPATH=. python benchmarks/sweep_local_launch.py --out benchmarks/results/h200_tp1_launch_sweep.json --precompile-workers 0 --warmup-s 0.02 --deadline-s 130.

TABLE: hidden -> ((max_tokens, num_warps, slice_groups), ...), by rising max_tokens;
an entry covers the token counts above the previous entry's max_tokens up to its own
(None: every larger count); slice_groups = 128-groups per program (a row over
cdiv(groups, slice_groups) programs). Hidden sizes not listed run launch.local_launch's
default (one program per row).
"""

SOURCE = "benchmarks/results/h200_tp1_launch_sweep.json"
GPU = "NVIDIA H200"
TABLE: dict[int, tuple[tuple[int | None, int, int], ...]] = {
    2048: ((64, 4, 8), (256, 8, 16), (1024, 4, 16), (2048, 8, 16), (None, 4, 16)),
    2560: ((32, 4, 8), (128, 16, 32), (1024, 8, 32), (None, 4, 32)),
    3072: ((16, 4, 4), (32, 4, 8), (128, 16, 32), (1024, 8, 32), (None, 4, 32)),
    4096: ((32, 8, 8), (64, 8, 16), (128, 16, 32), (None, 8, 32)),
    5120: ((16, 8, 8), (32, 8, 16), (64, 8, 32), (256, 16, 64), (None, 4, 64)),
    6144: ((16, 8, 8), (32, 8, 16), (64, 16, 32), (128, 8, 64), (256, 16, 64), (None, 4, 64)),
    7168: ((32, 8, 16), (64, 16, 32), (128, 8, 64), (1024, 16, 64), (None, 8, 64)),
    8192: ((32, 16, 16), (64, 16, 32), (512, 16, 64), (None, 8, 64)),
}
