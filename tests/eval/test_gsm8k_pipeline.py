"""The whole ``run_gsm8k`` pipeline against fake servers: lm-eval really runs (its
prompts, its filters, its scoring) on answers the test chose, so every expected
score below is a count of questions the fake answered right."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from vllm_rocm_fused.eval.gsm8k import Gsm8kRun, format_command, run_gsm8k


def _run(tmp_path, mini_gsm8k, tokenizer_dir, factory, monkeypatch, **overrides):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = Gsm8kRun(
        model=str(tokenizer_dir),
        out_dir=tmp_path / "out",
        tp=2,
        data_dir=str(mini_gsm8k),
        concurrency=2,
        max_gen_toks=32,
        parity_questions=3,
        parity_tokens=12,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.command = format_command(cfg)
    messages = []
    status, report = run_gsm8k(cfg, messages.append, server_factory=factory)
    return status, report, cfg.out_dir, messages


def test_pass_scores_parity_and_files(tmp_path, mini_gsm8k, tokenizer_dir, fake_servers, monkeypatch):
    # Baseline wrong on question 1; fused wrong on question 1 too, and its greedy
    # tokens differ from position 5 on.
    factory = fake_servers(baseline={"wrong": {1}}, fused={"wrong": {1}, "diverge_at": 5})
    status, report, out, messages = _run(tmp_path, mini_gsm8k, tokenizer_dir, factory, monkeypatch, gate=0.8)

    assert status == 0, report["verdict"]
    assert report["task"]["task"] == "gsm8k_local"
    assert report["task"]["questions"] == report["task"]["questions_available"] == 6
    assert report["task"]["same_prompts"] is True
    for label in ("baseline", "fused"):
        for name in ("strict-match", "flexible-extract"):
            assert report["scores"][label][name]["exact_match"] == pytest.approx(5 / 6)
            assert report["scores"][label][name]["stderr"] > 0
    assert report["delta"] == {"strict-match": 0.0, "flexible-extract": 0.0}
    assert [c["name"] for c in report["verdict"]["checks"]] == [
        "baseline unfused",
        "fused path active",
        "gate",
        "max drop",
    ]

    parity = report["parity"]
    assert parity["questions"] == parity["compared"] == 3
    assert parity["identical"] == 0
    assert [q["first_divergence"] for q in parity["per_question"]] == [5, 5, 5]
    assert parity["token_agreement"] == pytest.approx(15 / 36)
    assert parity["per_question"][0]["baseline_top2"][0][1] == -0.5

    # The plugin's lines: deduplicated, process prefixes gone, both ranks' summaries kept.
    fused_plugin = report["servers"]["fused"]["plugin"]
    assert fused_plugin["fused_active"] and len(fused_plugin["fused_sites"]) == 2
    assert fused_plugin["site_paths"] == [
        "vllm-rocm-fused: site attn_input ran generic via backend native (first such call: 7 tokens)"
    ]
    assert report["servers"]["baseline"]["plugin"]["lines"] == [
        "vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing"
    ]

    # Files: the report pair, the offline task, per-server logs/results/samples, parity tokens.
    assert json.loads((out / "report.json").read_text())["scores"] == report["scores"]
    md = (out / "report.md").read_text()
    assert md.startswith("# GSM8K, fused vs baseline: PASS")
    assert "| strict-match | 0.8333 ± " in md and "first divergence: earliest at token 5" in md
    assert "site attn_input ran generic via backend native" in md
    assert "data_files" in (out / "tasks" / "gsm8k_local.yaml").read_text()
    for label in ("baseline", "fused"):
        assert (out / label / "server.log").is_file()
        raw = json.loads((out / label / "lm_eval_results.json").read_text())
        assert raw["results"]["gsm8k_local"]["exact_match,strict-match"] == pytest.approx(5 / 6)
        rows = [json.loads(line) for line in (out / label / "samples.jsonl").read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == list(range(6))
        assert rows[1]["strict-match"] == {"extracted": "43", "exact_match": 0.0}
    saved = json.loads((out / "parity.json").read_text())
    assert saved["baseline"][0]["token_ids"][:5] == saved["fused"][0]["token_ids"][:5]
    assert saved["baseline"][0]["token_ids"][5] != saved["fused"][0]["token_ids"][5]
    assert any("verdict: PASS" in m for m in messages)


def test_fail_by_drop_and_fused_path_missing(tmp_path, mini_gsm8k, tokenizer_dir, fake_servers, monkeypatch):
    # Fused gets 2 more wrong (4/6 vs 6/6: drop 0.333 > 0.02) and its log shows no fused sites.
    factory = fake_servers(
        fused={"wrong": {0, 3}}, fused_log=["(APIServer pid=1) INFO vllm-rocm-fused: registered the fused op"]
    )
    status, report, out, _ = _run(
        tmp_path, mini_gsm8k, tokenizer_dir, factory, monkeypatch, limit=6, parity_questions=0
    )
    assert status == 1
    assert report["scores"]["baseline"]["strict-match"]["exact_match"] == pytest.approx(1.0)
    assert report["scores"]["fused"]["strict-match"]["exact_match"] == pytest.approx(4 / 6)
    failed = {c["name"] for c in report["verdict"]["checks"] if not c["passed"]}
    assert failed == {"max drop", "fused path active"}
    assert report["parity"] is None
    assert (out / "report.md").read_text().startswith("# GSM8K, fused vs baseline: FAIL")
