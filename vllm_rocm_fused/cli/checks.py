"""Argument checks the commands run before they start anything (a build, a server,
an output folder), so a bad value costs a second, not a vLLM start.

- argparse value types (``positive_int``, ...): argparse reports a bad value as a
  usage error naming the option, exit status 2;
- ``model_problem``: a ``--model`` that is neither an existing file or folder nor
  something a Hugging Face model id could be (``/nonexistent`` is neither);
- ``tp_problem``: a tensor-parallel size the attention heads of a local
  checkpoint's ``config.json`` cannot be split into (vLLM's own first check).

Only the standard library: the CLI stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


# A Hugging Face model id: "name" or "namespace/name"; letters, digits, "-", "_", ".";
# no leading or trailing "-"/".", no "--" or "..", at most 96 characters.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")


def could_be_hub_id(value: str) -> bool:
    return len(value) <= 96 and bool(_HUB_ID.match(value)) and "--" not in value and ".." not in value


def model_problem(value: str, flag: str = "--model") -> str | None:
    """Why ``value`` cannot be what vLLM serves (None: an existing file or folder, or a
    string that could be a Hugging Face model id; whether that id exists is the Hub's to say)."""
    if not value.strip():
        return f"{flag}: empty"
    if Path(value).expanduser().exists():
        return None
    if could_be_hub_id(value):
        return None
    return f"{flag} {value}: no such file or folder (and not a Hugging Face model id, which looks like org/name)"


def _heads(config: dict) -> dict[str, int]:
    text = config.get("text_config") or config  # multimodal checkpoints nest the language model
    keys = ("num_attention_heads", "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads")
    return {
        k: text[k] for k in keys if isinstance(text.get(k), int) and not isinstance(text.get(k), bool) and text[k] > 0
    }


def tp_problem(model: str, tp: int) -> str | None:
    """Why vLLM could not split the local checkpoint ``model`` across ``tp`` ranks, or
    None (also when it cannot tell: a Hub id, no readable config.json).

    The rules are vLLM's: the attention heads (and Qwen3.5's linear-attention heads)
    divide by ``tp``; KV heads divide by ``tp`` or, when fewer, are replicated, so
    ``tp`` divides by them."""
    config_path = Path(model).expanduser() / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for key, heads in _heads(config).items():
        if key == "num_key_value_heads" and heads < tp:
            ok = tp % heads == 0
        else:
            ok = heads % tp == 0
        if not ok:
            return f"--tp {tp}: {model} has {key} = {heads}, which vLLM cannot split across {tp} ranks"
    return None
