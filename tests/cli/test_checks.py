"""cli.checks: the argument checks that run before anything starts."""

import argparse
import json

import pytest

from vllm_rocm_fused.cli import checks


@pytest.mark.parametrize(
    "fn, text, expected",
    [
        (checks.positive_int, "3", 3),
        (checks.non_negative_int, "0", 0),
        (checks.positive_float, "0.5", 0.5),
        (checks.fraction, "1", 1.0),
    ],
)
def test_types_accept_good_values(fn, text, expected):
    assert fn(text) == expected


@pytest.mark.parametrize(
    "fn, text, message",
    [
        (checks.positive_int, "0", "must be >= 1, got 0"),
        (checks.positive_int, "-1", "must be >= 1, got -1"),
        (checks.positive_int, "two", "expected an integer, got 'two'"),
        (checks.non_negative_int, "-1", "must be >= 0, got -1"),
        (checks.positive_float, "0", "must be > 0, got 0.0"),
        (checks.positive_float, "nan", "must be > 0, got nan"),
        (checks.fraction, "1.5", "must be in [0, 1], got 1.5"),
    ],
)
def test_types_reject_bad_values_with_the_reason(fn, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fn(text)


@pytest.mark.parametrize("value", ["Qwen/Qwen3.5-397B-A17B-FP8", "gpt2", "org/model.v1_2"])
def test_hub_ids_pass(value):
    assert checks.could_be_hub_id(value) and checks.model_problem(value) is None


@pytest.mark.parametrize("value", ["/nonexistent", "./missing/model", "a/b/c", "org/-x", "org/a..b", "~/m", ""])
def test_paths_that_do_not_exist_and_cannot_be_ids_are_refused(value):
    problem = checks.model_problem(value, "--model")
    assert problem is not None and problem.startswith("--model")


def test_existing_paths_pass_even_when_they_could_not_be_ids(tmp_path):
    folder = tmp_path / "a b" / "model"
    folder.mkdir(parents=True)
    assert checks.model_problem(str(folder)) is None
    assert "no such file or folder" in checks.model_problem(str(tmp_path / "other"), "--tokenizer")


def _model(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_tp_against_the_heads_of_a_local_checkpoint(tmp_path):
    model = _model(
        tmp_path, num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4
    )
    assert checks.tp_problem(model, 1) is None and checks.tp_problem(model, 2) is None
    assert checks.tp_problem(model, 3) == (
        f"--tp 3: {model} has num_attention_heads = 4, which vLLM cannot split across 3 ranks"
    )
    # TP=4: KV heads would be replicated, but Qwen3.5's 2 linear-attention key heads cannot be split
    assert "linear_num_key_heads = 2" in checks.tp_problem(model, 4)


def test_kv_heads_fewer_than_ranks_are_replicated(tmp_path):
    model = _model(tmp_path, text_config={"num_attention_heads": 8, "num_key_value_heads": 2})
    assert checks.tp_problem(model, 4) is None and checks.tp_problem(model, 8) is None
    assert "num_key_value_heads = 2" in checks.tp_problem(
        _model(tmp_path, num_attention_heads=6, num_key_value_heads=2), 3
    )


def test_tp_check_passes_what_it_cannot_read(tmp_path):
    assert checks.tp_problem("Qwen/Qwen3.5-397B-A17B-FP8", 3) is None
    assert checks.tp_problem(str(tmp_path), 3) is None  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert checks.tp_problem(str(tmp_path), 3) is None
