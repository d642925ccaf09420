"""``vllm-rocm-fused eval gsm8k``: GSM8K accuracy, fused vs baseline, with a verdict.

    vllm-rocm-fused eval gsm8k --model PATH_OR_NAME [--tp N] [--limit N] [--num-fewshot 5]
        [--data-dir DIR] [--gate ACC] [--max-drop DELTA] [--concurrency N] [--out DIR]
        [-- extra vllm serve args]

The work is in ``vllm_rocm_fused.eval`` (the top-level ``eval/`` folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .. import envs
from .checks import fraction, model_problem, non_negative_int, positive_float, positive_int, tp_problem

logger = logging.getLogger("vllm_rocm_fused.cli.eval")

BENCHMARKS = ("gsm8k",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    g = sub.add_parser(
        "gsm8k",
        help="GSM8K (lm-eval), baseline vs fused server, report and verdict",
        description="Serve MODEL twice with vllm serve (baseline: VLLM_ROCM_FUSED_DISABLE=1, then fused), "
        "score both on GSM8K with lm-eval, compare greedy completions token by token, write "
        "report.json/report.md, and exit 1 if the fused score is below --gate or more than "
        "--max-drop below the baseline's (2 if the run could not finish). Arguments after -- go "
        "to both vllm serve commands.",
    )
    g.add_argument("--model", required=True, help="checkpoint folder or Hugging Face name, as vllm serve takes it")
    g.add_argument("--tokenizer", default=None, help="tokenizer lm-eval uses on the client side (default: --model)")
    g.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (default 1; fusion needs > 1)")
    g.add_argument(
        "--limit", type=positive_int, default=None, help="score only the first N test questions (default: all 1319)"
    )
    g.add_argument("--num-fewshot", type=non_negative_int, default=5, help="few-shot examples (default 5)")
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with GSM8K train.jsonl/test.jsonl: run offline from it (default: "
        "$VLLM_ROCM_FUSED_GSM8K_DIR, else lm-eval's stock task from the Hub)",
    )
    g.add_argument(
        "--gate",
        type=fraction,
        default=None,
        help="fail if the fused exact match is below this (e.g. 0.94; default: no absolute gate)",
    )
    g.add_argument(
        "--max-drop",
        type=fraction,
        default=0.02,
        help="fail if the fused exact match is more than this below the baseline's (default 0.02)",
    )
    g.add_argument(
        "--gate-filter",
        choices=("strict-match", "flexible-extract"),
        default="strict-match",
        help="which lm-eval filter's exact match the gates judge (default strict-match)",
    )
    g.add_argument("--concurrency", type=positive_int, default=8, help="requests lm-eval keeps in flight (default 8)")
    g.add_argument(
        "--max-gen-toks",
        type=positive_int,
        default=256,
        help="generated tokens per answer at most (lm-eval's default 256)",
    )
    g.add_argument(
        "--parity-questions",
        type=non_negative_int,
        default=10,
        help="questions whose greedy completions are compared token by token (default 10, at most --limit; 0: skip)",
    )
    g.add_argument(
        "--parity-tokens", type=positive_int, default=128, help="tokens generated per parity completion (default 128)"
    )
    g.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=1800.0,
        help="seconds to wait for each server's /health (default 1800)",
    )
    g.add_argument("--out", default=None, help="output folder (default: ./gsm8k-eval-<UTC time>)")
    g.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARGS", help="extra vllm serve arguments, after --")


def _absolute(path: str | None) -> str | None:
    # The report's command must repeat the run from any folder.
    return str(Path(path).expanduser().resolve()) if path else None


def _say(msg: str) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def argument_problem(args: argparse.Namespace, out: Path) -> str | None:
    """The first argument or setting that cannot work, found before anything starts
    or is written (None: none found)."""
    from vllm_rocm_fused.serving import VllmServer

    return (
        model_problem(args.model)
        or (model_problem(args.tokenizer, "--tokenizer") if args.tokenizer else None)
        or tp_problem(args.model, args.tp)
        or (f"--out {out}: exists and is not a folder" if out.exists() and not out.is_dir() else None)
        or next((f"invalid setting {p}" for p in VllmServer.settings_problems()), None)
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(f"gsm8k-eval-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    problem = argument_problem(args, out)
    if problem:
        _say(f"error: {problem}")
        return 2

    from vllm_rocm_fused.eval.gate import check_thresholds
    from vllm_rocm_fused.eval.gsm8k import EvalError, Gsm8kRun, format_command, run_gsm8k
    from vllm_rocm_fused.eval.server_log import first_error

    cfg = Gsm8kRun(
        model=args.model,
        out_dir=out.resolve(),
        tp=args.tp,
        tokenizer=args.tokenizer,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        data_dir=_absolute(args.data_dir or envs.gsm8k_dir()),
        gate=args.gate,
        max_drop=args.max_drop,
        gate_filter=args.gate_filter,
        concurrency=args.concurrency,
        max_gen_toks=args.max_gen_toks,
        parity_questions=args.parity_questions,
        parity_tokens=args.parity_tokens,
        startup_timeout_s=args.startup_timeout,
        vllm_args=list(args.vllm_args),
    )
    cfg.command = format_command(cfg)
    try:
        check_thresholds(cfg.gate, cfg.max_drop, cfg.gate_filter)
        status, _ = run_gsm8k(cfg, _say)
    except (ValueError, EvalError, OSError) as e:
        _say(f"error: {e}")
        return 2
    except Exception as e:  # a server that failed to start, lm-eval, ...: say what and where
        _say(f"error: {type(e).__name__}: {e}")
        logger.debug("traceback", exc_info=True)
        log_path = getattr(e, "log_path", None)  # serving.ServerError
        cause = first_error(log_path) if log_path else None
        if cause:
            _say(f"first error in {log_path}: {cause}")
        _say(f"the servers' logs are under {cfg.out_dir}")
        return 2
    return status
