"""A byte-level BPE tokenizer for the tiny models, trained here from text this
module writes itself (or from a file the user gives), with Qwen's chat markup.

Why not Qwen's own tokenizer: no model hub is reachable, and a 248k-entry
vocabulary would dwarf a 256-wide model. What we keep from Qwen: byte-level BPE
(every string is encodable) behind Qwen2Tokenizer's normalizer and pre-tokenizer
(so transformers' Qwen tokenizer classes, which rebuild that pipeline, split text
exactly as tokenizer.json does), the ChatML special tokens (``<|im_start|>``,
``<|im_end|>``, ``<|endoftext|>``, the vision markers, ``<think>``), and a ChatML
chat template, so ``vllm serve`` takes chat requests.

The vocabulary has exactly ``vocab_size`` entries (the model's embedding rows):
if the text runs out of merges first, ``<|reserved_N|>`` special tokens fill the
rest, as in Qwen's own vocabulary. Training is deterministic: the corpus comes
from a fixed-seed generator and the BPE trainer breaks ties by pair order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

# Qwen's special tokens (same spellings); ids are assigned in this order from 0.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added (not special) tokens, as in Qwen3.x: they show up in decoded text.
ADDED_TOKENS = ("<think>", "</think>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Qwen's pre-tokenization: words with an optional leading non-letter, digits one by
# one, punctuation runs, newlines, spaces.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, the markup of Qwen's template, without tool calling or thinking
# budgets: a system/user/assistant transcript plus the assistant prompt.
# Message content may be a string or a list of {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = namespace(text='') -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
    "{%- set content.text = content.text + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set content = content.text -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# --- the built-in corpus --------------------------------------------------------------

_NAMES = (
    "Ada Ben Cleo Dan Eva Finn Gus Hana Ivan Jia Kai Lena Max Nora Omar Pia Raj Sara Tom Uma Vik Wen Yara Zoe"
).split()
_NOUNS = (
    "apple book box bird car cat city cloud coin cup day dog door egg field fish flower "
    "friend garden glass hand hill house idea island key lamp letter light map market "
    "moon morning mountain night number paper pencil plan river road rock school sea "
    "ship song star stone story street sun table teacher tree train village water "
    "window word world year answer question problem model layer token kernel"
).split()
_ADJS = (
    "big small red blue green old new quiet bright dark warm cold fast slow happy tired "
    "simple strange long short heavy light early late clever gentle"
).split()
_VERBS = (
    "sees finds makes takes gives keeps reads writes opens closes builds paints moves "
    "carries counts follows helps likes needs wants shares sells buys"
).split()
_PLACES = (
    "in the park",
    "near the river",
    "at the market",
    "on the hill",
    "by the sea",
    "in the garden",
    "at school",
    "in the city",
    "under the tree",
    "on the road",
)
_ITEMS = (
    "apples",
    "books",
    "coins",
    "pencils",
    "cookies",
    "stamps",
    "marbles",
    "cards",
    "flowers",
    "boxes",
    "eggs",
    "shells",
)
_CODE = (
    "def add(a, b):\n    return a + b\n",
    "for i in range({n}):\n    print(i * {m})\n",
    "x = [{n}, {m}, {k}]\ny = sum(x) / len(x)\n",
    "if value > {n}:\n    value -= {m}\nelse:\n    value += {k}\n",
    '{{"id": {n}, "name": "{name}", "count": {m}}}\n',
)


def _pseudo_word(rng: random.Random) -> str:
    onsets = "b c d f g h j k l m n p r s t v w z br cr dr fl gr pl pr sh st th tr ch".split()
    vowels = "a e i o u ai ea ee oo ou io".split()
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    n = rng.choice((1, 2, 2, 3))
    return "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n))


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    name, other = rng.sample(_NAMES, 2)
    if kind < 0.35:
        s = (
            f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"the {rng.choice(_NOUNS)} {rng.choice(_PLACES)}."
        )
        return s if rng.random() < 0.7 else s.lower()
    if kind < 0.55:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        item = rng.choice(_ITEMS)
        op = rng.choice(("more", "fewer"))
        total = a + b if op == "more" else max(a - b, 0)
        return (
            f"Question: {name} has {a} {item}. {other} has {b} {op} {item} than {name}. "
            f"How many {item} does {other} have?\nAnswer: {a} {'+' if op == 'more' else '-'} {b} "
            f"= {total}. #### {total}"
        )
    if kind < 0.70:
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op = rng.choice("+-*/")
        value = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 2)}[op]
        return f"What is {a} {op} {b}? It is {value}."
    if kind < 0.80:
        return rng.choice(_CODE).format(n=rng.randint(2, 50), m=rng.randint(2, 9), k=rng.randint(10, 99), name=name)
    if kind < 0.92:
        words = " ".join(_pseudo_word(rng) for _ in range(rng.randint(3, 9)))
        return words.capitalize() + rng.choice((".", "!", "?", ","))
    return (
        f'{name} said: "I {rng.choice(_VERBS)[:-1]} the {rng.choice(_ADJS)} '
        f'{rng.choice(_NOUNS)}." {other} answered, "Yes, {rng.randint(2, 12)} times."'
    )


def generate_corpus(num_lines: int = 20000, seed: int = 0) -> Iterator[str]:
    """Deterministic synthetic text: plain sentences, word problems in GSM8K's
    "#### answer" shape, arithmetic, code and pseudo-words (for merge variety)."""
    rng = random.Random(f"vllm-rocm-fused-tiny-tokenizer-{seed}")
    for _ in range(num_lines):
        yield _sentence(rng)


# --- training and files ---------------------------------------------------------------


def train_tokenizer(vocab_size: int, corpus_file: str | Path | None = None, *, lines: Iterable[str] | None = None):
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` entries.

    corpus_file: UTF-8 text to learn merges from; or ``lines``, the text as an
    iterable of strings (the trained models' task text); default: :func:`generate_corpus`.
    Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    min_size = len(SPECIAL_TOKENS) + len(ADDED_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Qwen2Tokenizer's pipeline, piece for piece (transformers rebuilds it from the
    # vocabulary when it loads a Qwen-family tokenizer, so any other pipeline would
    # tokenize differently depending on which class loaded it).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    if corpus_file is not None and lines is not None:
        raise ValueError("give corpus_file or lines, not both")
    if lines is not None:
        tok.train_from_iterator(lines, trainer)
    elif corpus_file is not None:
        path = Path(corpus_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer corpus file not found: {path}")
        with path.open(encoding="utf-8") as f:
            tok.train_from_iterator((line for line in f), trainer)
    else:
        tok.train_from_iterator(generate_corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - tok.get_vocab_size())]
    if reserved:
        tok.add_special_tokens(reserved)
    if tok.get_vocab_size() != vocab_size:  # pragma: no cover - a tokenizers behaviour change
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} entries, expected {vocab_size}")
    return tok


def token_id(tok, token: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:  # pragma: no cover - SPECIAL_TOKENS are always added
        raise KeyError(token)
    return tid


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja
    (the files transformers' AutoTokenizer and vLLM read)."""
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")
