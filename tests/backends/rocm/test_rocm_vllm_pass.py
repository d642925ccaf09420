"""vLLM's own ROCm AR+RMSNorm fusion (``RocmAiterAllReduceFusionPass``, on with
``compilation_config.pass_config.fuse_allreduce_rms``) next to the plugin.

The pass rewrites ``tensor_model_parallel_all_reduce`` followed by an RMSNorm
(and quant) into aiter's fused ops. At a site the plugin fused there is no
such all-reduce in the graph: the plugin's op does the reduce inside one
opaque custom op. So the pass finds nothing to fuse there (no double fusion),
and at the all-reduces the plugin leaves to vLLM (pipeline-stage ends, EAGLE-3,
sequence-parallel MoE) it may still fuse them, as without the plugin. On the
CPU box the pass itself cannot be built (its module needs vLLM's GPU ops and
aiter's), so this checks both halves of that argument against the installed
vLLM's source and the plugin: where the pass's patterns anchor, and what a
plugin site's traced graph holds with the pass config on.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from support.markers import requires_vllm
from support.rocm_harness import Case

pytestmark = requires_vllm


@pytest.fixture(scope="module")
def pass_config_on():
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.config.compilation import PassConfig

    cfg = VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        compilation_config=CompilationConfig(pass_config=PassConfig(fuse_allreduce_rms=True)),
    )
    with set_current_vllm_config(cfg):
        yield cfg


def _fusion_source() -> ast.Module:
    """vLLM's allreduce_rms_fusion.py, parsed (importing it needs vLLM's CUDA/ROCm ops)."""
    spec = importlib.util.find_spec("vllm.compilation.passes.fusion.allreduce_rms_fusion")
    return ast.parse(Path(spec.origin).read_text())


def test_vllms_rocm_patterns_all_start_at_an_all_reduce():
    """Every pattern RocmAiterAllReduceFusionPass registers begins with vLLM's
    all-reduce: a graph without one gives it nothing to match."""
    tree = _fusion_source()
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    registered = {
        call.args[0].func.id
        for call in ast.walk(classes["RocmAiterAllReduceFusionPass"])
        if isinstance(call, ast.Call)
        and getattr(call.func, "attr", None) == "register"
        and call.args
        and isinstance(call.args[0], ast.Call)
        and isinstance(call.args[0].func, ast.Name)
    }
    assert len(registered) >= 6, registered  # AR+RMSNorm, +add, Gemma variants, per-group quant

    def pattern_calls(name: str) -> set[str] | None:
        cls = classes.get(name)
        if cls is None:
            return None
        inherited = set()
        for base in cls.bases:
            inherited |= pattern_calls(getattr(base, "id", "")) or set()
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name == "pattern":
                calls = {n.func.id for n in ast.walk(item) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
                return calls | inherited if "super" in calls else calls  # a wrapper of super().pattern
        for base in cls.bases:  # inherited pattern
            found = pattern_calls(getattr(base, "id", ""))
            if found is not None:
                return found
        return None

    for name in registered:
        assert "tensor_model_parallel_all_reduce" in (pattern_calls(name) or set()), name


def test_a_plugin_site_holds_no_vllm_all_reduce_with_the_pass_on(pass_config_on, rocm):
    from vllm_rocm_fused.layers.fused_norm import FusedAllReduceRMSNormQuant

    assert pass_config_on.compilation_config.pass_config.fuse_allreduce_rms is True
    rocm.use("v0_1_20", "gfx950")
    case = Case(tokens=4, hidden=256)
    comm = rocm.vllm_comm(case)
    layer = FusedAllReduceRMSNormQuant(
        256, 1e-6, weight_offset=1.0, all_reduce=False, emit_bf16=True, quant_dtype=torch.float8_e4m3fn
    )
    layer.comm_name = comm.name  # the TP group, as tp_communicator_name() gives it in vLLM

    def site(partial, residual):
        out = layer(partial, residual)
        return out.q, out.scale, out.residual, out.normed

    graph = make_fx(site)(case.x, case.residual).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "all_reduce" in t], targets
    assert sum("vllm_rocm_fused.fused_allreduce_rmsnorm_quant" in t for t in targets) == 1, targets
    # and the site still runs, on the backend vLLM's config leaves it
    out = layer(case.x, case.residual)
    assert out.q.dtype == torch.float8_e4m3fn and out.normed is not None
