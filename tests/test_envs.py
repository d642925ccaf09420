"""envs: which set values the plugin cannot use (what doctor reports and serving
refuses), misspelled names, and the backend list against the registry."""

import pytest

from vllm_rocm_fused import envs


def test_valid_values_have_no_problems(tmp_path):
    env = {
        "VLLM_ROCM_FUSED_DISABLE": "1",
        "VLLM_ROCM_FUSED_DISABLE_AR_QUANT": " Off ",
        "VLLM_ROCM_FUSED_DISABLE_PORTABLE_FP8": "",
        "VLLM_ROCM_FUSED_BACKEND": "CUDA",
        "VLLM_ROCM_FUSED_MAX_TOKENS": "16",
        "VLLM_ROCM_FUSED_CACHE_DIR": str(tmp_path / "not-yet"),
        "VLLM_ROCM_FUSED_GSM8K_DIR": str(tmp_path),
    }
    assert envs.problems(env) == []
    assert envs.problems({}) == []


@pytest.mark.parametrize(
    "name, value, why",
    [
        ("VLLM_ROCM_FUSED_BACKEND", "bogus", "not a backend (one of auto, native, cuda, rocm)"),
        ("VLLM_ROCM_FUSED_MAX_TOKENS", "abc", "not an integer"),
        ("VLLM_ROCM_FUSED_MAX_TOKENS", "0", "must be >= 1"),
        ("VLLM_ROCM_FUSED_DISABLE", "maybe", "not a switch (use 0 or 1)"),
        ("VLLM_ROCM_FUSED_DISABLE_AR_QUANT", "2", "not a switch (use 0 or 1)"),
        ("VLLM_ROCM_FUSED_GSM8K_DIR", "/no/such/folder", "no such folder"),
    ],
)
def test_each_invalid_value_is_one_line_naming_it(name, value, why):
    assert envs.problems({name: value}) == [f"{name}={value!r}: {why}"]


def test_a_file_where_a_folder_belongs(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert envs.problems({"VLLM_ROCM_FUSED_CACHE_DIR": str(f)}) == [
        f"VLLM_ROCM_FUSED_CACHE_DIR={str(f)!r}: exists and is not a folder"
    ]


def test_server_only_leaves_out_what_only_the_cli_reads():
    env = {"VLLM_ROCM_FUSED_GSM8K_DIR": "/no/such/folder", "VLLM_ROCM_FUSED_BACKEND": "bogus"}
    assert [p.split("=")[0] for p in envs.problems(env)] == ["VLLM_ROCM_FUSED_BACKEND", "VLLM_ROCM_FUSED_GSM8K_DIR"]
    assert [p.split("=")[0] for p in envs.problems(env, server_only=True)] == ["VLLM_ROCM_FUSED_BACKEND"]


def test_problems_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("VLLM_ROCM_FUSED_MAX_TOKENS", "-5")
    assert envs.problems() == ["VLLM_ROCM_FUSED_MAX_TOKENS='-5': must be >= 1"]


def test_misspelled_names_are_pointed_out():
    env = {
        "VLLM_ROCM_FUSED_DISABLED": "1",
        "VLLM_ROCM_FUSED_MAX_TOKEN": "8",
        "VLLM_ROCM_FUSED_TEST_MARKER": "x",
        "VLLM_ROCM_FUSED_DISABLE": "1",
        "OTHER": "1",
    }
    assert envs.unknown_names(env) == [
        "VLLM_ROCM_FUSED_DISABLED is not a setting of the plugin (did you mean VLLM_ROCM_FUSED_DISABLE?)",
        "VLLM_ROCM_FUSED_MAX_TOKEN is not a setting of the plugin (did you mean VLLM_ROCM_FUSED_MAX_TOKENS?)",
    ]


def test_backend_names_are_the_registered_backends():
    from vllm_rocm_fused.ops.backends import known_backend_names

    assert sorted(envs.BACKEND_NAMES) == sorted(known_backend_names())


def test_switch_reading_matches_the_check(monkeypatch):
    for value in envs.SWITCH_OFF:
        monkeypatch.setenv("VLLM_ROCM_FUSED_DISABLE", value)
        assert not envs.plugin_disabled()
    for value in envs.SWITCH_ON:
        monkeypatch.setenv("VLLM_ROCM_FUSED_DISABLE", value.upper())
        assert envs.plugin_disabled() and envs.problems() == []


def test_readme_table_lists_every_variable_with_its_default():
    """The README's environment table and ENV_VARS name the same variables, in the same
    order, with the same defaults ("(empty)" in the README for an empty default)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    table = [(name.strip().strip("`"), default.strip().strip("`")) for name, default in rows]
    assert table == [(v.name, v.default or "(empty)") for v in envs.ENV_VARS]
