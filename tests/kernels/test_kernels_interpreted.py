"""The Triton kernels' logic on CPU: every case of interpret_cases.py is a test of its own.

The selected cases run in two Triton-interpreter processes side by side, half the cases each
(starting one per case would cost more than the cases); each reports a case as it finishes,
and each test here checks its own case's report, so a failing case does not hide the others."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

import interpret_cases

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(interpret_cases.__file__)
TIMEOUT_S = 1100


@pytest.fixture(scope="module")
def interpreted(request) -> dict:
    """case id -> its report, for the cases of this module that the session runs."""
    ids = [
        item.callspec.params["case_id"]
        for item in request.session.items
        if item.path == request.path and hasattr(item, "callspec")
    ]
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *half], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for half in (ids[0::2], ids[1::2])
        if half
    ]
    out = err = ""
    deadline = time.monotonic() + TIMEOUT_S  # one limit for both: they run at the same time
    for proc in procs:
        try:
            o, e = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            o, e = proc.communicate()
            e += f"\n(the interpreter process was stopped after {TIMEOUT_S} s)"
        out, err = out + o, err + e
    reports = {}
    for line in out.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
            reports[report["id"]] = report
    reports["__stderr__"] = err
    return reports


@pytest.mark.parametrize("case_id", list(interpret_cases.CASES))
def test_kernel_matches_the_reference_under_the_interpreter(case_id, interpreted):
    report = interpreted.get(case_id)
    assert report is not None, f"no report for {case_id}: {interpreted['__stderr__'][-6000:]}"
    assert report["ok"], report["error"]
