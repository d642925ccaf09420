"""Token-level parity of greedy completions, baseline vs fused.

The same prompts (the first K questions' 5-shot prompts, exactly as lm-eval sent
them) go to each server one request at a time, greedy, ``ignore_eos``, with the
stop strings of lm-eval's gsm8k task (``GSM8K_STOP``), so each completion is what
lm-eval scores: the answer, at most ``max_tokens`` tokens.
One request at a time keeps batch composition out of the comparison: what
differs between the two runs is the model's numerics, not the scheduler.

Greedy sequences of a bf16 model may diverge at a near-tie even when both paths
are correct (the fused all-reduce sums in another order); the report therefore
gives, at each first divergence, both servers' top-2 log-probabilities, so a
near-tie can be told from a real fault.
"""

from __future__ import annotations

import json
import statistics
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GreedyCompletion:
    """One server's greedy continuation of one prompt. ``top_logprobs[i]`` maps
    token id -> log-probability for the two likeliest tokens at position i."""

    doc_id: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    top_logprobs: list[dict[int, float]]
    error: str | None = None


# lm-eval's gsm8k task ends a generation at these (its generation_kwargs.until).
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")


def _token_id(key: str) -> int:
    # With return_tokens_as_token_ids vLLM spells tokens "token_id:<id>".
    return int(key.rsplit(":", 1)[-1])


def _post_json(url: str, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def parse_choice(doc_id: int, choice: dict[str, Any]) -> GreedyCompletion:
    """A ``/v1/completions`` choice (with ``return_token_ids`` and token-id logprobs)."""
    token_ids = choice.get("token_ids")
    if not isinstance(token_ids, list):
        raise ValueError("the server returned no token_ids (it needs return_token_ids support, vLLM >= 0.11)")
    top = (choice.get("logprobs") or {}).get("top_logprobs") or []
    return GreedyCompletion(
        doc_id=doc_id,
        token_ids=[int(t) for t in token_ids],
        text=choice.get("text", ""),
        finish_reason=choice.get("finish_reason"),
        top_logprobs=[{_token_id(k): float(v) for k, v in (pos or {}).items()} for pos in top],
    )


def greedy_completions(
    base_url: str,
    served_model: str,
    prompts: Iterable[tuple[int, str]],
    max_tokens: int,
    *,
    timeout_s: float = 600,
    stop: Iterable[str] = GSM8K_STOP,
    progress: Callable[[int, int], None] | None = None,
) -> list[GreedyCompletion]:
    """Greedy completions of ``prompts`` ((doc_id, prompt) pairs), one request at a time,
    each ending at a ``stop`` string (not included) or after ``max_tokens`` tokens.

    A request the server rejects (e.g. a prompt longer than its context) is kept
    as a completion with ``error`` set and no tokens; a connection failure raises."""
    url = base_url.rstrip("/") + "/v1/completions"
    items = list(prompts)
    out = []
    for i, (doc_id, prompt) in enumerate(items):
        payload = {
            "model": served_model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 0,
            "ignore_eos": True,
            "stop": list(stop),
            "return_token_ids": True,
            "logprobs": 2,
            "return_tokens_as_token_ids": True,
        }
        try:
            response = _post_json(url, payload, timeout_s)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            out.append(GreedyCompletion(doc_id, [], "", None, [], error=f"HTTP {e.code}: {detail}"))
        else:
            out.append(parse_choice(doc_id, response["choices"][0]))
        if progress:
            progress(i + 1, len(items))
    return out


@dataclass(frozen=True)
class QuestionParity:
    """Token comparison of one question. ``first_divergence`` is the index of the
    first differing generated token (None: identical); at it, each side's top-2
    (token id, log-probability)."""

    doc_id: int
    baseline_tokens: int
    fused_tokens: int
    common_prefix: int
    first_divergence: int | None
    baseline_top2: list[tuple[int, float]] | None = None
    fused_top2: list[tuple[int, float]] | None = None
    error: str | None = None


def _top2(c: GreedyCompletion, pos: int) -> list[tuple[int, float]] | None:
    if pos >= len(c.top_logprobs):
        return None
    return sorted(c.top_logprobs[pos].items(), key=lambda kv: -kv[1])[:2]


def compare_question(baseline: GreedyCompletion, fused: GreedyCompletion) -> QuestionParity:
    if baseline.doc_id != fused.doc_id:
        raise ValueError(f"comparing different questions: {baseline.doc_id} vs {fused.doc_id}")
    if baseline.error or fused.error:
        return QuestionParity(
            baseline.doc_id, len(baseline.token_ids), len(fused.token_ids), 0, None, error=baseline.error or fused.error
        )
    a, b = baseline.token_ids, fused.token_ids
    common = 0
    for x, y in zip(a, b):
        if x != y:
            break
        common += 1
    if common == len(a) == len(b):
        return QuestionParity(baseline.doc_id, len(a), len(b), common, None)
    return QuestionParity(
        baseline.doc_id, len(a), len(b), common, common, _top2(baseline, common), _top2(fused, common)
    )


def summarize(questions: list[QuestionParity], max_tokens: int) -> dict[str, Any]:
    """Parity section of the report.

    ``token_agreement``: tokens generated identically before each question's
    first divergence, over all tokens compared (the longer side's length per
    question); tokens after a divergence count as disagreeing, since from there
    on the two runs continue different texts."""
    compared = [q for q in questions if q.error is None]
    total = sum(max(q.baseline_tokens, q.fused_tokens) for q in compared)
    agreed = sum(q.common_prefix for q in compared)
    diverged = [q.first_divergence for q in compared if q.first_divergence is not None]
    return {
        "questions": len(questions),
        "compared": len(compared),
        "errors": len(questions) - len(compared),
        "max_tokens": max_tokens,
        "identical": len(compared) - len(diverged),
        "tokens_compared": total,
        "tokens_agreeing": agreed,
        "token_agreement": (agreed / total) if total else None,
        "first_divergence_min": min(diverged) if diverged else None,
        "first_divergence_median": statistics.median(diverged) if diverged else None,
        "per_question": [asdict(q) for q in questions],
    }


def compare(baseline: list[GreedyCompletion], fused: list[GreedyCompletion], max_tokens: int) -> dict[str, Any]:
    """Compare two servers' completions of the same prompts, in the same order."""
    if [c.doc_id for c in baseline] != [c.doc_id for c in fused]:
        raise ValueError("baseline and fused completions are not of the same questions in the same order")
    return summarize([compare_question(a, b) for a, b in zip(baseline, fused)], max_tokens)


def completions_to_json(completions: list[GreedyCompletion]) -> list[dict[str, Any]]:
    return [
        {
            "doc_id": c.doc_id,
            "token_ids": c.token_ids,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "error": c.error,
        }
        for c in completions
    ]
