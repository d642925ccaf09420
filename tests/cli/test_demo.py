"""``vllm-rocm-fused demo``: the plugin report, the model cache, and (slow) the
whole demo against a real ``vllm serve`` at TP=2: end to end, a failed start,
and Ctrl-C, each leaving no process behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.processes import new_marker, processes_left, processes_with, sigint_as_in_a_terminal
from vllm_rocm_fused.cli import demo

REPO = Path(__file__).resolve().parents[2]
FAST = ["--requests", "2"]  # the default, trained model: one chat and one 5-shot completion


def test_plugin_report_shows_each_message_once():
    lines = [
        "(EngineCore pid=11) INFO 11-29 23:04:44 [log.py:27] vllm-rocm-fused: registered the op",
        "(VllmWorker-0 pid=12) INFO 11-29 23:05:17 [log.py:27] vllm-rocm-fused: registered the op",
        "(VllmWorker-1 pid=13) INFO 11-29 23:05:17 [log.py:27] vllm-rocm-fused: registered the op",
        "(Worker_TP0 pid=12) INFO 11-29 23:05:21 [log.py:27] vllm-rocm-fused: fused sites (TP=2, rank 0): 5/6",
        "(Worker_TP1 pid=13) INFO 11-29 23:05:21 [log.py:27] vllm-rocm-fused: fused sites (TP=2, rank 1): 5/6",
        "(Worker_TP1 pid=13) INFO 11-29 23:05:30 [log.py:27] vllm-rocm-fused: site x ran fused (12 tokens)",
        "(Worker_TP0 pid=12) INFO 11-29 23:05:30 [log.py:27] vllm-rocm-fused: site x ran generic (12 tokens)",
        "(APIServer pid=10) INFO 11-29 23:05:31 [api.py:1] something else",
        "vllm-rocm-fused: a line without vLLM's prefix",
    ]
    assert demo.plugin_report(lines) == [
        "vllm-rocm-fused: registered the op   [3 processes]",
        "vllm-rocm-fused: fused sites (TP=2, rank 0,1): 5/6   [2 processes]",
        "vllm-rocm-fused: site x ran fused (12 tokens)",  # ranks that disagree stay apart
        "vllm-rocm-fused: site x ran generic (12 tokens)",
        "vllm-rocm-fused: a line without vLLM's prefix",
    ]


def test_model_cache_is_reused_until_the_recipe_changes(tmp_path, capsys):
    first = demo.ensure_model(tmp_path, "dense-bf16", 0, {"num_hidden_layers": 4}, rebuild=False)
    assert "building tiny model" in capsys.readouterr().out
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = demo.ensure_model(tmp_path, "dense-bf16", 0, {"num_hidden_layers": 4}, rebuild=False)
    assert again == first and "reusing" in capsys.readouterr().out
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    other = demo.ensure_model(tmp_path, "dense-bf16", 0, {"num_hidden_layers": 5}, rebuild=False)
    assert other != first
    demo.ensure_model(tmp_path, "dense-bf16", 0, {"num_hidden_layers": 4}, rebuild=True)
    assert "building tiny model" in capsys.readouterr().out


def _run_demo(args, tmp_path, marker, timeout=900):
    env = {**os.environ, **marker, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vllm_rocm_fused.cli", "demo", "--cache-dir", str(tmp_path), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_questions_are_unseen_test_questions_with_their_answers():
    from vllm_rocm_fused.tiny_models import tiny_gsm8k

    train, test = tiny_gsm8k.split()
    questions = demo.demo_questions(4)
    assert [q.kind for q in questions] == ["chat", "completion", "chat", "completion"]
    for q, item in zip(questions, test):
        assert q.question == item["question"] and q.expected == tiny_gsm8k.final_answer(item["answer"])
    completion = questions[1].prompt
    assert completion.endswith(f"Question: {test[1]['question']}\nAnswer:")
    assert completion.count("Question: ") == demo.FEWSHOT + 1


def test_reply_answer_reads_lm_evals_strict_match():
    assert demo.reply_answer(" Tom has 3+4 = <<3+4=7>>7.\n#### 7\n\n") == 7
    assert demo.reply_answer("#### 1,234") == 1234
    assert demo.reply_answer("the answer is 7") is None


def test_bad_preset_is_an_error_before_serving(tmp_path):
    marker = new_marker()
    res = _run_demo(["--preset", "dense-fp4"], tmp_path, marker, timeout=120)
    assert res.returncode == 2
    assert "unknown preset 'dense-fp4'" in res.stderr
    assert "building" not in res.stdout and "starting vllm serve" not in res.stdout
    assert list(tmp_path.iterdir()) == []


def _demo_error(argv, tmp_path, capsys):
    """Run the demo in this process; return (exit status, stderr). Nothing may be built."""
    from vllm_rocm_fused.cli.main import main

    cache = tmp_path / "cache"
    status = main(["demo", "--cache-dir", str(cache), *argv])
    out, err = capsys.readouterr()
    assert "building" not in out and "starting vllm serve" not in out
    assert not cache.exists()
    return status, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-tokens", "-1"], "argument --max-tokens: must be >= 1, got -1"),
        (["--requests", "0"], "argument --requests: must be >= 1, got 0"),
        (["--tp", "0"], "argument --tp: must be >= 1, got 0"),
        (["--seed", "-3"], "argument --seed: must be >= 0, got -3"),
        (["--startup-timeout", "0"], "argument --startup-timeout: must be > 0, got 0.0"),
    ],
)
def test_bad_numbers_are_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _demo_error(argv, tmp_path, capsys)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_tp_the_model_cannot_be_split_into_is_refused_before_building(tmp_path, capsys):
    status, err = _demo_error(["--preset", "dense-bf16", "--tp", "3"], tmp_path, capsys)
    assert status == 2
    (line,) = err.strip().splitlines()  # one line: the first reason and how many more
    assert line.startswith(
        "demo: error: --tp 3: dense-bf16 cannot be split across 3 ranks: "
        "num_attention_heads = 4 does not split across TP=3 (and "
    )


def test_invalid_plugin_setting_is_refused_before_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_ROCM_FUSED_BACKEND", "bogus")
    status, err = _demo_error(["--preset", "dense-bf16"], tmp_path, capsys)
    assert status == 2
    assert err.strip() == (
        "demo: error: invalid setting VLLM_ROCM_FUSED_BACKEND='bogus': not a backend (one of auto, native, cuda, rocm)"
    )


def test_cache_dir_that_is_a_file_is_refused(tmp_path, capsys):
    from vllm_rocm_fused.cli.main import main

    f = tmp_path / "file"
    f.write_text("")
    assert main(["demo", "--preset", "dense-bf16", "--cache-dir", str(f)]) == 2
    assert f"--cache-dir {f}: exists and is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    marker = new_marker()
    res = _run_demo(FAST, tmp_path, marker)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "building tiny model 'trained-dense-fp8'" in out and "server healthy" in out
    assert out.count("\n[chat] ") == 1 and out.count("\n[completion] ") == 1
    # the trained model answers both unseen questions right, each reply ending its answer
    assert out.count(": right (") == 2 and "2/2 answers right" in out
    assert "finish: stop" in out
    assert "server stopped (exit code 0)" in out
    report = out.split("plugin report", 1)[1]
    assert "vllm-rocm-fused: registered" in report
    assert "TP=2" in report  # the per-rank fused-sites report of both workers
    assert processes_with(marker) == []
    # the cached model is reused the second time (and served again: a short run)
    assert demo.model_folder(tmp_path, "trained-dense-fp8", 0, {}).is_dir()


@pytest.mark.slow
def test_demo_server_that_fails_to_start(tmp_path):
    marker = new_marker()
    res = _run_demo([*FAST, "--serve-arg=--no-such-flag"], tmp_path, marker)
    assert res.returncode == 1
    assert "vllm serve exited with code" in res.stderr
    assert "--- last lines of the vllm serve log ---" in res.stderr
    assert "unrecognized arguments: --no-such-flag" in res.stderr
    assert processes_with(marker) == []


@pytest.mark.slow
def test_demo_ctrl_c_while_waiting(tmp_path):
    marker = new_marker()
    env = {**os.environ, **marker, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_rocm_fused.cli", "demo", "--cache-dir", str(tmp_path), *FAST],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 600
        logs = tmp_path / "logs"
        # wait until the server's engine is starting (its own process group, a few processes)
        while time.monotonic() < deadline:
            texts = [p.read_text(errors="replace") for p in logs.glob("*.log")] if logs.is_dir() else []
            if any("(EngineCore" in t for t in texts):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        assert len(processes_with(marker)) >= 3
        proc.send_signal(signal.SIGINT)  # what a Ctrl-C in the terminal sends the demo
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    assert processes_left(marker) == []
