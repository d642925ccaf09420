"""The random weights are at sane scales: run the checkpoints through
transformers' own Qwen3.5 (float32, its reference PyTorch GDN) and look at the
activations and the logits."""

import math

import pytest
import torch

PROMPT = (
    "Question: Ada has 12 apples. Ben has 5 more apples than Ada. How many apples does Ben have?\n"
    "Answer: 12 + 5 = 17. #### 17"
)


@pytest.fixture(scope="module")
def hf_runs(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    out = {}
    for name in ("dense-bf16", "moe-bf16"):
        folder = built(name)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = tok(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            out[name] = (model(ids, output_hidden_states=True), len(tok))
    return out


@pytest.mark.parametrize("name", ["dense-bf16", "moe-bf16"])
def test_activations_stay_order_one_through_the_depth(hf_runs, name):
    fwd, _ = hf_runs[name]
    rms = [float(h.pow(2).mean().sqrt()) for h in fwd.hidden_states]
    assert len(rms) == 9  # embeddings + 8 layers (the last one after the final norm)
    assert all(0.5 < r < 3.0 for r in rms), rms
    assert rms[-2] > rms[0] * 1.05, rms  # the layers add something to the residual stream


@pytest.mark.parametrize("name", ["dense-bf16", "moe-bf16"])
def test_logits_are_neither_flat_nor_one_hot(hf_runs, name):
    fwd, vocab = hf_runs[name]
    logits = fwd.logits[0].float()
    assert 1.5 < float(logits.std()) < 6.0
    p = logits.softmax(-1)
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
    assert 1.0 < entropy < math.log(vocab) - 1.0, entropy
    assert 0.02 < float(p.max(-1).values.mean()) < 0.9
    # the most likely next token changes with the context (vLLM's greedy runs check the same)
    argmax = logits.argmax(-1).tolist()
    assert len(set(argmax)) >= len(argmax) // 2, argmax
