"""Every preset through vLLM's real loader (no dummy weights) with the plugin, at
TP=1 (and the trained dense FP8 and the VL layout at TP=2), generating; and what the
outputs say about the weights: vLLM agrees with transformers' reference model, the VL
layout with the text layout, TP=2 with TP=1, and the FP8 model with the bf16 model of
the same seed.

Agreement is measured by teacher forcing: two engines score the same sequences (each
prompt followed by a fixed continuation: the reference answer for the trained models,
fixed random tokens for the others), ``top1`` = how often their likeliest tokens agree,
``top5`` = how often one's likeliest token is among the other's five likeliest. Random
weights have small margins between the top tokens, so FP8 rounding flips some of them
(a broken FP8 path scores near 0, not 0.6). The trained models know tiny-gsm8k: there
FP8 and bf16 must agree at 95% of the positions and every trained engine must answer
its questions.

Engines (support.engines): the TP=1 ones run one after another in one process; the
TP=2 ones are shared with test_qwen3_5_fusion.
"""

import pytest

from support.engines import ENGINES_TIMEOUT, Engine, forced_agreement, task_accuracy
from support.markers import requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow, pytest.mark.timeout(ENGINES_TIMEOUT)]

TP1_PRESETS = [
    "dense-bf16",
    "dense-fp8",
    "moe-bf16",
    "moe-fp8",
    "vl-fp8",
    "trained-dense-bf16",
    "trained-dense-fp8",
    "trained-moe-bf16",
    "trained-moe-fp8",
]
TP2_PRESETS = ["vl-fp8", "trained-dense-fp8"]
ENGINES = [Engine(p, tp=1) for p in TP1_PRESETS] + [Engine(p) for p in TP2_PRESETS]


@pytest.fixture(scope="module")
def run(engines):
    engines(*ENGINES)
    return lambda preset, tp: engines(Engine(preset, tp=tp))[0]


@pytest.mark.parametrize("tp, name", [(1, n) for n in TP1_PRESETS] + [(2, n) for n in TP2_PRESETS])
def test_preset_loads_and_generates(run, built, tp, name):
    import json

    result = run(name, tp)
    cfg = json.loads((built(name) / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]
    tokens = [t for seq in result["tokens"] for t in seq]
    assert all(seq for seq in result["tokens"]) and all(0 <= t < vocab for t in tokens)
    if not name.startswith("trained-"):
        assert all(len(seq) == 32 for seq in result["tokens"])  # EOS ignored
    assert len(set(tokens)) >= 8, result["tokens"]


def test_vllm_matches_transformers_reference(run, built):
    # transformers' own Qwen3.5 (float32, reference PyTorch GDN) scores vLLM's bf16
    # greedy tokens: wrong names, layouts or norm conventions would show here.
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from support.engines import random_prompts

    logging.set_verbosity_error()
    result = run("dense-bf16", 1)
    prompt, greedy = random_prompts(1)[0], result["tokens"][0]
    model = AutoModelForCausalLM.from_pretrained(built("dense-bf16"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + greedy])).logits[0, len(prompt) - 1 : -1]
    tokens = torch.tensor(greedy)
    top1 = float((logits.argmax(-1) == tokens).float().mean())
    rank = (logits > logits.gather(1, tokens[:, None])).sum(-1)
    print(f"\nvLLM bf16 TP=1 vs transformers float32: top-1 {top1:.3f}, ranks {rank.tolist()}")
    assert top1 >= 0.9, (top1, rank.tolist())
    assert int(rank.max()) < 5, rank.tolist()


@pytest.mark.parametrize("a, b", [(("vl-fp8", 1), ("dense-fp8", 1)), (("vl-fp8", 2), ("vl-fp8", 1))])
def test_vl_layout_matches(run, a, b):
    # The same language-model weights under model.language_model., MRoPE with text
    # positions (the same rotation as RoPE, computed differently), and the VL layout
    # sharded at TP=2: only rounding differs, but an FP8 model turns a one-ulp change of
    # an activation into a changed FP8 code, so near-ties flip.
    stats = forced_agreement(run(*a), run(*b))
    print(f"\n{a} vs {b}: {stats}")
    assert stats["top1"] >= 0.75 and stats["top5"] >= 0.95, stats


@pytest.mark.parametrize(
    "fp8, bf16, min_top1",
    [
        (("dense-fp8", 1), ("dense-bf16", 1), 0.6),
        (("moe-fp8", 1), ("moe-bf16", 1), 0.6),
        (("trained-dense-fp8", 1), ("trained-dense-bf16", 1), 0.95),
        (("trained-dense-fp8", 2), ("trained-dense-bf16", 1), 0.95),
        (("trained-moe-fp8", 1), ("trained-moe-bf16", 1), 0.95),
    ],
)
def test_fp8_agrees_with_bf16_of_the_same_seed(run, fp8, bf16, min_top1):
    stats = forced_agreement(run(*fp8), run(*bf16))
    print(f"\n{fp8} vs {bf16}: teacher-forced {stats}")
    assert stats["top1"] >= min_top1 and stats["top5"] >= 0.9, stats


@pytest.mark.parametrize(
    "tp, name", [(1, n) for n in TP1_PRESETS if n.startswith("trained-")] + [(2, "trained-dense-fp8")]
)
def test_trained_models_answer_their_questions(run, built, tp, name):
    """Each trained model, bf16 and FP8, TP=1 and TP=2, answers its unseen questions."""
    assert task_accuracy(run(name, tp), built(name)) >= 0.75
