"""Which reduces the plugin defers into the next norm site, for each serving
configuration of a Qwen3.5-MoE model, decided on constructed configs: vLLM's own
``ParallelConfig`` and MoE parallel config (``make_parallel_config``, as the MoE layer
builds it) for the command line, and a decoder stack carrying the fields vLLM's
Qwen3.5 layers carry. No engine, no process group.

The decision sequence is ``fusion.install``'s: the stack (``_why_stack_not_fused``),
then TP=1 or the draft (``_why_no_deferral``), then each layer (``_deferred_reduces``)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from support.markers import requires_vllm

pytestmark = requires_vllm

# command line -> vLLM ParallelConfig arguments
CONFIGS = {
    "-tp 2": {"tensor_parallel_size": 2},
    "-tp 2 --enable-expert-parallel": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
    "-dp 2 --enable-expert-parallel": {"data_parallel_size": 2, "enable_expert_parallel": True},
    "-dp 2 -tp 2 --enable-expert-parallel": {
        "data_parallel_size": 2,
        "tensor_parallel_size": 2,
        "enable_expert_parallel": True,
    },
    "-dp 2 -tp 2": {"data_parallel_size": 2, "tensor_parallel_size": 2},
    "-tp 2 --enable-expert-parallel --all2all-backend passthrough": {
        "tensor_parallel_size": 2,
        "enable_expert_parallel": True,
        "all2all_backend": "passthrough",
    },
}

# command line -> (stack not fused because, MoE reduce kept because (None: deferred))
EXPECTED = {
    "-tp 2": (None, None),
    "-tp 2 --enable-expert-parallel": (None, None),
    "-dp 2 --enable-expert-parallel": (None, "TP=1 (nothing to reduce)"),
    "-dp 2 -tp 2 --enable-expert-parallel": ("sequence-parallel MoE", None),
    "-dp 2 -tp 2": (None, "data-parallel MoE"),
    "-tp 2 --enable-expert-parallel --all2all-backend passthrough": (None, "passthrough all2all"),
}


@pytest.fixture
def plugin_log():
    """Messages logged under the plugin's logger, with the once-only keys forgotten."""
    from vllm_rocm_fused.log import forget_once_keys

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = logging.getLogger("vllm.rocm_fused")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    forget_once_keys()
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
    forget_once_keys()


def _moe_parallel(parallel_config, monkeypatch):
    """The MoE parallel config vLLM's MoE layer builds under ``parallel_config`` (rank 0)."""
    from vllm.model_executor.layers.fused_moe import config as moe_config_module
    from vllm.model_executor.layers.fused_moe.layer import make_parallel_config

    monkeypatch.setattr(moe_config_module, "get_dp_group", lambda: SimpleNamespace(rank_in_group=0))
    monkeypatch.setattr(moe_config_module, "get_tensor_model_parallel_rank", lambda: 0)
    return make_parallel_config(
        tp_size=parallel_config.tensor_parallel_size,
        dp_size=parallel_config.data_parallel_size,
        pcp_size=1,
        is_sequence_parallel=parallel_config.use_sequence_parallel_moe,
        parallel_config=parallel_config,
    )


def _moe_config(par):
    import torch
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, RoutingMethodType

    return FusedMoEConfig(
        num_experts=4,
        experts_per_token=2,
        hidden_dim=256,
        intermediate_size=256,
        num_local_experts=4 // par.ep_size,
        num_logical_experts=4,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=par,
        in_dtype=torch.bfloat16,
    )


def _stack(parallel_config, monkeypatch, n_layers: int = 4) -> list:
    """Decoder layers shaped like vLLM's ``Qwen3_5DecoderLayer`` with a
    ``Qwen3NextSparseMoeBlock``: the fields the decisions read, set as vLLM sets them."""
    sp = parallel_config.use_sequence_parallel_moe and parallel_config.pipeline_parallel_size == 1
    runner = SimpleNamespace(moe_config=_moe_config(_moe_parallel(parallel_config, monkeypatch)), router=object())
    block = SimpleNamespace(
        experts=runner, is_sequence_parallel=sp, replicate_shared_expert=False, shared_expert=object()
    )
    layers = []
    for i in range(n_layers):
        out_proj = SimpleNamespace(reduce_results=not sp)  # vLLM: reduce_results=not use_attn_reduce_scatter_for_moe
        attn = SimpleNamespace(out_proj=out_proj, o_proj=out_proj)
        kind = "full_attention" if i % 4 == 3 else "linear_attention"
        layers.append(
            SimpleNamespace(
                layer_idx=i,
                layer_type=kind,
                self_attn=attn,
                linear_attn=attn,
                mlp=block,
                use_attn_reduce_scatter_for_moe=sp,
            )
        )
    return layers


def _decide(vllm_config, layers, tp_size: int):
    """fusion.install's decisions, without installing: (stack not fused because,
    attention reduces deferred, MLP reduces deferred, the report's kept reduces)."""
    from vllm_rocm_fused.models import fusion

    report = fusion.FusionReport(where="test", tp_size=tp_size, rank=0)
    why = fusion._why_stack_not_fused(vllm_config, layers)
    if why is not None:
        return why, [], [], []
    no_deferral = fusion._why_no_deferral(vllm_config) if tp_size > 1 else "TP=1 (nothing to reduce)"
    attn, mlp = fusion._deferred_reduces(
        report, layers, no_deferral, last_output_reduced=False, independent_layers=False
    )
    return None, attn, mlp, report.kept_reduces


@pytest.mark.parametrize("cli", list(CONFIGS))
def test_decisions_per_serving_configuration(cli, monkeypatch):
    from vllm.config import ParallelConfig

    from vllm_rocm_fused.models import fusion

    pc = ParallelConfig(**CONFIGS[cli])
    layers = _stack(pc, monkeypatch)
    stack_why, moe_why = EXPECTED[cli]
    disabled, attn, mlp, kept = _decide(SimpleNamespace(speculative_config=None), layers, pc.tensor_parallel_size)
    if stack_why is not None:
        assert disabled is not None and stack_why in disabled
        return
    assert disabled is None
    if moe_why is None:
        assert all(mlp) and not kept
        # the MoE deferral stays within what vLLM's own MoE factory would honor
        par = layers[0].mlp.experts.moe_config.moe_parallel_config
        assert not par.use_all2all_kernels and not par.is_sequence_parallel
    else:
        assert not any(mlp)
        if pc.tensor_parallel_size > 1:
            assert kept and all(moe_why in k for k in kept)
        else:
            assert fusion._why_mlp_reduce_stays(layers[0]).startswith("all2all MoE kernels")
    # attention (o_proj / out_proj) reduces move whenever TP > 1 and nothing else forbids it
    assert all(attn) == (pc.tensor_parallel_size > 1)


def test_expert_parallel_at_tp2_defers_like_plain_tp(monkeypatch):
    """-tp 2 --enable-expert-parallel: use_ep is set, yet the MoE output is a partial
    sum all-reduced over the TP ranks, so it is deferred as at plain TP."""
    from vllm.config import ParallelConfig

    from vllm_rocm_fused.models import fusion

    layers = _stack(ParallelConfig(**CONFIGS["-tp 2 --enable-expert-parallel"]), monkeypatch)
    par = layers[0].mlp.experts.moe_config.moe_parallel_config
    assert par.use_ep and par.ep_size == 2 and par.tp_size == 1 and not par.use_all2all_kernels
    assert fusion._why_mlp_reduce_stays(layers[0]) is None


def _with_field_removed(layers, path: str):
    """A copy of the stack's MoE (block -> runner -> config -> parallel config) as plain
    namespaces holding what the decisions read, with ``path`` removed."""
    block = layers[0].mlp
    cfg = block.experts.moe_config
    par = cfg.moe_parallel_config
    par_ns = SimpleNamespace(
        is_sequence_parallel=par.is_sequence_parallel,
        use_all2all_kernels=par.use_all2all_kernels,
        all2all_backend=par.all2all_backend,
        dp_size=par.dp_size,
        pcp_size=par.pcp_size,
    )
    cfg_ns = SimpleNamespace(skip_final_all_reduce=cfg.skip_final_all_reduce, moe_parallel_config=par_ns)
    runner_ns = SimpleNamespace(moe_config=cfg_ns, router=block.experts.router)
    block_ns = SimpleNamespace(**vars(block))
    block_ns.experts = runner_ns
    owner, name = (
        {
            "block": block_ns,
            "runner": runner_ns,
            "config": cfg_ns,
            "parallel": par_ns,
        }[path.split(".")[0]],
        path.split(".")[1],
    )
    delattr(owner, name)
    return [SimpleNamespace(**{**vars(layer), "mlp": block_ns}) for layer in layers]


# (without ``experts`` the block is not a MoE block: the dense rule reads down_proj and keeps it)
MOE_FIELDS = [
    "block.is_sequence_parallel",
    "block.replicate_shared_expert",
    "runner.moe_config",
    "runner.router",
    "config.skip_final_all_reduce",
    "config.moe_parallel_config",
    "parallel.is_sequence_parallel",
    "parallel.use_all2all_kernels",
    "parallel.all2all_backend",
    "parallel.dp_size",
    "parallel.pcp_size",
]


@pytest.mark.parametrize("field", MOE_FIELDS)
def test_missing_moe_field_keeps_the_reduce_and_logs_once(field, monkeypatch, plugin_log):
    """A field vLLM renamed or removed: the reduce stays (fail closed), said once."""
    from vllm.config import ParallelConfig

    from vllm_rocm_fused.models import fusion

    layers = _stack(ParallelConfig(**CONFIGS["-tp 2 --enable-expert-parallel"]), monkeypatch)
    assert fusion._why_mlp_reduce_stays(layers[0]) is None  # the intact stack defers
    broken = _with_field_removed(layers, field)
    name = field.split(".")[1]
    whys = [fusion._why_mlp_reduce_stays(layer) for layer in broken]
    assert all(why is not None and name in why for why in whys)
    _, _, mlp, kept = _decide(SimpleNamespace(speculative_config=None), broken, tp_size=2)
    assert not any(mlp) and len(kept) == len(broken)
    assert len([m for m in plugin_log.messages if name in m]) == 1


def test_missing_dense_field_keeps_the_reduce(plugin_log):
    from vllm_rocm_fused.models import fusion

    layer = SimpleNamespace(mlp=SimpleNamespace(down_proj=SimpleNamespace(tp_size=2)))  # no reduce_results
    why = fusion._why_mlp_reduce_stays(layer)
    assert why is not None and "reduce_results" in why
    layer.mlp.down_proj.reduce_results = True
    assert fusion._why_mlp_reduce_stays(layer) is None


def test_missing_sequence_parallel_field_leaves_the_stack_unfused(monkeypatch, plugin_log):
    from vllm.config import ParallelConfig

    from vllm_rocm_fused.models import fusion

    layers = _stack(ParallelConfig(**CONFIGS["-tp 2"]), monkeypatch)
    del layers[2].use_attn_reduce_scatter_for_moe
    why = fusion._why_stack_not_fused(SimpleNamespace(speculative_config=None), layers)
    assert why is not None and "use_attn_reduce_scatter_for_moe" in why
    assert any("use_attn_reduce_scatter_for_moe" in m for m in plugin_log.messages)


def test_zero_expert_router_keeps_the_reduce(monkeypatch):
    from vllm.config import ParallelConfig
    from vllm.model_executor.layers.fused_moe.router.zero_expert_router import ZeroExpertRouter

    from vllm_rocm_fused.models import fusion

    layers = _stack(ParallelConfig(**CONFIGS["-tp 2"]), monkeypatch)
    layers[0].mlp.experts.router = ZeroExpertRouter.__new__(ZeroExpertRouter)
    assert "zero experts" in fusion._why_mlp_reduce_stays(layers[0])


def test_replicated_shared_expert_keeps_the_reduce(monkeypatch):
    from vllm.config import ParallelConfig

    from vllm_rocm_fused.models import fusion

    layers = _stack(ParallelConfig(**CONFIGS["-tp 2 --enable-expert-parallel"]), monkeypatch)
    layers[0].mlp.replicate_shared_expert = True
    assert "replicated" in fusion._why_mlp_reduce_stays(layers[0])


@pytest.mark.parametrize(
    "method,deferred",
    [
        ("mtp", True),
        ("qwen3_5_mtp", True),
        ("ngram", True),
        ("suffix", True),
        ("draft_model", True),
        ("eagle", True),
        ("eagle3", False),
        ("dflash", False),
        ("extract_hidden_states", False),
        ("some_future_method", False),
    ],
)
def test_draft_methods(method, deferred, plugin_log):
    from vllm_rocm_fused.models import fusion

    why = fusion._why_no_deferral(SimpleNamespace(speculative_config=SimpleNamespace(method=method)))
    assert (why is None) is deferred
    if not deferred:
        assert ("EAGLE-3" if method == "eagle3" else method) in why


def test_draft_config_without_fields_keeps_every_reduce(plugin_log):
    from vllm_rocm_fused.models import fusion

    assert fusion._why_no_deferral(SimpleNamespace(speculative_config=None)) is None
    why = fusion._why_no_deferral(SimpleNamespace())  # a VllmConfig without speculative_config
    assert why is not None and "speculative_config" in why
    why = fusion._why_no_deferral(SimpleNamespace(speculative_config=SimpleNamespace()))  # no method
    assert why is not None and "method" in why
