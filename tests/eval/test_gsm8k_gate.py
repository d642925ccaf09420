"""The verdict on synthetic lm-eval results dicts (the shape simple_evaluate returns)."""

from __future__ import annotations

import pytest

from vllm_rocm_fused.eval.gate import check_thresholds, judge
from vllm_rocm_fused.eval.harness import FilterScore, extract_scores, sample_counts


def lm_eval_results(strict: float, flexible: float, n: int = 1319, task: str = "gsm8k") -> dict:
    def se(p):
        return (p * (1 - p) / (n - 1)) ** 0.5 if n > 1 else "N/A"

    return {
        "results": {
            task: {
                "alias": task,
                "exact_match,strict-match": strict,
                "exact_match_stderr,strict-match": se(strict),
                "exact_match,flexible-extract": flexible,
                "exact_match_stderr,flexible-extract": se(flexible),
            }
        },
        "n-samples": {task: {"original": 1319, "effective": n}},
    }


def verdict(base, fused, **kw):
    return judge(extract_scores(base, "gsm8k"), extract_scores(fused, "gsm8k"), **kw)


def test_extract_scores_and_counts():
    scores = extract_scores(lm_eval_results(0.946, 0.95), "gsm8k")
    assert scores["strict-match"].exact_match == 0.946
    assert scores["strict-match"].stderr == pytest.approx((0.946 * 0.054 / 1318) ** 0.5)
    assert scores["flexible-extract"].exact_match == 0.95
    assert sample_counts(lm_eval_results(0.5, 0.5, n=20), "gsm8k") == (20, 1319)


def test_extract_scores_stderr_na_and_missing_metric():
    res = lm_eval_results(1.0, 1.0, n=1)
    res["results"]["gsm8k"]["exact_match_stderr,strict-match"] = "N/A"
    assert extract_scores(res, "gsm8k")["strict-match"].stderr is None
    del res["results"]["gsm8k"]["exact_match,flexible-extract"]
    with pytest.raises(ValueError, match="exact_match,flexible-extract"):
        extract_scores(res, "gsm8k")
    with pytest.raises(ValueError, match="no entry for task 'gsm8k_local'"):
        extract_scores(res, "gsm8k_local")


def test_pass_sglang_numbers():
    # The SGLang change's reference: 0.955 fused vs 0.946 baseline, gate 0.94.
    v = verdict(lm_eval_results(0.946, 0.95), lm_eval_results(0.955, 0.96), gate=0.94, max_drop=0.02)
    assert v.passed
    assert [c.name for c in v.checks] == ["gate", "max drop"]
    assert "fused strict-match 0.9550 >= gate 0.9400" == v.checks[0].detail


def test_fail_by_gate():
    v = verdict(lm_eval_results(0.93, 0.95), lm_eval_results(0.935, 0.95), gate=0.94, max_drop=0.02)
    assert not v.passed
    assert [c.name for c in v.failures()] == ["gate"]
    assert "0.9350 < gate 0.9400" in v.failures()[0].detail


def test_fail_by_drop():
    v = verdict(lm_eval_results(0.96, 0.96), lm_eval_results(0.945, 0.96), gate=0.94, max_drop=0.01)
    assert [c.name for c in v.failures()] == ["max drop"]
    assert "drop +0.0150 > max drop 0.0100" in v.failures()[0].detail


def test_drop_exactly_at_limit_passes_despite_float_rounding():
    # 0.955 - 0.935 is 0.020000000000000018 in binary floating point.
    v = verdict(lm_eval_results(0.955, 0.9), lm_eval_results(0.935, 0.9), max_drop=0.02)
    assert v.passed


def test_gate_filter_selects_the_metric():
    base, fused = lm_eval_results(0.95, 0.95), lm_eval_results(0.95, 0.90)
    assert verdict(base, fused, max_drop=0.02).passed
    v = verdict(base, fused, max_drop=0.02, metric="flexible-extract")
    assert not v.passed and v.metric == "flexible-extract"


def test_no_thresholds_no_checks_passes():
    v = verdict(lm_eval_results(0.9, 0.9), lm_eval_results(0.1, 0.1))
    assert v.passed and v.checks == []


def test_log_checks_fail_the_verdict():
    s = {"strict-match": FilterScore(0.9, 0.01), "flexible-extract": FilterScore(0.9, 0.01)}
    v = judge(s, s, baseline_unfused=False, fused_active=True)
    assert [c.name for c in v.failures()] == ["baseline unfused"]
    v = judge(s, s, baseline_unfused=True, fused_active=False)
    assert [c.name for c in v.failures()] == ["fused path active"]
    assert v.to_dict()["passed"] is False


@pytest.mark.parametrize(
    "gate, max_drop, metric, match",
    [
        (1.5, None, "strict-match", "--gate"),
        (None, -0.1, "strict-match", "--max-drop"),
        (None, None, "exact", "--gate-filter"),
    ],
)
def test_bad_thresholds(gate, max_drop, metric, match):
    with pytest.raises(ValueError, match=match):
        check_thresholds(gate, max_drop, metric)
