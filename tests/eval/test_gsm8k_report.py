"""report.md is rendered from report.json's dict alone."""

from __future__ import annotations

import json

from vllm_rocm_fused.eval.report import deltas, render_markdown, versions, write_report


def synthetic_report(**task_extra) -> dict:
    scores = {
        "baseline": {
            "strict-match": {"exact_match": 0.946, "stderr": 0.0062},
            "flexible-extract": {"exact_match": 0.95, "stderr": None},
        },
        "fused": {
            "strict-match": {"exact_match": 0.955, "stderr": 0.0057},
            "flexible-extract": {"exact_match": 0.951, "stderr": None},
        },
    }
    server = {
        "env": {"VLLM_ROCM_FUSED_DISABLE": "1"},
        "log": "baseline/server.log",
        "startup_s": 100.0,
        "eval_s": 300.0,
        "max_model_len": 32768,
        "plugin": {
            "disabled": True,
            "fused_active": False,
            "fused_sites": [],
            "site_paths": [],
            "lines": ["vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing"],
        },
    }
    return {
        "command": "vllm-rocm-fused eval gsm8k --model m --tp 8",
        "runtime_s": 1234.0,
        "model": "m",
        "served_model": "m",
        "tp": 8,
        "task": {
            "task": "gsm8k",
            "source": "lm-eval stock task (Hugging Face Hub)",
            "num_fewshot": 5,
            "questions": 1319,
            "questions_available": 1319,
            "max_gen_toks": 256,
            **task_extra,
        },
        "versions": {"python": "3.11"},
        "servers": {"baseline": server, "fused": {**server, "plugin": {**server["plugin"], "lines": []}}},
        "scores": scores,
        "delta": deltas(scores["baseline"], scores["fused"]),
        "parity": None,
        "verdict": {"metric": "strict-match", "passed": True, "checks": []},
    }


def test_markdown_from_the_dict(tmp_path):
    r = synthetic_report(same_prompts=True)
    json_path, md_path = write_report(r, tmp_path)
    assert json.loads(json_path.read_text())["delta"]["strict-match"] == r["delta"]["strict-match"]
    md = md_path.read_text()
    assert md.startswith("# GSM8K, fused vs baseline: PASS")
    assert "| strict-match | 0.9460 ± 0.0062 | 0.9550 ± 0.0057 | +0.0090 |" in md
    assert "| flexible-extract | 0.9500 | 0.9510 | +0.0010 |" in md
    assert "No checks were asked for" in md and "WARNING" not in md
    assert "(no vllm-rocm-fused lines in the log)" in md
    assert "Baseline server (`VLLM_ROCM_FUSED_DISABLE=1`): plugin disabled" in md
    assert "## Parity" not in md


def test_different_prompts_are_flagged():
    assert "WARNING: the two servers were not sent the same prompts" in render_markdown(
        synthetic_report(same_prompts=False)
    )


def test_versions_name_the_packages():
    v = versions()
    assert {"python", "platform", "vllm-rocm-fused", "torch"} <= v.keys()
