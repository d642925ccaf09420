"""``vllm-rocm-fused eval gsm8k``: the same model served twice, baseline then fused,
scored by lm-eval on GSM8K, compared token by token, judged.

Stages, per server (one at a time, so one machine's memory holds one model):
start ``vllm serve`` (``vllm_rocm_fused.serving.VllmServer``: free port, health
wait, log file, the whole process group stopped on exit, Ctrl-C included) ->
lm-eval on GSM8K -> greedy completions of the first K prompts for parity ->
stop. Then the plugin's lines are read from each log, and the report is written.

Output folder::

    report.json, report.md           the record and its rendering
    tasks/gsm8k_local.yaml           the offline task (with a data folder)
    parity.json                      both servers' greedy token ids + the comparison
    baseline/, fused/                server.log, lm_eval_results.json, samples.jsonl

Exit status: 0 the verdict passed, 1 it failed, 2 the run could not finish.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .gate import judge
from .gsm8k_task import resolve_task
from .harness import HarnessSettings, TaskResult, run_lm_eval
from .parity import compare, completions_to_json, greedy_completions
from .report import REPORT_VERSION, deltas, versions, write_report
from .server_log import read_plugin_report

Progress = Callable[[str], None]

# (label, environment of its `vllm serve`). The fused server sets the switch to 0
# explicitly so an exported VLLM_ROCM_FUSED_DISABLE=1 cannot turn it into a baseline.
SERVERS: tuple[tuple[str, dict[str, str]], ...] = (
    ("baseline", {"VLLM_ROCM_FUSED_DISABLE": "1"}),
    ("fused", {"VLLM_ROCM_FUSED_DISABLE": "0"}),
)
DEFAULT_MAX_LENGTH = 2048


@dataclass
class Gsm8kRun:
    """Everything the command was asked to do (the CLI's arguments)."""

    model: str
    out_dir: Path
    tp: int = 1
    tokenizer: str | None = None
    limit: int | None = None
    num_fewshot: int = 5
    data_dir: str | None = None
    gate: float | None = None
    max_drop: float | None = 0.02
    gate_filter: str = "strict-match"
    concurrency: int = 8
    max_gen_toks: int = 256
    parity_questions: int = 10
    parity_tokens: int = 128
    startup_timeout_s: float = 1800.0
    vllm_args: list[str] = field(default_factory=list)
    command: str = ""


class EvalError(RuntimeError):
    """A stage of the run failed (the message says which and where its log is)."""


def require_lm_eval() -> None:
    """Fail before any server starts when lm-eval (with its API client) is missing."""
    missing = [name for name in ("lm_eval", "aiohttp", "tenacity") if importlib.util.find_spec(name) is None]
    if missing:
        raise EvalError(
            f"missing {', '.join(missing)}: install lm-eval with its API client, "
            f"pip install 'vllm-rocm-fused[eval]' (lm-eval[api]==0.4.13)"
        )


def server_info(base_url: str, timeout_s: float = 30) -> tuple[str, int | None]:
    """(served model name, context length) from the server's ``/v1/models``."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=timeout_s) as resp:
        data = json.loads(resp.read())["data"]
    if not data:
        raise EvalError(f"{base_url}/v1/models lists no model")
    max_len = data[0].get("max_model_len")
    return data[0]["id"], int(max_len) if max_len else None


def _write_samples(result: TaskResult, path: Path) -> None:
    with path.open("w") as fh:
        for row in result.samples:
            fh.write(json.dumps(row, default=str) + "\n")


def default_server(cfg: Gsm8kRun, env: dict[str, str], log_path: Path, progress: Progress):
    """``vllm serve`` as users run it: vLLM's own defaults for context length, batch
    size and graphs (CUDA/HIP graphs or torch.compile); anything else via ``-- ARGS``."""
    from vllm_rocm_fused.serving import VllmServer

    return VllmServer(
        cfg.model,
        tp=cfg.tp,
        env=env,
        extra_args=cfg.vllm_args,
        log_path=log_path,
        max_model_len=None,
        max_num_seqs=None,
        enforce_eager=False,
        startup_timeout_s=cfg.startup_timeout_s,
        progress=progress,
    )


# (run, env, log path, progress) -> a context manager whose value has ``.url``.
ServerFactory = Callable[[Gsm8kRun, dict[str, str], Path, Progress], Any]


def _serve_and_score(
    cfg: Gsm8kRun,
    label: str,
    env: dict[str, str],
    task,
    prompts: list[tuple[int, str]] | None,
    progress: Progress,
    server_factory: ServerFactory,
) -> dict[str, Any]:
    folder = cfg.out_dir / label
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    env_text = " ".join(f"{k}={v}" for k, v in env.items())
    progress(f"[{label}] starting vllm serve {cfg.model} (TP={cfg.tp}, {env_text}); log: {log_path}")
    t0 = time.monotonic()
    with server_factory(cfg, env, log_path, lambda msg: progress(f"[{label}] {msg}")) as server:
        startup_s = time.monotonic() - t0
        served, max_len = server_info(server.url)
        progress(
            f"[{label}] healthy after {startup_s:.0f} s at {server.url} (context {max_len}); "
            f"lm-eval: {cfg.num_fewshot}-shot, {cfg.limit or 'all'} questions, concurrency {cfg.concurrency}"
        )
        t1 = time.monotonic()
        settings = HarnessSettings(
            tokenizer=cfg.tokenizer or cfg.model,
            max_length=max_len or DEFAULT_MAX_LENGTH,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            max_gen_toks=cfg.max_gen_toks,
            concurrency=cfg.concurrency,
        )
        result = run_lm_eval(server.url, served, task, settings, raw_out=folder / "lm_eval_results.json")
        eval_s = time.monotonic() - t1
        _write_samples(result, folder / "samples.jsonl")
        scores = ", ".join(f"{k} {v.exact_match:.4f}" for k, v in result.scores.items())
        progress(f"[{label}] lm-eval done in {eval_s:.0f} s: {scores} ({result.n_questions} questions)")
        if prompts is None:
            prompts = [(doc_id, result.prompts[doc_id]) for doc_id in sorted(result.prompts)[: cfg.parity_questions]]
        completions = []
        if prompts and cfg.parity_tokens > 0:
            progress(
                f"[{label}] parity: greedy completions of {len(prompts)} prompts, up to the task's stop "
                f"strings or {cfg.parity_tokens} tokens"
            )
            completions = greedy_completions(server.url, served, prompts, cfg.parity_tokens)
        progress(f"[{label}] stopping the server")
    plugin = read_plugin_report(log_path)
    return {
        "label": label,
        "env": env,
        "log": str(log_path.relative_to(cfg.out_dir)),
        "served_model": served,
        "max_model_len": max_len,
        "startup_s": startup_s,
        "eval_s": eval_s,
        "result": result,
        "prompts": prompts,
        "completions": completions,
        "plugin": plugin,
    }


def run_gsm8k(
    cfg: Gsm8kRun, progress: Progress | None = None, server_factory: ServerFactory = default_server
) -> tuple[int, dict[str, Any]]:
    """Run the whole check; return (exit status, report dict). Raises on a failed stage
    (``serving.ServerError`` with the log's tail when a server does not start)."""
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    require_lm_eval()
    task = resolve_task(cfg.data_dir, cfg.out_dir)  # checks the data folder before out_dir is made
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    say(f"GSM8K fused vs baseline: {cfg.model}, TP={cfg.tp}; task {task.describe()['source']}; out {cfg.out_dir}")

    runs = {}
    prompts = None
    for label, env in SERVERS:
        runs[label] = _serve_and_score(cfg, label, env, task, prompts, say, server_factory)
        prompts = runs[label]["prompts"]
    base, fused = runs["baseline"], runs["fused"]

    parity = None
    if base["completions"] and fused["completions"]:
        parity = compare(base["completions"], fused["completions"], cfg.parity_tokens)
        (cfg.out_dir / "parity.json").write_text(
            json.dumps(
                {
                    "summary": {k: v for k, v in parity.items() if k != "per_question"},
                    "per_question": parity["per_question"],
                    "baseline": completions_to_json(base["completions"]),
                    "fused": completions_to_json(fused["completions"]),
                },
                indent=1,
            )
            + "\n"
        )

    verdict = judge(
        base["result"].scores,
        fused["result"].scores,
        metric=cfg.gate_filter,
        gate=cfg.gate,
        max_drop=cfg.max_drop,
        baseline_unfused=base["plugin"].disabled and not base["plugin"].fused_sites,
        fused_active=fused["plugin"].fused_active,
    )
    scores = {label: {k: vars(v) for k, v in runs[label]["result"].scores.items()} for label in runs}
    report = {
        "report_version": REPORT_VERSION,
        "command": cfg.command,
        "started_at": started.isoformat(timespec="seconds"),
        "runtime_s": time.monotonic() - t0,
        "model": cfg.model,
        "tokenizer": cfg.tokenizer or cfg.model,
        "served_model": base["served_model"],
        "tp": cfg.tp,
        "vllm_args": cfg.vllm_args,
        "task": {
            **task.describe(),
            "num_fewshot": cfg.num_fewshot,
            "limit": cfg.limit,
            "questions": base["result"].n_questions,
            "questions_available": base["result"].n_available,
            "max_gen_toks": cfg.max_gen_toks,
            "concurrency": cfg.concurrency,
            # lm-eval's few-shot sampler is seeded: both servers must have seen the same prompts.
            "same_prompts": base["result"].prompts == fused["result"].prompts,
        },
        "versions": versions(),
        "servers": {
            label: {
                "env": r["env"],
                "log": r["log"],
                "startup_s": r["startup_s"],
                "eval_s": r["eval_s"],
                "max_model_len": r["max_model_len"],
                "plugin": {
                    "disabled": r["plugin"].disabled,
                    "fused_active": r["plugin"].fused_active,
                    "fused_sites": r["plugin"].fused_sites,
                    "site_paths": r["plugin"].site_paths,
                    "lines": r["plugin"].lines,
                },
            }
            for label, r in runs.items()
        },
        "scores": scores,
        "delta": deltas(scores["baseline"], scores["fused"]),
        "parity": parity,
        "verdict": verdict.to_dict(),
    }
    json_path, md_path = write_report(report, cfg.out_dir)
    m = cfg.gate_filter
    summary = (
        f"{m}: baseline {scores['baseline'][m]['exact_match']:.4f}, "
        f"fused {scores['fused'][m]['exact_match']:.4f} (delta {report['delta'][m]:+.4f})"
    )
    if parity and parity["token_agreement"] is not None:
        summary += (
            f"; parity: {parity['identical']}/{parity['compared']} identical, "
            f"{parity['token_agreement']:.1%} of tokens agree"
        )
    say(summary)
    for c in verdict.checks:
        say(f"  {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    say(
        f"verdict: {'PASS' if verdict.passed else 'FAIL'} in {report['runtime_s']:.0f} s; "
        f"report: {md_path}, {json_path}"
    )
    return (0 if verdict.passed else 1), report


def format_command(cfg: Gsm8kRun) -> str:
    """The command line that repeats this run, every setting spelled out."""
    argv = ["vllm-rocm-fused", "eval", "gsm8k", "--model", cfg.model, "--tp", str(cfg.tp)]
    if cfg.tokenizer:
        argv += ["--tokenizer", cfg.tokenizer]
    if cfg.limit is not None:
        argv += ["--limit", str(cfg.limit)]
    argv += ["--num-fewshot", str(cfg.num_fewshot)]
    if cfg.data_dir:
        argv += ["--data-dir", str(cfg.data_dir)]
    if cfg.gate is not None:
        argv += ["--gate", str(cfg.gate)]
    if cfg.max_drop is not None:
        argv += ["--max-drop", str(cfg.max_drop)]
    argv += [
        "--gate-filter",
        cfg.gate_filter,
        "--concurrency",
        str(cfg.concurrency),
        "--max-gen-toks",
        str(cfg.max_gen_toks),
        "--parity-questions",
        str(cfg.parity_questions),
        "--parity-tokens",
        str(cfg.parity_tokens),
        "--out",
        str(cfg.out_dir),
    ]
    if cfg.vllm_args:
        argv += ["--", *cfg.vllm_args]
    return shlex.join(argv)
