"""The tiny models' tokenizer: byte-level BPE learned here, Qwen's markup."""

import json

import pytest

from vllm_rocm_fused.tiny_models import PresetError, build_tiny_model
from vllm_rocm_fused.tiny_models.tokenizer import SPECIAL_TOKENS, generate_corpus, train_tokenizer

TEXTS = [
    "Question: Tom has 12 apples and buys 5 more. How many apples does Tom have?",
    "def add(a, b):\n    return a + b\n",
    "ünïcödé 你好 🙂 \t tabs  and  spaces",
    "",
]


@pytest.mark.parametrize("name", ["dense-fp8", "vl-fp8"])
def test_transformers_loads_it_with_the_chat_template(built, name):
    from transformers import AutoTokenizer

    folder = built(name)
    tok = AutoTokenizer.from_pretrained(folder)
    vocab_size = (
        json.loads((folder / "config.json").read_text()).get("vocab_size")
        or json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    )
    assert len(tok) == vocab_size
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], tokenize=True, add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    assert tok.eos_token == "<|im_end|>"


def test_same_tokens_whichever_class_loads_it(built):
    # transformers loads the text layout with the tokenizer_config class and the VL
    # layout with its Qwen3.5 class; both must split text the same way.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(built("dense-fp8") / "tokenizer.json"))
    for folder in (built("dense-fp8"), built("vl-fp8")):
        tok = AutoTokenizer.from_pretrained(folder)
        for text in TEXTS:
            assert tok.encode(text) == raw.encode(text).ids, (folder.name, text)


def test_config_token_ids_point_at_the_special_tokens(built):
    from transformers import AutoTokenizer

    folder = built("vl-fp8")
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert tok.convert_ids_to_tokens(cfg["image_token_id"]) == "<|image_pad|>"
    assert tok.convert_ids_to_tokens(cfg["vision_start_token_id"]) == "<|vision_start|>"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert [tok.convert_ids_to_tokens(i) for i in gen["eos_token_id"]] == ["<|im_end|>", "<|endoftext|>"]


def test_training_is_deterministic_and_exact_size():
    a, b = train_tokenizer(1024), train_tokenizer(1024)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 1024
    assert [a.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert "<think>" in a.get_vocab()


def test_corpus_looks_like_text():
    lines = list(generate_corpus(200))
    assert len(set(lines)) > 150
    assert any("####" in line for line in lines) and any(line.startswith("The ") for line in lines)


def test_user_corpus_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zebra quokka axolotl\n" * 200 + "quokka axolotl zebra\n" * 200)
    tok = train_tokenizer(512, corpus)
    assert len(tok.encode(" quokka").ids) == 1  # learned from the file
    build_tiny_model(
        "dense-bf16",
        tmp_path / "m",
        overrides={"num_hidden_layers": 4, "vocab_size": 512, "tokenizer_corpus": str(corpus)},
    )
    stamp = json.loads((tmp_path / "m" / "tiny_model.json").read_text())
    assert stamp["tokenizer_corpus_sha256"]
    with pytest.raises(PresetError, match="tokenizer_corpus must be an existing text file"):
        build_tiny_model("dense-bf16", tmp_path / "n", overrides={"tokenizer_corpus": str(tmp_path / "nope.txt")})
    with pytest.raises(PresetError, match="vocab_size must be >= 512"):
        build_tiny_model("dense-bf16", tmp_path / "n", overrides={"vocab_size": 300})
