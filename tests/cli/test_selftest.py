"""``vllm-rocm-fused selftest``: on the CPU at TP=2 with a trained FP8 checkpoint it
checks every site of the model, prints the table and the per-step savings, writes JSON
and markdown, exits 0; a wrong path makes it exit 1 and say what differed; against every
fake aiter generation (real gloo ranks) its checks pass on aiter's own numbers; the
model's sites are read from config.json as the plugin fuses them."""

from __future__ import annotations

import json

import pytest

from support import fake_aiter
from support.check_workers import selftest_rocm_rank
from support.dist import run_ranks
from vllm_rocm_fused.cli import selftest
from vllm_rocm_fused.cli.main import main


@pytest.fixture(scope="module")
def dense_fp8(tiny_models):
    return tiny_models("trained-dense-fp8")


@pytest.mark.timeout(300)
def test_cpu_tp2_on_a_trained_fp8_model(dense_fp8, tmp_path, capsys):
    status = main(["selftest", "--tp", "2", "--model", str(dense_fp8), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "| 256 | post_attn_dense | 128 | native/generic |" in out
    assert "Per decode step" in out and "every checked path matches the spec" in out
    report = json.loads((tmp_path / "selftest_cpu_tp2.json").read_text())
    assert (tmp_path / "selftest_cpu_tp2.md").read_text() in out
    layers = json.loads((dense_fp8 / "config.json").read_text())["num_hidden_layers"]
    sites = {r["site"] for r in report["rows"]}
    assert sites == {"gdn_input (no all-reduce)", "gdn_input", "attn_input", "post_attn_dense", "final_norm"}
    assert len(report["rows"]) == 5 * len(selftest.DEFAULT_TOKENS_CPU)
    assert all(r["ok"] and r["us_fused"] > 0 and r["us_unfused"] > 0 for r in report["rows"])
    assert [s["sites"] for s in report["per_step"]] == [2 * layers + 1] * len(selftest.DEFAULT_TOKENS_CPU)


@pytest.mark.timeout(300)
def test_a_wrong_path_exits_1_and_says_what_differed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_ROCM_FUSED_FAULT_INJECT", "scales")  # the spawned ranks register it
    status = main(["selftest", "--tp", "2", "--hidden", "256", "--tokens", "4", "--no-timing", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert "| 256 | attn_input | 4 | fault-injected/fused-1 (disabled) -> native/generic | 7.27 | DIFFERS |" in out
    assert "attn_input, T=4: fault-injected/fused-1: DIFFERS (q 7.27 fp8 steps, scales 24.2x" in out
    assert "| 256 | final_norm | 4 | native/generic | - | ok |" in out  # no scales there: the fault never ran


@pytest.mark.timeout(300)
def test_every_fake_aiter_generation_passes_its_checks():
    cases = [(g, "gfx950") for g in fake_aiter.USABLE] + [("v0_1_20", "gfx942")]
    per_rank = run_ranks(selftest_rocm_rank, 2, cases, 1024, [1, 96], timeout=240)
    quant_paths = set()
    for (gen, arch), (rows, violations) in zip(cases, per_rank[0]):
        assert violations == []
        assert all(r["ok"] for r in rows), (gen, [r["differed"] for r in rows if not r["ok"]])
        if gen in fake_aiter.RACING_TWO_STAGE:
            # aiter without the two-stage race fix: one-stage calls only (<= 80 tokens), the
            # rest on the portable path (tests/backends/rocm/test_rocm_aiter_floor.py)
            assert {r["backend"] for r in rows if r["tokens"] > 80} == {"native"}, gen
            rows = [r for r in rows if r["tokens"] <= 80]
        quant = {r["backend"] + "/" + r["path"] for r in rows if r["quantize"]}
        norm_only = {r["backend"] + "/" + r["path"] for r in rows if not r["quantize"]}
        assert quant <= {"rocm/fused-1", "rocm/fused-2"}, (gen, arch, quant)  # aiter ran every quantizing site
        assert norm_only == {"rocm/fused-1"}, (gen, norm_only)
        quant_paths |= quant
        compared = [r["q_steps"] for r in rows if r["q_steps"] is not None]
        assert compared and max(compared) <= 1.0
    assert quant_paths == {"rocm/fused-1", "rocm/fused-2"}  # both of aiter's quantizing paths were checked
    # every rank saw the same paths
    assert [[(r["backend"], r["path"]) for r in rows] for rows, _ in per_rank[0]] == [
        [(r["backend"], r["path"]) for r in rows] for rows, _ in per_rank[1]
    ]


def test_sites_from_a_config():
    config = {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "num_experts": 8,
        "quantization_config": {
            "quant_method": "fp8",
            "modules_to_not_convert": ["model.layers.1.linear_attn.in_proj_qkvz"],
        },
    }
    hidden, sites, desc = selftest.sites_from_config(config, tp=2)
    got = {(s.label, s.quantize, s.emit_bf16): s.count for s in sites}
    assert hidden == 512 and "MoE" in desc
    assert got == {
        ("gdn_input (no all-reduce)", True, True): 1,
        ("gdn_input", False, False): 1,  # layer 1's in_proj_qkvz stays bf16
        ("gdn_input", True, True): 1,
        ("attn_input", True, False): 1,
        ("post_attn_moe", False, False): 4,
        ("final_norm", False, False): 1,
    }
    # TP=1: no site all-reduces; a bf16 checkpoint hands bf16 everywhere
    _, sites, _ = selftest.sites_from_config({**config, "quantization_config": None}, tp=1)
    assert not any(s.all_reduce or s.quantize for s in sites)


def test_a_vl_config_nests_the_language_model(tmp_path):
    text = {"hidden_size": 256, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}
    (tmp_path / "config.json").write_text(
        json.dumps({"text_config": text, "quantization_config": {"quant_method": "fp8"}})
    )
    hidden, sites, _ = selftest.sites_from_config(selftest.read_config(str(tmp_path)), tp=2)
    assert hidden == 256 and any(s.quantize for s in sites)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--hidden", "100"], "not a multiple of the 128-wide quant group"),
        (["--model", "/no/such/model"], "cannot read"),
        (["--hidden", "256", "--device", "cuda"], "no GPU visible"),
    ],
)
def test_bad_arguments_exit_2_naming_them(argv, message, capsys):
    assert main(["selftest", *argv]) == 2
    assert message in capsys.readouterr().err
