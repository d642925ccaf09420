"""``vllm-rocm-fused eval gsm8k`` argument handling (no server is started here)."""

from __future__ import annotations

import json
import shlex

import pytest

from vllm_rocm_fused.cli.main import build_parser, main


def parse(argv):
    return build_parser().parse_args(argv)


def test_defaults_and_passthrough():
    args = parse(
        [
            "eval",
            "gsm8k",
            "--model",
            "m",
            "--tp",
            "2",
            "--limit",
            "20",
            "--",
            "--enforce-eager",
            "--max-model-len",
            "4096",
        ]
    )
    assert (args.benchmark, args.model, args.tp, args.limit) == ("gsm8k", "m", 2, 20)
    assert args.vllm_args == ["--enforce-eager", "--max-model-len", "4096"]
    assert (args.num_fewshot, args.gate, args.max_drop, args.gate_filter) == (5, None, 0.02, "strict-match")
    assert args.data_dir is None and args.out is None


@pytest.mark.parametrize(
    "bad",
    [
        ["--gate", "1.5"],
        ["--max-drop", "-0.1"],
        ["--tp", "0"],
        ["--limit", "0"],
        ["--gate-filter", "exact"],
        ["--startup-timeout", "0"],
        ["--concurrency", "x"],
    ],
)
def test_bad_values_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["eval", "gsm8k", "--model", "m", *bad])
    assert e.value.code == 2


def test_benchmark_is_required():
    with pytest.raises(SystemExit):
        parse(["eval"])


def test_format_command_round_trips(tmp_path):
    from vllm_rocm_fused.eval.gsm8k import Gsm8kRun, format_command

    cfg = Gsm8kRun(
        model="/models/Qwen3.5 FP8",
        out_dir=tmp_path,
        tp=8,
        limit=200,
        data_dir="/data/gsm8k",
        gate=0.94,
        vllm_args=["--max-model-len", "32768"],
    )
    argv = shlex.split(format_command(cfg))
    assert argv[:3] == ["vllm-rocm-fused", "eval", "gsm8k"]
    args = parse(argv[1:])
    assert (args.model, args.tp, args.limit, args.data_dir, args.gate) == (
        "/models/Qwen3.5 FP8",
        8,
        200,
        "/data/gsm8k",
        0.94,
    )
    assert args.vllm_args == ["--max-model-len", "32768"] and args.out == str(tmp_path)


def test_bad_data_dir_fails_before_any_server(tmp_path, capsys):
    status = main(
        ["eval", "gsm8k", "--model", "m", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "error: --data-dir" in err and "not a folder" in err
    assert not (tmp_path / "out").exists()


def _tiny_config(folder, heads=4):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": 2}))
    return str(folder)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "/nonexistent"],
            "error: --model /nonexistent: no such file or folder (and not a Hugging Face "
            "model id, which looks like org/name)",
        ),
        (
            ["--model", "m", "--tokenizer", "./no/such/tokenizer"],
            "error: --tokenizer ./no/such/tokenizer: no such file",
        ),
        (
            ["--model", "{model}", "--tp", "3"],
            "error: --tp 3: {model} has num_attention_heads = 4, which vLLM cannot split across 3 ranks",
        ),
        (["--model", "m", "--out", "{file}"], "error: --out {file}: exists and is not a folder"),
    ],
)
def test_bad_arguments_fail_before_anything_starts(argv, message, tmp_path, capsys):
    model, file = _tiny_config(tmp_path / "model"), tmp_path / "file"
    file.write_text("")
    argv = [a.format(model=model, file=file) for a in argv]
    out = tmp_path / "out"
    status = main(["eval", "gsm8k", "--out", str(out), *argv])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(model=model, file=file) in err[0]
    assert not out.exists()


def test_invalid_plugin_setting_fails_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_ROCM_FUSED_DISABLE_AR_QUANT", "perhaps")
    assert main(["eval", "gsm8k", "--model", "m", "--out", str(tmp_path / "out")]) == 2
    assert (
        "error: invalid setting VLLM_ROCM_FUSED_DISABLE_AR_QUANT='perhaps': not a switch (use 0 or 1)"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_data_dir_from_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_ROCM_FUSED_GSM8K_DIR", str(tmp_path / "from-env"))
    assert main(["eval", "gsm8k", "--model", "m", "--out", str(tmp_path / "out")]) == 2
    assert "from-env" in capsys.readouterr().err
