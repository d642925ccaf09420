"""Token-by-token comparison of greedy completions."""

from __future__ import annotations

import pytest

from vllm_rocm_fused.eval.parity import GreedyCompletion, compare, parse_choice


def completion(doc_id, ids, error=None):
    top = [{t: -0.1, t + 1: -2.0} for t in ids]
    return GreedyCompletion(doc_id, list(ids), "", "length", top, error)


def test_identical_diverging_and_shorter():
    base = [completion(0, [1, 2, 3, 4]), completion(1, [5, 6, 7, 8]), completion(2, [9, 9, 9, 9])]
    fused = [completion(0, [1, 2, 3, 4]), completion(1, [5, 6, 70, 8]), completion(2, [9, 9])]
    p = compare(base, fused, max_tokens=4)
    assert p["identical"] == 1
    assert [q["first_divergence"] for q in p["per_question"]] == [None, 2, 2]
    assert p["tokens_compared"] == 12 and p["tokens_agreeing"] == 4 + 2 + 2
    assert p["token_agreement"] == pytest.approx(8 / 12)
    assert p["first_divergence_min"] == 2 and p["first_divergence_median"] == 2
    q = p["per_question"][1]
    assert q["baseline_top2"] == [(7, -0.1), (8, -2.0)] and q["fused_top2"] == [(70, -0.1), (71, -2.0)]
    assert p["per_question"][2]["fused_top2"] is None  # the fused side ended there


def test_errors_are_counted_not_compared():
    base = [completion(0, [1, 2]), completion(1, [], error="HTTP 400: prompt too long")]
    fused = [completion(0, [1, 2]), completion(1, [3])]
    p = compare(base, fused, max_tokens=2)
    assert (p["compared"], p["errors"], p["identical"]) == (1, 1, 1)
    assert p["token_agreement"] == 1.0
    assert p["per_question"][1]["error"].startswith("HTTP 400")


def test_all_identical_has_no_divergence():
    p = compare([completion(3, [1, 2])], [completion(3, [1, 2])], max_tokens=2)
    assert p["first_divergence_min"] is None and p["identical"] == 1


def test_questions_must_match():
    with pytest.raises(ValueError, match="same questions"):
        compare([completion(0, [1])], [completion(1, [1])], max_tokens=1)


def test_parse_choice_vllm_shape():
    choice = {
        "index": 0,
        "text": " 18",
        "finish_reason": "length",
        "token_ids": [220, 972],
        "logprobs": {
            "top_logprobs": [{"token_id:220": -0.01, "token_id:15": -5.2}, {"token_id:972": -0.3, "token_id:1": -1.5}]
        },
    }
    c = parse_choice(7, choice)
    assert c.doc_id == 7 and c.token_ids == [220, 972] and c.top_logprobs[0] == {220: -0.01, 15: -5.2}
    with pytest.raises(ValueError, match="token_ids"):
        parse_choice(7, {"text": "x"})
