"""``vllm-rocm-fused eval gsm8k`` for real: the tiny FP8 Qwen3.5 served by vLLM at
TP=2, baseline then fused, scored by lm-eval offline on a few GSM8K questions.

Random weights score ~0: these tests check the pipeline (numbers from lm-eval's
own results, the parity section, the plugin report, the exit status against the
verdict), that a server that fails to start leaves a clear error and no process
behind, and that Ctrl-C stops the server's whole process group. Eager mode and short generations keep them to a few minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from gsm8k_fakes import SHARED_GSM8K
from support.markers import requires_vllm

from vllm_rocm_fused.eval.gate import judge
from vllm_rocm_fused.eval.harness import FilterScore

pytestmark = [requires_vllm, pytest.mark.slow]
needs_gsm8k = pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").is_file(),
                                 reason=f"GSM8K data not found at {SHARED_GSM8K}")

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
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


@needs_gsm8k
def test_tiny_fp8_tp2_end_to_end(tiny_models, tmp_path):
    model = tiny_models("dense-fp8")
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    res = run_cli(["--model", str(model), "--tp", "2", "--limit", "4", "--data-dir", str(SHARED_GSM8K),
                   "--max-gen-toks", "16", "--concurrency", "4", "--parity-questions", "3", "--parity-tokens", "16",
                   "--out", str(out), "--", "--enforce-eager"], marker, timeout_s=900)
    assert res.returncode in (0, 1), res.stderr[-4000:]
    assert processes_with(marker) == []
    assert "[baseline] lm-eval done" in res.stderr and "[fused] lm-eval done" in res.stderr

    report = json.loads((out / "report.json").read_text())
    assert report["tp"] == 2 and report["task"]["task"] == "gsm8k_local"
    assert report["task"]["questions"] == 4 and report["task"]["questions_available"] == 1319
    assert report["task"]["same_prompts"] is True

    # Every score is lm-eval's own number for its run.
    for label in ("baseline", "fused"):
        raw = json.loads((out / label / "lm_eval_results.json").read_text())["results"]["gsm8k_local"]
        for name in ("strict-match", "flexible-extract"):
            score = report["scores"][label][name]
            assert score["exact_match"] == raw[f"exact_match,{name}"]
            assert score["stderr"] == raw[f"exact_match_stderr,{name}"]
        assert len((out / label / "samples.jsonl").read_text().splitlines()) == 4

    # Which path ran: baseline with the plugin off, fused with sites on both ranks.
    servers = report["servers"]
    assert servers["baseline"]["plugin"]["disabled"] and not servers["baseline"]["plugin"]["fused_sites"]
    fused = servers["fused"]["plugin"]
    assert fused["fused_active"]
    assert {line.split("rank ")[1][0] for line in fused["fused_sites"]} == {"0", "1"}
    assert all("TP=2" in line for line in fused["fused_sites"])
    assert fused["site_paths"], "no 'site ... ran ...' line: the fused op never ran"

    # Parity: 3 questions, 16 tokens a side (EOS ignored), a divergence index within range.
    parity = report["parity"]
    assert (parity["questions"], parity["compared"], parity["errors"]) == (3, 3, 0)
    for q in parity["per_question"]:
        assert q["baseline_tokens"] == q["fused_tokens"] == 16
        assert q["first_divergence"] is None or 0 <= q["first_divergence"] < 16
    assert parity["tokens_compared"] == 48
    assert parity["identical"] == sum(q["first_divergence"] is None for q in parity["per_question"])

    # The exit status is the verdict on these scores.
    def scores(label):
        return {k: FilterScore(**v) for k, v in report["scores"][label].items()}

    verdict = judge(scores("baseline"), scores("fused"), max_drop=0.02, baseline_unfused=True, fused_active=True)
    assert report["verdict"]["passed"] == verdict.passed
    assert res.returncode == (0 if verdict.passed else 1)
    md = (out / "report.md").read_text()
    assert md.startswith(f"# GSM8K, fused vs baseline: {'PASS' if verdict.passed else 'FAIL'}")
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
    # A checkpoint without weights: vLLM starts its engine and both TP workers, which then fail.
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_models("dense-fp8"), broken, ignore=shutil.ignore_patterns("*.safetensors"))
    data = one_question_gsm8k(tmp_path)
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    res = run_cli(["--model", str(broken), "--tp", "2", "--limit", "1", "--data-dir", str(data),
                   "--out", str(out), "--", "--enforce-eager"], marker, timeout_s=600)
    assert res.returncode == 2, res.stderr[-4000:]
    assert processes_with(marker) == []
    assert "vllm serve exited with code" in res.stderr
    assert "--- last lines of the vllm serve log ---" in res.stderr
    assert f"first error in {out / 'baseline' / 'server.log'}: " in res.stderr
    assert "Cannot find any model weights" in res.stderr
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
    proc = subprocess.Popen([sys.executable, "-m", "vllm_rocm_fused.cli", "eval", "gsm8k", "--model", str(model),
                             "--tp", "2", "--limit", "1", "--data-dir", str(data), "--out", str(out),
                             "--", "--enforce-eager"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
