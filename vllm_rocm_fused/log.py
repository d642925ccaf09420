"""Loggers under vLLM's "vllm" logger, so a serving process shows our lines with
vLLM's formatting, without this module importing vLLM.

``log_once`` keeps fallbacks loud once and silent in the hot path.
"""

from __future__ import annotations

import logging
import threading

_ROOT = "vllm.rocm_fused"
_seen: set[str] = set()
_seen_lock = threading.Lock()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{_ROOT}.{name}")


def log_once(logger: logging.Logger, level: int, key: str, msg: str, *args) -> bool:
    """Log ``msg`` the first time ``key`` is seen in this process; True if it logged."""
    with _seen_lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.log(level, msg, *args)
    return True


def forget_once_keys() -> None:
    """For tests: let every once-only message be logged again."""
    with _seen_lock:
        _seen.clear()
