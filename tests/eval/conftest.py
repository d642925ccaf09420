"""Fixtures for the GSM8K-check tests: a small GSM8K-format data folder with known
answers, a small Hugging Face tokenizer, and fake servers (``gsm8k_fakes``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gsm8k_fakes import BASELINE_LOG, FUSED_LOG, MINI_TEST, MINI_TRAIN, FakeBrain, FakeVllmServer, row


@pytest.fixture
def mini_gsm8k(tmp_path) -> Path:
    """A GSM8K-format folder: 6 train rows, 6 test rows (answers: the two numbers' sum)."""
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for name, rows in (("train.jsonl", MINI_TRAIN), ("test.jsonl", MINI_TEST)):
        (folder / name).write_text("".join(json.dumps(row(*r)) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (Hugging Face format) trained on GSM8K-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [row(*r)["question"] + "\n" + row(*r)["answer"] for r in MINI_TRAIN + MINI_TEST]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines * 4, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(
        out
    )
    return out


@pytest.fixture
def fake_servers(tokenizer_dir):
    """make(baseline_brain_kwargs, fused_brain_kwargs) -> a ``server_factory`` for
    ``run_gsm8k`` that serves a FakeBrain per label (and logs like the plugin)."""

    def make(baseline: dict | None = None, fused: dict | None = None, fused_log: list[str] | None = None):
        brains = {
            "baseline": FakeBrain(tokenizer_dir, **(baseline or {})),
            "fused": FakeBrain(tokenizer_dir, **(fused or {})),
        }

        def factory(cfg, env, log_path, progress):
            label = "baseline" if env.get("VLLM_ROCM_FUSED_DISABLE") == "1" else "fused"
            lines = BASELINE_LOG if label == "baseline" else (FUSED_LOG if fused_log is None else fused_log)
            return FakeVllmServer(brains[label], log_path, lines)

        factory.brains = brains
        return factory

    return make
