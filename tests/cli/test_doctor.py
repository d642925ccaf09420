"""`vllm-rocm-fused doctor` on a box without a GPU: it runs without vLLM imports,
reports versions and the entry point, and explains per site kind why `auto`
picks the portable path here."""

import json
import subprocess
import sys

from vllm_rocm_fused.sites import SITE_KINDS


def _doctor(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_rocm_fused.cli", "doctor", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_json_report_explains_every_site_kind():
    report = json.loads(_doctor("--json", "--world-size", "4", "--tokens", "1", "8192"))
    assert report["versions"]["torch"]
    assert report["plugin_entry_point"] == "vllm_rocm_fused = vllm_rocm_fused:register"
    assert report["query"]["world_size"] == 4
    sites = {(row["site"], row["tokens"]): row for row in report["sites"]}
    assert {s for s, _ in sites} == {k.key for k in SITE_KINDS}
    for row in sites.values():
        assert set(row["reasons"]) >= {"native", "cuda", "rocm"}
        assert row["reasons"]["native"] is None
        if not report["platform"]["gpu_available"]:
            # without a GPU, auto falls back to the portable path and says why the others can't run
            assert row["chosen"] == "native" and row["path"] == "generic"
            assert row["reasons"]["cuda"].startswith("unavailable")
            assert row["reasons"]["rocm"].startswith("unavailable")


def test_text_report_names_why_rocm_is_not_used():
    text = _doctor()
    assert "vLLM plugin entry point: vllm_rocm_fused = vllm_rocm_fused:register" in text
    for site in SITE_KINDS:
        assert f"{site.title}:" in text
    assert "rocm: unavailable:" in text and "not a ROCm build" in text


def test_invalid_settings_are_flagged_and_fail(monkeypatch, capsys):
    from vllm_rocm_fused.cli.main import main

    monkeypatch.setenv("VLLM_ROCM_FUSED_BACKEND", "bogus")
    monkeypatch.setenv("VLLM_ROCM_FUSED_MAX_TOKENS", "abc")
    monkeypatch.setenv("VLLM_ROCM_FUSED_DISABLED", "1")
    assert main(["doctor", "--tokens", "1"]) == 1
    out, err = capsys.readouterr()
    assert "INVALID SETTING: VLLM_ROCM_FUSED_BACKEND='bogus': not a backend" in out
    assert "INVALID SETTING: VLLM_ROCM_FUSED_MAX_TOKENS='abc': not an integer" in out
    assert (
        "note: VLLM_ROCM_FUSED_DISABLED is not a setting of the plugin (did you mean VLLM_ROCM_FUSED_DISABLE?)" in out
    )
    assert err.splitlines() == [
        "doctor: error: invalid setting VLLM_ROCM_FUSED_BACKEND='bogus': not a backend "
        "(one of auto, native, cuda, rocm)",
        "doctor: error: invalid setting VLLM_ROCM_FUSED_MAX_TOKENS='abc': not an integer",
    ]

    assert main(["doctor", "--json", "--tokens", "1"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [p.split("=")[0] for p in report["env_problems"]] == [
        "VLLM_ROCM_FUSED_BACKEND",
        "VLLM_ROCM_FUSED_MAX_TOKENS",
    ]


def test_valid_settings_pass(monkeypatch, capsys):
    from vllm_rocm_fused.cli.main import main

    monkeypatch.setenv("VLLM_ROCM_FUSED_BACKEND", "native")
    monkeypatch.setenv("VLLM_ROCM_FUSED_MAX_TOKENS", "1024")
    assert main(["doctor", "--tokens", "1"]) == 0
    assert "INVALID SETTING" not in capsys.readouterr().out


def test_the_startup_self_check_is_described_with_its_findings(monkeypatch, capsys):
    """What the setting does, the command to run on GPUs, and what this process's check
    found and disabled (a server logs the same lines; doctor runs in its own process)."""
    import torch

    from vllm_rocm_fused.cli import doctor
    from vllm_rocm_fused.ops import backends, self_check
    from vllm_rocm_fused.ops.backend_api import CallSpec
    from vllm_rocm_fused.ops.fault_injection import FaultInjectedBackend

    monkeypatch.setenv("VLLM_ROCM_FUSED_VALIDATE", "strict")
    assert doctor.self_check_summary()["meaning"].startswith("strict: ")
    monkeypatch.delenv("VLLM_ROCM_FUSED_VALIDATE")
    backends.reset_decisions()
    self_check.reset()
    backends.register_backend(FaultInjectedBackend("scales"))
    try:
        spec = CallSpec(
            4, 256, torch.bfloat16, torch.device("cpu"), 1, 128, 1.0, False, "row", torch.float8_e4m3fn, True
        )
        self_check.check_site("auto", torch.ones(256, dtype=torch.bfloat16), 1e-6, None, spec, [4], site="attn_input")
        assert doctor.run(doctor_args()) == 0
        text = capsys.readouterr().out
    finally:
        backends.unregister_backend(FaultInjectedBackend.name)
        backends.reset_decisions()
        self_check.reset()
    assert "startup self-check (VLLM_ROCM_FUSED_VALIDATE): startup: before serving" in text
    assert "attn_input: native/generic at T=4; DISABLED fault-injected/fused-1 at T=4" in text
    assert "disabled: fault-injected at T=3-4 (hidden 256, TP=1): self-check: fault-injected/fused-1 differs" in text
    assert "vllm-rocm-fused selftest --model <checkpoint> --tp <GPUs>" in text


def doctor_args():
    import argparse

    from vllm_rocm_fused.cli import doctor

    p = argparse.ArgumentParser()
    doctor.add_arguments(p)
    return p.parse_args(["--tokens", "1"])
