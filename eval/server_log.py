"""What the plugin reported in a ``vllm serve`` log.

Every process vLLM starts (API server, engine core, each TP worker) loads the
plugin and logs lines beginning ``vllm-rocm-fused:``: the registration or the
``VLLM_ROCM_FUSED_DISABLE=1`` notice, one ``fused sites (...)`` summary per rank,
and the first call of each (site, backend, path), e.g. ``site attn_input ran
generic via backend native``. The report shows them once each, in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "vllm-rocm-fused:"
DISABLED_MARK = "VLLM_ROCM_FUSED_DISABLE=1"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class PluginReport:
    """The plugin's lines of one server log, deduplicated (process prefixes dropped)."""

    lines: list[str] = field(default_factory=list)

    @property
    def disabled(self) -> bool:
        """The plugin said it registered nothing because of VLLM_ROCM_FUSED_DISABLE=1."""
        return any(DISABLED_MARK in line and "registers nothing" in line for line in self.lines)

    @property
    def fused_sites(self) -> list[str]:
        """The per-rank ``fused sites`` summaries (empty: no fused model was built)."""
        return [line for line in self.lines if line.startswith(PREFIX + " fused sites (")]

    @property
    def not_fused(self) -> list[str]:
        """Models the overrides built but left unfused, with the reason."""
        return [line for line in self.lines if ": not fused: " in line]

    @property
    def site_paths(self) -> list[str]:
        """First call of each (site, backend, path): which path actually ran."""
        return [line for line in self.lines if line.startswith(PREFIX + " site ") and " ran " in line]

    @property
    def fused_active(self) -> bool:
        return bool(self.fused_sites) and not self.disabled


def plugin_lines(text: str) -> list[str]:
    """Each distinct plugin message in ``text``, from ``vllm-rocm-fused:`` to the end of its line."""
    seen: dict[str, None] = {}
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        at = line.find(PREFIX)
        if at >= 0:
            seen.setdefault(line[at:].rstrip(), None)
    return list(seen)


# An exception line, bare (a traceback's last line) or as the message of a vLLM log
# line ("... ERROR 11-29 23:25:25 [file.py:953] RuntimeError: ...").
_EXCEPTION = re.compile(r"(?:^|\]\s)([A-Za-z_][\w.]*(?:Error|Exception)\b:\s.*)$")


def first_error(log_path: str | Path) -> str | None:
    """The first exception line in a server log: usually the root cause of a failed
    start (vLLM's last lines tend to be the engine's "see root cause above")."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    for raw in text.splitlines():
        m = _EXCEPTION.search(_ANSI.sub("", raw).rstrip())
        if m:
            return m.group(1)
    return None


def read_plugin_report(log_path: str | Path) -> PluginReport:
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        text = ""
    return PluginReport(plugin_lines(text))
