"""The pass/fail verdict of a fused-vs-baseline GSM8K run.

Accuracy checks, on one filter's exact match (``strict-match`` by default):

- ``gate``: the fused score is at least ``gate`` (absolute; e.g. 0.94, the bar
  the SGLang change was held to on Qwen3.5-397B-A17B-FP8);
- ``max_drop``: the fused score is at most ``max_drop`` below the baseline's.

Sanity checks on what actually ran, from the servers' logs: the baseline had
the plugin disabled, and the fused server built fused sites. Without them a
passing score would prove nothing about the fused path.

A check whose threshold is None is skipped (not listed). Scores are fractions
of the same questions, so they are compared with a tolerance far below
1/questions to keep float rounding from flipping a tie.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .gsm8k_task import FILTERS
from .harness import FilterScore

_EPS = 1e-9


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    metric: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def check_thresholds(gate: float | None, max_drop: float | None, metric: str) -> None:
    """Raise ``ValueError`` for a threshold or metric the verdict cannot use."""
    if gate is not None and not 0.0 <= gate <= 1.0:
        raise ValueError(f"--gate must be an accuracy in [0, 1], got {gate}")
    if max_drop is not None and not 0.0 <= max_drop <= 1.0:
        raise ValueError(f"--max-drop must be in [0, 1] (a difference of accuracies), got {max_drop}")
    if metric not in FILTERS:
        raise ValueError(f"--gate-filter must be one of {', '.join(FILTERS)}, got {metric!r}")


def judge(
    baseline: dict[str, FilterScore],
    fused: dict[str, FilterScore],
    *,
    metric: str = "strict-match",
    gate: float | None = None,
    max_drop: float | None = None,
    baseline_unfused: bool | None = None,
    fused_active: bool | None = None,
) -> Verdict:
    """The verdict on two servers' scores (as ``harness.extract_scores`` returns them).

    ``baseline_unfused`` / ``fused_active``: what the servers' logs showed (None:
    not known, the check is skipped)."""
    check_thresholds(gate, max_drop, metric)
    f = fused[metric].exact_match
    b = baseline[metric].exact_match
    checks = []
    if baseline_unfused is not None:
        checks.append(
            Check(
                "baseline unfused",
                baseline_unfused,
                "baseline server log shows the plugin disabled (VLLM_ROCM_FUSED_DISABLE=1)"
                if baseline_unfused
                else "baseline server log does not show the plugin disabled: it is not a baseline",
            )
        )
    if fused_active is not None:
        checks.append(
            Check(
                "fused path active",
                fused_active,
                "fused server log reports fused sites"
                if fused_active
                else "fused server log reports no fused sites: the fused path did not run",
            )
        )
    if gate is not None:
        ok = f >= gate - _EPS
        checks.append(Check("gate", ok, f"fused {metric} {f:.4f} {'>=' if ok else '<'} gate {gate:.4f}"))
    if max_drop is not None:
        drop = b - f
        ok = drop <= max_drop + _EPS
        checks.append(
            Check(
                "max drop",
                ok,
                f"fused {metric} {f:.4f} vs baseline {b:.4f}: drop {drop:+.4f} "
                f"{'<=' if ok else '>'} max drop {max_drop:.4f}",
            )
        )
    return Verdict(metric, checks)
