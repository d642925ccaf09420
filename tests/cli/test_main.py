"""The ``vllm-rocm-fused`` entry point imports only the command being run: ``--help``
and the light commands never import torch or vLLM."""

import subprocess
import sys

import pytest

from vllm_rocm_fused.cli.main import COMMANDS, build_parser

PROBE = """
import sys
from vllm_rocm_fused.cli.main import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
heavy = sorted(m for m in ("torch", "vllm", "transformers", "lm_eval") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
sys.exit(status)
"""


def _heavy_imports(*argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("HEAVY:")][-1]
    return proc.returncode, line[len("HEAVY:") :], proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["demo", "--help"],
        ["eval", "gsm8k", "--help"],
        ["tiny-model", "--help"],
        ["tiny-model", "--list"],
        ["tiny-gsm8k", "--help"],
        ["demo", "--max-tokens", "-1"],
        ["eval", "gsm8k", "--model", "/nonexistent"],
    ],
)
def test_light_commands_import_no_heavy_module(argv):
    status, heavy, out = _heavy_imports(*argv)
    assert heavy == "", f"{argv} imported {heavy}"
    assert status in (0, 2), out


def test_help_lists_every_command():
    status, _, out = _heavy_imports("--help")
    assert status == 0
    for name in COMMANDS:
        assert name in out


def test_the_full_parser_still_knows_every_command():
    parser = build_parser()
    assert parser.parse_args(["eval", "gsm8k", "--model", "m"]).model == "m"
    assert parser.parse_args(["doctor", "--json"]).json
