"""``vllm-rocm-fused`` entry point: one sub-command per module, imported on use: only
the module of the command being run is imported (``--help`` imports none, and
``doctor`` works without vLLM), and each module imports torch or vLLM only where
its command needs them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterable

# sub-command -> (module, one-line help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("vllm_rocm_fused.cli.doctor", "show platform, versions, and which backend each fused site would use"),
    "demo": (
        "vllm_rocm_fused.cli.demo",
        "serve a tiny Qwen3.5 FP8 model with the plugin at TP=2 and show what each site did",
    ),
    "selftest": (
        "vllm_rocm_fused.cli.selftest",
        "check the fused op against the spec on this machine's GPUs (or CPU) and time it against the unfused chain",
    ),
    "tiny-model": (
        "vllm_rocm_fused.cli.tiny_model",
        "build a tiny Qwen3.5 checkpoint (trained or random weights, FP8 or bf16) vLLM loads",
    ),
    "tiny-gsm8k": (
        "vllm_rocm_fused.cli.tiny_gsm8k",
        "write the tiny-gsm8k data set (GSM8K-format arithmetic problems the trained tiny models know)",
    ),
    "eval": (
        "vllm_rocm_fused.cli.eval",
        "accuracy check, fused vs baseline server (eval gsm8k: lm-eval GSM8K + parity + gate)",
    ),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of ``commands`` only (default: all), so that parsing
    one command's line imports that command's module alone."""
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="vllm-rocm-fused",
        description="Fused all-reduce + RMSNorm + FP8 quant for Qwen3.5 on vLLM: tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in wanted:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (the top level has only -h).
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command in COMMANDS else [])
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
