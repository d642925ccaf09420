"""Run lm-eval's GSM8K against a running OpenAI-compatible server and pull out the
scores.

lm-eval is driven through its Python API (``simple_evaluate``) with the
``local-completions`` model: lm-eval builds each few-shot prompt, tokenizes it
with the model's Hugging Face tokenizer (so it can left-truncate to the
server's context length), sends token ids to ``/v1/completions`` with greedy
sampling, and scores the answers with the task's own filters. Every number in
a report comes from lm-eval's results dict through ``extract_scores``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .gsm8k_task import FILTERS, TaskSpec


@dataclass(frozen=True)
class HarnessSettings:
    """How lm-eval talks to the server. ``max_length`` is the server's context length
    (prompt + generation, tokens); ``concurrency`` is lm-eval's ``num_concurrent``."""

    tokenizer: str
    max_length: int
    num_fewshot: int = 5
    limit: int | None = None
    max_gen_toks: int = 256
    concurrency: int = 8
    timeout_s: int = 600
    seed: int = 1234


@dataclass(frozen=True)
class FilterScore:
    """Exact match of one filter (fraction of questions) and lm-eval's standard
    error of that mean (None when lm-eval reports N/A, e.g. for one question)."""

    exact_match: float
    stderr: float | None


@dataclass
class TaskResult:
    """What one server scored. ``samples`` has one entry per question (doc_id order)
    with the raw response and each filter's extracted answer and score."""

    task: str
    n_questions: int
    n_available: int
    scores: dict[str, FilterScore]
    samples: list[dict[str, Any]]
    prompts: dict[int, str]  # doc_id -> the exact prompt string lm-eval sent

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "n_questions": self.n_questions,
            "n_available": self.n_available,
            "scores": {k: asdict(v) for k, v in self.scores.items()},
        }


def model_args(base_url: str, served_model: str, settings: HarnessSettings) -> dict[str, Any]:
    """``local-completions`` arguments for a server at ``base_url`` (``http://host:port``)."""
    return {
        "model": served_model,
        "base_url": base_url.rstrip("/") + "/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": settings.tokenizer,
        "tokenized_requests": True,
        "max_length": settings.max_length,
        "max_gen_toks": settings.max_gen_toks,
        "num_concurrent": settings.concurrency,
        "max_retries": 3,
        "timeout": settings.timeout_s,
        "seed": settings.seed,
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def extract_scores(results: dict[str, Any], task: str) -> dict[str, FilterScore]:
    """Exact match and stderr for each of ``FILTERS`` from lm-eval's results dict
    (``results["results"][task]["exact_match,<filter>"]`` and ``..._stderr,<filter>``).

    Raises ``ValueError`` naming the missing key: a report never shows a number
    lm-eval did not produce."""
    per_task = (results or {}).get("results", {}).get(task)
    if not isinstance(per_task, dict):
        raise ValueError(
            f"lm-eval results have no entry for task {task!r} "
            f"(tasks present: {sorted((results or {}).get('results', {}))})"
        )
    scores = {}
    for name in FILTERS:
        key = f"exact_match,{name}"
        value = _number(per_task.get(key))
        if value is None:
            raise ValueError(f"lm-eval results for {task!r} lack a numeric {key!r} (keys: {sorted(per_task)})")
        scores[name] = FilterScore(value, _number(per_task.get(f"exact_match_stderr,{name}")))
    return scores


def sample_counts(results: dict[str, Any], task: str) -> tuple[int, int]:
    """(questions evaluated, questions in the test split) from ``results["n-samples"]``."""
    counts = (results or {}).get("n-samples", {}).get(task, {})
    return int(counts.get("effective", 0)), int(counts.get("original", 0))


def _first_response(resps: Any) -> str:
    # lm-eval nests a generate_until response as [[text]] (requests x repeats).
    while isinstance(resps, list) and resps:
        resps = resps[0]
    return resps if isinstance(resps, str) else ""


def collect_samples(results: dict[str, Any], task: str) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Per-question rows (doc_id, target, response, per-filter extraction and score)
    and the prompt of each question, from lm-eval's logged samples (one entry per
    question and filter)."""
    rows: dict[int, dict[str, Any]] = {}
    prompts: dict[int, str] = {}
    for entry in (results or {}).get("samples", {}).get(task, []):
        doc_id = int(entry["doc_id"])
        row = rows.setdefault(
            doc_id, {"doc_id": doc_id, "target": entry.get("target"), "response": _first_response(entry.get("resps"))}
        )
        extracted = entry.get("filtered_resps")
        row[entry.get("filter", "?")] = {
            "extracted": extracted[0] if isinstance(extracted, list) and extracted else extracted,
            "exact_match": entry.get("exact_match"),
        }
        args = entry.get("arguments") or []
        if doc_id not in prompts and args and isinstance(args[0], (list, tuple)) and args[0]:
            prompts[doc_id] = args[0][0]
    return [rows[k] for k in sorted(rows)], prompts


def run_lm_eval(
    base_url: str, served_model: str, task: TaskSpec, settings: HarnessSettings, raw_out: str | Path | None = None
) -> TaskResult:
    """Evaluate ``task`` against the server; return the scores and per-question samples.

    ``raw_out``: where to write lm-eval's results dict as JSON (without the
    samples, which ``TaskResult.samples`` carries in compact form)."""
    if task.offline:
        # The offline task's data are local files; this keeps `datasets` from
        # asking the Hub about them (read when `datasets` is first imported).
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if task.include_path is not None:
        manager = TaskManager(include_path=str(task.include_path), include_defaults=False)
    else:
        manager = TaskManager()
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args(base_url, served_model, settings),
        tasks=[task.name],
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        batch_size=1,
        log_samples=True,
        task_manager=manager,
    )
    if results is None:  # only on non-zero ranks, which a client run never is
        raise RuntimeError("lm-eval returned no results")
    scores = extract_scores(results, task.name)
    n_questions, n_available = sample_counts(results, task.name)
    samples, prompts = collect_samples(results, task.name)
    if raw_out is not None:
        raw = {k: v for k, v in results.items() if k != "samples"}
        Path(raw_out).write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return TaskResult(task.name, n_questions, n_available, scores, samples, prompts)
