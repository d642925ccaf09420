"""Find the processes a test started, by a marker in their environment (every
descendant inherits it, whatever its command line or process group)."""

from __future__ import annotations

import os
import signal
import time
import uuid

MARKER_VAR = "VLLM_ROCM_FUSED_TEST_MARKER"


def new_marker() -> dict[str, str]:
    """An environment entry to give to the processes under test."""
    return {MARKER_VAR: uuid.uuid4().hex}


def processes_with(marker: dict[str, str]) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``marker``."""
    ((key, value),) = marker.items()
    needle = f"{key}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except (OSError, IndexError):
            continue
    return pids


def processes_left(marker: dict[str, str], timeout_s: float = 10.0) -> list[int]:
    """``processes_with(marker)`` once it is empty, or what it still holds after ``timeout_s``
    (polled: a stopped process takes a moment to leave /proc)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = processes_with(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT, as a Ctrl-C in a terminal
    would: SIGINT at its default, so Python raises KeyboardInterrupt there. A shell that
    starts pytest in the background without job control (``pytest ... &`` in a script)
    hands its children SIGINT ignored, and an ignored SIGINT stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
