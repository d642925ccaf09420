"""The self-check: every fused site's dispatched path against the portable path, on the
machine that will serve, before it serves.

For one site (a norm site kind with its facts: hidden size, dtype, group, what it
hands on) and each token count to check, every rank makes random inputs (its own
partial sum ``x``, the shared residual; the site's real norm weight), runs the call
the way serving will (``backends.execute``: the backend the ranks agree on and the
path it takes), computes the spec's result from the same inputs (the communicator's
all-reduce, then ``ops.reference``), and compares them with ``ops.tolerance``. The
ranks agree on the verdict (the worst numbers over the group, one small collective);
on a mismatch every rank disables that backend for the size's token bucket
(``backends.disable``), logs a WARNING saying what differed and by how much, and
checks the size again on whatever is next (down to ``native``, the spec itself, which
needs no check).

The token counts are the two ends of every power-of-two bucket up to the largest
count the server runs (1, 2, 3, 4, 5, 8, 9, 16, ..., max): every bucket a call can fall
in is checked at both ends, so a path that changes inside a bucket is seen at least at
its edges. A site without a group is checked with the same inputs on every rank, so
every rank reaches the same verdict without a collective.

In vLLM (``layers.fused_norm`` configures it from VLLM_ROCM_FUSED_VALIDATE and the
scheduler's token limits) the check of a site runs at that site's first call outside
graph capture: vLLM's profile run, after the weights are loaded. ``strict`` raises
``SelfCheckError`` on a mismatch instead (every rank: the verdict is agreed).
``vllm-rocm-fused selftest`` calls ``check_call`` directly. Importable with torch alone.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass

import torch

from ..log import get_logger
from . import backends
from .backend_api import PATH_GENERIC, CallSpec
from .comm import Communicator
from .reference import norm_quant_reference
from .tolerance import Q_STEPS_MAX, Errors, compare

logger = get_logger("self_check")

MODES = ("off", "startup", "strict")
# the agreed numbers travel as integers: thousandths, capped (inf -> the cap)
_MILLI = 1000
_CAP = 10**15
SEED = 20240611


# a backend that raised at its first run: the registry disabled it and said so (ops.backends)
RAISED = "raised at its first run (see the log)"


class SelfCheckError(RuntimeError):
    """VLLM_ROCM_FUSED_VALIDATE=strict and a fast path differs from the portable one."""


@dataclass(frozen=True)
class SizeResult:
    """One size of one site: which backend and path ran, and how it compared."""

    site: str
    tokens: int
    backend: str
    path: str
    errors: Errors | None  # None: the call ran native (the spec itself: nothing to compare)
    disabled: bool = False  # it differed and was disabled on every rank for the size's bucket

    @property
    def ok(self) -> bool:
        return self.errors is None or self.errors.ok

    def line(self) -> str:
        where = f"{self.site}, T={self.tokens}: {self.backend}/{self.path}"
        if self.errors is None:
            return f"{where}: the portable path (the reference)"
        verdict = "ok" if self.ok else "DIFFERS"
        return f"{where}: {verdict} ({self.errors.describe()})"


@dataclass
class Settings:
    mode: str
    max_tokens: int


_settings: Settings | None = None
_results: list[SizeResult] = []
_checked: set[tuple] = set()
_seconds: dict[str, float] = {}
_lock = threading.Lock()


def configure(mode: str, max_tokens: int) -> None:
    """Check each site at its first call (``before_call``) in ``mode`` (off, startup,
    strict), at the token counts ``check_sizes(max_tokens)``."""
    global _settings
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    _settings = Settings(mode, max_tokens)


def settings() -> Settings | None:
    return _settings


def reset() -> None:
    """Forget the settings and every result (tests)."""
    global _settings
    with _lock:
        _settings = None
        _results.clear()
        _checked.clear()
        _seconds.clear()


def results() -> list[SizeResult]:
    return list(_results)


def checked_sites() -> list[str]:
    """The sites checked so far (their labels, "attn_input" or "attn_input (no all-reduce)"), in order."""
    return list(dict.fromkeys(r.site for r in _results))


def check_sizes(max_tokens: int) -> list[int]:
    """Both ends of every power-of-two token bucket up to ``max_tokens``:
    1, 2, 3, 4, 5, 8, 9, 16, ..., max_tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes = {1}
    hi = 1
    while hi < max_tokens:
        lo, hi = hi + 1, min(hi * 2, max_tokens)
        sizes.update((lo, hi))
    return sorted(sizes)


def site_label(tag: str, spec: CallSpec) -> str:
    label = tag or "op"
    return label if spec.world_size > 1 else f"{label} (no all-reduce)"


# --- one call ----------------------------------------------------------------------


def make_inputs(
    spec: CallSpec, comm: Communicator | None, *, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random (x, residual) for ``spec``: x is this rank's own partial sum (the same on
    every rank when there is no group), the residual the same on every rank."""
    g = torch.Generator(device=spec.device)
    rank = comm.rank if comm is not None and spec.world_size > 1 else 0
    g.manual_seed(seed * 1009 + rank + 1)
    x = torch.randn(spec.num_tokens, spec.hidden, generator=g, device=spec.device).to(spec.dtype)
    residual = None
    if spec.has_residual:
        g.manual_seed(seed * 1009)
        residual = (torch.randn(spec.num_tokens, spec.hidden, generator=g, device=spec.device) * 2).to(spec.dtype)
    return x, residual


def compare_with_reference(
    outputs: tuple,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    comm: Communicator | None,
    spec: CallSpec,
) -> Errors:
    """``outputs`` of a call against the spec's result for the same inputs (the
    communicator's all-reduce of ``x``: a collective over the group)."""
    h = comm.all_reduce(x) if comm is not None and spec.world_size > 1 and spec.num_tokens > 0 else x
    ref = norm_quant_reference(
        h,
        residual,
        weight,
        eps,
        out_dtype=x.dtype,
        group_size=spec.group_size,
        weight_offset=spec.weight_offset,
        emit_bf16=spec.emit_bf16,
        scale_layout=spec.scale_layout,
        quant_dtype=spec.quant_dtype,
        quantize=spec.quantize,
    )
    return compare(
        outputs,
        tuple(ref),
        h=h,
        residual=residual,
        weight=weight,
        eps=eps,
        weight_offset=spec.weight_offset,
        group_size=spec.group_size,
        quant_dtype=spec.quant_dtype,
        scale_layout=spec.scale_layout,
        emit_bf16=spec.emit_bf16,
        quantize=spec.quantize,
    )


def _as_int(v: float) -> int:
    return _CAP if math.isinf(v) or math.isnan(v) else min(_CAP, int(math.floor(v * _MILLI)))


def _agree(errors: Errors, comm: Communicator | None, spec: CallSpec) -> Errors:
    """The group's verdict, the same on every rank: the worst numbers over the ranks
    (in thousandths), and not ok wherever any rank was not."""
    if comm is None or spec.world_size <= 1:
        return errors
    fields = (errors.q_steps, errors.scale, errors.residual, errors.normed)
    bad, *worst = comm.agree_max([int(not errors.ok), *(_as_int(v) for v in fields)])
    q_steps, scale, residual, normed = (math.inf if v >= _CAP else v / _MILLI for v in worst)
    agreed = Errors(q_steps, scale, residual, normed, problem=errors.problem, worst=errors.worst)
    if bad and agreed.ok:  # another rank's problem, or its numbers just over a limit
        agreed = dataclasses.replace(agreed, problem="differs on another rank (see its log)")
    return agreed


def check_call(
    requested: str,
    weight: torch.Tensor,
    eps: float,
    comm: Communicator | None,
    spec: CallSpec,
    *,
    site: str = "",
    strict: bool = False,
) -> list[SizeResult]:
    """Check one size (``spec.num_tokens``) of a site, on every rank of ``comm`` at once.
    Returns what ran, in order: a result per backend that differed (each disabled for
    the bucket on every rank) and last the one that stays (or native)."""
    label = site or site_label("", spec)
    out: list[SizeResult] = []
    x: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    while True:
        decided = backends.decide(requested, spec, comm).name
        if decided == "native":  # the spec itself: no inputs needed
            out.append(SizeResult(label, spec.num_tokens, "native", PATH_GENERIC, None))
            return out
        if x is None:
            x, residual = make_inputs(spec, comm)
        ran = backends.execute(requested, x, residual, weight, eps, comm, spec)
        if ran.backend != decided:  # it raised at its first run (on some rank) and was disabled there
            raised = Errors(math.inf, math.inf, math.inf, math.inf, problem=RAISED)
            out.append(SizeResult(label, spec.num_tokens, decided, "-", raised, disabled=True))
        if ran.backend == "native":
            out.append(SizeResult(label, spec.num_tokens, ran.backend, ran.path, None))
            return out
        errors = _agree(compare_with_reference(ran.outputs, x, residual, weight, eps, comm, spec), comm, spec)
        if errors.ok:
            out.append(SizeResult(label, spec.num_tokens, ran.backend, ran.path, errors))
            return out
        what = f"{ran.backend}/{ran.path} differs from the portable path at T={spec.num_tokens}: {errors.describe()}"
        if strict:
            raise SelfCheckError(
                f"vllm-rocm-fused: self-check ({label}): {what}. VLLM_ROCM_FUSED_VALIDATE=strict: not starting "
                "(startup disables the path instead; VLLM_ROCM_FUSED_BACKEND=native avoids every fast path)"
            )
        backends.disable(ran.backend, spec, f"self-check: {what}")
        out.append(SizeResult(label, spec.num_tokens, ran.backend, ran.path, errors, disabled=True))


def check_site(
    requested: str,
    weight: torch.Tensor,
    eps: float,
    comm: Communicator | None,
    spec: CallSpec,
    sizes: list[int],
    *,
    site: str = "",
    strict: bool = False,
) -> list[SizeResult]:
    """``check_call`` at each of ``sizes`` (``spec`` gives the other facts); the
    results are also kept for ``summary_lines``."""
    label = site or site_label("", spec)
    t0 = time.perf_counter()
    out: list[SizeResult] = []
    for tokens in sizes:
        sized = dataclasses.replace(spec, num_tokens=tokens, capturing=False)
        out.extend(check_call(requested, weight, eps, comm, sized, site=label, strict=strict))
    with _lock:
        _results.extend(out)
        _seconds[label] = _seconds.get(label, 0.0) + time.perf_counter() - t0
    _warn_disabled(label, out)
    return out


def _warn_disabled(label: str, results: list[SizeResult]) -> None:
    """One WARNING per backend/path the check disabled at this site: where, by how much."""
    by_path: dict[str, list[SizeResult]] = {}
    for r in results:
        if r.disabled and r.errors is not None and r.errors.problem != RAISED:
            by_path.setdefault(f"{r.backend}/{r.path}", []).append(r)
    for what, rs in by_path.items():
        worst = max(rs, key=lambda r: r.errors.q_steps if r.errors is not None else 0.0)
        assert worst.errors is not None
        buckets = sorted({backends.token_bucket(r.tokens) for r in rs})
        logger.warning(
            "vllm-rocm-fused: self-check (%s): %s differs from the portable path (worst at T=%d: %s; limits: "
            "%g fp8 steps, 1x the allowed error); disabled on every rank for %s, which take the next backend",
            label,
            what,
            worst.tokens,
            worst.errors.describe(),
            Q_STEPS_MAX,
            bucket_ranges(buckets),
        )


def bucket_ranges(buckets: list[int]) -> str:
    """Token buckets in words, adjacent ones merged: [1, 2, 4, 16] -> "T=1-4, T=9-16"."""
    spans: list[list[int]] = []
    for b in sorted(buckets):
        if spans and b == spans[-1][1] * 2:
            spans[-1][1] = b
        else:
            spans.append([b, b])
    texts = []
    for lo, hi in spans:
        start = backends.bucket_text(lo).removeprefix("T=").split("-")[0]
        end = backends.bucket_text(hi).removeprefix("T=").split("-")[-1]
        texts.append(f"T={start}" if start == end else f"T={start}-{end}")
    return ", ".join(texts)


def before_call(
    tag: str,
    requested: str,
    weight: torch.Tensor,
    eps: float,
    comm: Communicator | None,
    spec: CallSpec,
) -> None:
    """The op's hook for a site's call (``tag``): the first eager call of each site
    (its facts, its group) checks it, when ``configure`` asked for it."""
    cfg = _settings
    if cfg is None or cfg.mode == "off" or spec.capturing or spec.device.type == "meta":
        return
    key = (
        tag,
        requested,
        comm.name if comm is not None else None,
        backends.call_key(dataclasses.replace(spec, num_tokens=1)),
    )
    with _lock:
        if key in _checked:
            return
        _checked.add(key)
    label = site_label(tag, spec)
    check_site(requested, weight, eps, comm, spec, check_sizes(cfg.max_tokens), site=label, strict=cfg.mode == "strict")
    for line in summary_lines(label):
        logger.info("%s", line)


# --- what it found -------------------------------------------------------------------


def _ranges(tokens: list[int]) -> str:
    return ", ".join(str(t) for t in tokens) if len(tokens) <= 3 else f"{tokens[0]}-{tokens[-1]} ({len(tokens)} sizes)"


def site_summary(site: str) -> str | None:
    """One line for ``site``: what ran at which sizes, the worst error, what was
    disabled. None if the site was not checked."""
    rows = [r for r in _results if r.site == site]
    if not rows:
        return None
    kept: dict[str, list[int]] = {}
    for r in rows:
        if not r.disabled:
            kept.setdefault(f"{r.backend}/{r.path}", []).append(r.tokens)
    parts = [f"{what} at T={_ranges(ts)}" for what, ts in kept.items()]
    compared = [r.errors for r in rows if r.errors is not None and not r.disabled]
    text = f"{site}: " + "; ".join(parts)
    if compared:
        text += f" (within tolerance, worst q {max(e.q_steps for e in compared):.2f} fp8 steps)"
    dropped: dict[str, list[SizeResult]] = {}
    for r in rows:
        if r.disabled:
            dropped.setdefault(f"{r.backend}/{r.path}", []).append(r)
    for what, rs in dropped.items():
        worst = max(rs, key=lambda r: r.errors.q_steps if r.errors is not None else 0.0)
        assert worst.errors is not None
        text += f"; DISABLED {what} at T={_ranges(sorted(r.tokens for r in rs))} (differed: {worst.errors.describe()})"
    seconds = _seconds.get(site)
    if seconds is not None:
        text += f" [{seconds:.2f} s]"
    return text


def summary_lines(site: str | None = None) -> list[str]:
    """The check's findings, one line per site (``site``: that one only), in the words
    doctor uses, or nothing if nothing was checked."""
    sites = [site] if site is not None else checked_sites()
    lines = [line for s in sites if (line := site_summary(s)) is not None]
    if not lines:
        return []
    mode = _settings.mode if _settings is not None else "direct call"
    return [f"vllm-rocm-fused: self-check ({mode}): " + lines[0], *("  " + line for line in lines[1:])]


def total_seconds() -> float:
    return sum(_seconds.values())
