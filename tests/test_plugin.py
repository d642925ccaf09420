"""The vllm.general_plugins entry points: what they register, idempotence, and
VLLM_ROCM_FUSED_DISABLE=1 (nothing registered, one log line). Each environment runs in
a fresh interpreter, since registration is per process; the four run side by side."""

import json
import os
import subprocess
import sys

import pytest

from support.markers import requires_vllm

pytestmark = requires_vllm

PROBE = r"""
import importlib.metadata as md, json, logging, sys
lines = []
class Grab(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("vllm.rocm_fused").addHandler(Grab())
logging.getLogger("vllm.rocm_fused").setLevel(logging.INFO)
eps = {ep.name: ep for ep in md.entry_points(group="vllm.general_plugins")}
for _ in range(3):  # vLLM may call the entry points more than once per process
    eps["vllm_rocm_fused"].load()()
    eps["vllm_rocm_fused_portable_fp8"].load()()
from vllm import ModelRegistry
from vllm.model_executor.custom_op import op_registry
from vllm.model_executor.kernels import linear as lk
from vllm.platforms import PlatformEnum
archs = ModelRegistry.models
print(json.dumps({
    "qwen": {a: getattr(archs[a], "module_name", "") for a in ("Qwen3_5ForCausalLM", "Qwen3_5MoeMTP")},
    "llama": getattr(archs["LlamaForCausalLM"], "module_name", ""),
    "custom_op": "fused_allreduce_rmsnorm_quant" in op_registry,
    "portable_fp8": sum(k.__name__ == "PortableFp8BlockScaledMMKernel"
                        for k in lk._POSSIBLE_FP8_BLOCK_KERNELS.get(PlatformEnum.CPU, [])),
    "log": lines,
}))
"""


ENVIRONMENTS = {
    "on": {"VLLM_ROCM_FUSED_DISABLE": "0"},
    "disabled=1": {"VLLM_ROCM_FUSED_DISABLE": "1"},
    "disabled=true": {"VLLM_ROCM_FUSED_DISABLE": "true"},
    "no portable fp8": {"VLLM_ROCM_FUSED_DISABLE_PORTABLE_FP8": "1"},
}


@pytest.fixture(scope="module")
def probe():
    """The probe's report per environment; the interpreters run side by side."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", PROBE],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in ENVIRONMENTS.items()
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, (name, err[-3000:])
            outputs[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return outputs


def test_registers_overrides_op_and_portable_fp8_once(probe):
    out = probe["on"]
    assert out["qwen"] == {
        "Qwen3_5ForCausalLM": "vllm_rocm_fused.models.qwen3_5",
        "Qwen3_5MoeMTP": "vllm_rocm_fused.models.qwen3_5",
    }
    assert out["llama"].startswith("vllm.")
    assert out["custom_op"] is True
    assert out["portable_fp8"] == 1
    assert sum("registered the fused" in line for line in out["log"]) == 1


@pytest.mark.parametrize("value", ["1", "true"])
def test_disabled_plugin_registers_nothing_but_one_log_line(value, probe):
    out = probe[f"disabled={value}"]
    assert all(m.startswith("vllm.") for m in out["qwen"].values()), out["qwen"]
    assert out["custom_op"] is False
    assert out["log"] == ["vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing"]
    # platform enablement stays: the unfused baseline must load FP8 checkpoints too
    assert out["portable_fp8"] == 1


def test_portable_fp8_has_its_own_switch(probe):
    out = probe["no portable fp8"]
    assert out["portable_fp8"] == 0
    assert out["custom_op"] is True
