"""tiny-gsm8k, the task the trained tiny models learned: GSM8K's schema and format,
answers right by construction, determinism per seed, disjoint splits, the CLI."""

import json
import random
import re
import subprocess
import sys

import pytest

from vllm_rocm_fused.tiny_models import tiny_gsm8k

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval's gsm8k strict-match regex


@pytest.fixture(scope="module")
def splits():
    return tiny_gsm8k.split()


def test_schema_and_sizes_are_gsm8ks(splits):
    train, test = splits
    assert (len(train), len(test)) == (7473, 1319)
    for row in train[:200] + test[:200]:
        assert set(row) == {"question", "answer"}
        assert row["question"].endswith("?")
        *steps, last = row["answer"].split("\n")
        assert 1 <= len(steps) <= 4 and last == f"#### {tiny_gsm8k.final_answer(row['answer'])}"
        assert all("<<" in s and ">>" in s for s in steps)  # GSM8K's calculator annotations
        assert GSM8K_STRICT.search(row["answer"]).group(1) == last[5:]


def test_every_answer_is_right_by_construction(splits):
    train, test = splits
    assert all(tiny_gsm8k.check_answer(r["answer"]) for r in train + test)
    # check_answer is a real check: a wrong step or a wrong final answer fails it
    answer = test[0]["answer"]
    value = tiny_gsm8k.final_answer(answer)
    assert not tiny_gsm8k.check_answer(answer.replace(f"#### {value}", f"#### {value + 1}"))
    a, op, b, c = re.search(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", answer).groups()
    assert not tiny_gsm8k.check_answer(answer.replace(f"={c}>>", f"={int(c) + 1}>>", 1))


def test_an_independent_reading_of_the_steps_agrees(splits):
    """Evaluate each step's expression with Python (not the generator's own code)."""
    _, test = splits
    for row in random.Random(0).sample(test, 300):
        for expr, value, shown in re.findall(r"<<([0-9+\-*/]+)=(\d+)>>(\d+)", row["answer"]):
            assert eval(expr.replace("/", "//")) == int(value) == int(shown)  # noqa: S307 - digits and +-*/ only
            if "/" in expr:
                num, den = map(int, expr.split("/"))
                assert num % den == 0


def test_all_templates_and_operations_occur(splits):
    _, test = splits
    text = "\n".join(r["answer"] for r in test)
    assert all(f"{op}" in text for op in ("+", "-", "*", "/"))
    steps = [r["answer"].count("<<") for r in test]
    assert set(steps) == {1, 2, 3, 4}


def test_deterministic_per_seed_and_different_across_seeds():
    a, b = tiny_gsm8k.split(0, 50, 20), tiny_gsm8k.split(0, 50, 20)
    assert a == b
    assert tiny_gsm8k.split(1, 50, 20) != a


def test_test_split_is_disjoint_from_train_and_from_training_streams(splits):
    train, test = splits
    test_questions = {r["question"] for r in test}
    assert len(test_questions) == len(test)
    assert not test_questions & {r["question"] for r in train}
    stream = tiny_gsm8k.problems(1, exclude=test_questions)
    assert not test_questions & {next(stream)["question"] for _ in range(5000)}


def test_bad_sizes_name_the_argument():
    with pytest.raises(ValueError, match="train_size must be a non-negative integer"):
        tiny_gsm8k.split(0, -1, 10)


def test_fewshot_prompt_is_lm_evals_gsm8k_format(splits):
    train, test = splits
    prompt = tiny_gsm8k.fewshot_prompt(test[0]["question"], train[:2])
    # doc_to_text "Question: {{question}}\nAnswer:", target " {{answer}}", shots joined by "\n\n"
    assert prompt == (
        f"Question: {train[0]['question']}\nAnswer: {train[0]['answer']}\n\n"
        f"Question: {train[1]['question']}\nAnswer: {train[1]['answer']}\n\n"
        f"Question: {test[0]['question']}\nAnswer:"
    )


def test_cli_writes_the_dataset(tmp_path):
    out = tmp_path / "data"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_rocm_fused.cli",
            "tiny-gsm8k",
            "--out",
            str(out),
            "--train-size",
            "30",
            "--test-size",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (30, 12)
    assert (train, test) == tiny_gsm8k.split(0, 30, 12)
    bad = subprocess.run(
        [sys.executable, "-m", "vllm_rocm_fused.cli", "tiny-gsm8k", "--out", str(tmp_path / "x"), "--test-size", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--test-size must be >= 0" in bad.stderr
    assert not (tmp_path / "x").exists()
