"""``vllm-rocm-fused eval gsm8k`` for real: the trained tiny FP8 Qwen3.5 served by
vLLM at TP=2, baseline then fused, scored by lm-eval offline on tiny-gsm8k questions
it never saw (real scores: numbers from lm-eval's own results, the parity section,
the plugin report, the exit status against the verdict); a server that fails to
start leaves a clear error and no process behind; Ctrl-C stops the server's whole
process group. Eager mode keeps them to a few minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from support.markers import requires_vllm
from support.processes import sigint_as_in_a_terminal
from vllm_rocm_fused.eval.gate import judge
from vllm_rocm_fused.eval.harness import FilterScore
from vllm_rocm_fused.tiny_models import tiny_gsm8k

pytestmark = [requires_vllm, pytest.mark.slow]

MARKER_VAR = "VLLM_ROCM_FUSED_EVAL_TEST_MARKER"


def processes_with(marker: str) -> list[int]:
    """Processes whose environment carries the marker (the CLI's descendants inherit it)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def run_cli(args: list[str], marker: str, timeout_s: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{MARKER_VAR: marker})
    cmd = [sys.executable, "-m", "vllm_rocm_fused.cli", "eval", "gsm8k", *args]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the CLI stops its server on Ctrl-C
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for pid in processes_with(marker):  # only processes this test started
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"eval gsm8k did not finish in {timeout_s} s\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_trained_fp8_tp2_end_to_end(tiny_models, tmp_path):
    """The trained FP8 model, eager: both servers answer unseen tiny-gsm8k questions,
    the fused one exactly as the unfused one (real scores, not ~0: a hand-off that
    drops the scale scores 0 and fails the accuracy bound; a scale tensor read in the
    wrong layout keeps the answers and is caught by test_qwen3_5_fusion's logprob bound).
    lm-eval sends all 24 questions at once (``--concurrency 24``): the servers batch
    requests of mixed lengths as they arrive, under load, so a fused path that breaks
    with the batch composition loses answers here, and a server that fails under load
    fails the run."""
    model = tiny_models("trained-dense-fp8")
    data = tmp_path / "tiny-gsm8k"
    tiny_gsm8k.write_dataset(data)
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    res = run_cli(
        [
            "--model",
            str(model),
            "--tp",
            "2",
            "--limit",
            "24",
            "--data-dir",
            str(data),
            "--max-gen-toks",
            "96",
            "--concurrency",
            "24",
            "--parity-questions",
            "4",
            "--parity-tokens",
            "96",
            "--out",
            str(out),
            "--",
            "--enforce-eager",
        ],
        marker,
        timeout_s=1200,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert processes_with(marker) == []
    assert "[baseline] lm-eval done" in res.stderr and "[fused] lm-eval done" in res.stderr

    report = json.loads((out / "report.json").read_text())
    assert report["tp"] == 2 and report["task"]["task"] == "gsm8k_local"
    assert report["task"]["questions"] == 24 and report["task"]["questions_available"] == 1319
    assert report["task"]["same_prompts"] is True

    # Every score is lm-eval's own number for its run, and the model knows the task.
    for label in ("baseline", "fused"):
        raw = json.loads((out / label / "lm_eval_results.json").read_text())["results"]["gsm8k_local"]
        for name in ("strict-match", "flexible-extract"):
            score = report["scores"][label][name]
            assert score["exact_match"] == raw[f"exact_match,{name}"]
            assert score["stderr"] == raw[f"exact_match_stderr,{name}"]
        assert report["scores"][label]["strict-match"]["exact_match"] >= 0.9, report["scores"]
        assert len((out / label / "samples.jsonl").read_text().splitlines()) == 24
    assert report["scores"]["fused"]["strict-match"] == report["scores"]["baseline"]["strict-match"]

    # Which path ran: baseline with the plugin off, fused with sites on both ranks.
    servers = report["servers"]
    assert servers["baseline"]["plugin"]["disabled"] and not servers["baseline"]["plugin"]["fused_sites"]
    fused = servers["fused"]["plugin"]
    assert fused["fused_active"]
    assert {line.split("rank ")[1][0] for line in fused["fused_sites"]} == {"0", "1"}
    assert all("TP=2" in line for line in fused["fused_sites"])
    assert fused["site_paths"], "no 'site ... ran ...' line: the fused op never ran"

    # Parity (eager): the fused path computes exactly what the unfused model does, so the
    # 4 greedy answers (each up to lm-eval's stop string) are identical token for token.
    parity = report["parity"]
    assert (parity["questions"], parity["compared"], parity["errors"]) == (4, 4, 0)
    assert parity["identical"] == 4 and parity["token_agreement"] == 1.0
    for q in parity["per_question"]:
        assert 10 < q["baseline_tokens"] == q["fused_tokens"] < 96  # the answer, cut at "Question:"

    # The exit status is the verdict on these scores.
    def scores(label):
        return {k: FilterScore(**v) for k, v in report["scores"][label].items()}

    verdict = judge(scores("baseline"), scores("fused"), max_drop=0.02, baseline_unfused=True, fused_active=True)
    assert report["verdict"]["passed"] and verdict.passed
    md = (out / "report.md").read_text()
    assert md.startswith("# GSM8K, fused vs baseline: PASS")
    assert "## Parity (greedy, token by token)" in md and "vllm-rocm-fused: fused sites" in md


def one_question_gsm8k(tmp_path):
    """A GSM8K folder whose train and test splits repeat one easy question."""
    data = tmp_path / "gsm8k"
    data.mkdir()
    row = json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n"
    for name in ("train.jsonl", "test.jsonl"):
        (data / name).write_text(row * 6)
    return data


def test_server_that_fails_to_start(tiny_models, tmp_path):
    # A context longer than the checkpoint allows: vLLM's config check fails in the API
    # server before any engine process starts (what the CLI does with a server that
    # fails is the same whichever process fails; a server whose engine and workers are
    # running is stopped as a group in test_ctrl_c_while_the_server_starts).
    data = one_question_gsm8k(tmp_path)
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    res = run_cli(
        [
            "--model",
            str(tiny_models("dense-fp8")),
            "--tp",
            "2",
            "--limit",
            "1",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--",
            "--enforce-eager",
            "--max-model-len",
            "100000",
        ],
        marker,
        timeout_s=600,
    )
    assert res.returncode == 2, res.stderr[-4000:]
    assert processes_with(marker) == []
    assert "vllm serve exited with code" in res.stderr
    assert "--- last lines of the vllm serve log ---" in res.stderr
    assert f"first error in {out / 'baseline' / 'server.log'}: " in res.stderr
    assert "User-specified max_model_len (100000) is greater than the derived max_model_len" in res.stderr
    assert (out / "baseline" / "server.log").is_file()
    assert not (out / "fused").exists() and not (out / "report.json").exists()


def test_ctrl_c_while_the_server_starts(tiny_models, tmp_path):
    # Ctrl-C reaches only the CLI (the server has its own process group); the CLI must
    # stop the whole group, engine core included.
    model = tiny_models("dense-fp8")
    data = one_question_gsm8k(tmp_path)
    out = tmp_path / "out"
    log = out / "baseline" / "server.log"
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER_VAR: marker})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_rocm_fused.cli",
            "eval",
            "gsm8k",
            "--model",
            str(model),
            "--tp",
            "2",
            "--limit",
            "1",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--",
            "--enforce-eager",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 300
        while "(EngineCore" not in (log.read_text(errors="replace") if log.is_file() else ""):
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "the engine core never started"
            time.sleep(0.5)
        assert len(processes_with(marker)) > 2  # the CLI, the API server, the engine core (at least)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftover = processes_with(marker)
        for pid in leftover:  # only processes this test started
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-4000:]
    assert "interrupted" in err
    assert leftover == []
