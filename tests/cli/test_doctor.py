"""`vllm-rocm-fused doctor` on a box without a GPU: it runs without vLLM imports,
reports versions and the entry point, and explains per site kind why `auto`
picks the portable path here."""

import json
import subprocess
import sys

from vllm_rocm_fused.sites import SITE_KINDS


def _doctor(*args):
    proc = subprocess.run([sys.executable, "-m", "vllm_rocm_fused.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=300)
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
