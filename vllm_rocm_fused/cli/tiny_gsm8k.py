"""``vllm-rocm-fused tiny-gsm8k``: write the tiny-gsm8k data set (``train.jsonl`` and
``test.jsonl`` in GSM8K's schema) into a folder, for ``eval gsm8k --data-dir``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write train.jsonl and test.jsonl into (created)")
    p.add_argument(
        "--seed", type=int, default=0, help="data seed (default 0: the split the trained models were checked on)"
    )
    p.add_argument("--train-size", type=int, default=None, help="train rows (default 7473, as GSM8K)")
    p.add_argument("--test-size", type=int, default=None, help="test rows (default 1319, as GSM8K)")


def run(args: argparse.Namespace) -> int:
    from ..tiny_models import tiny_gsm8k

    for flag, value in (("--seed", args.seed), ("--train-size", args.train_size), ("--test-size", args.test_size)):
        if value is not None and value < 0:
            print(f"tiny-gsm8k: error: {flag} must be >= 0, got {value}", file=sys.stderr)
            return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"tiny-gsm8k: error: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    sizes = {
        "train_size": tiny_gsm8k.TRAIN_SIZE if args.train_size is None else args.train_size,
        "test_size": tiny_gsm8k.TEST_SIZE if args.test_size is None else args.test_size,
    }
    paths = tiny_gsm8k.write_dataset(out, seed=args.seed, **sizes)
    for name, path in paths.items():
        print(f"tiny-gsm8k: wrote {path} ({sizes[name + '_size']} rows)")
    print(f"tiny-gsm8k: score a model on it with: vllm-rocm-fused eval gsm8k --model MODEL --data-dir {out}")
    return 0
