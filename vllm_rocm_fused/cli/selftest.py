"""``vllm-rocm-fused selftest``: on this machine's GPUs (or its CPU), is the fused op
right, and how much time does it save per site and per decode step?

One process per rank (``--tp``, default: every visible GPU; torch.distributed over
NCCL on GPUs, gloo on the CPU; torch alone, no vLLM). The sites come from ``--model``
(a local checkpoint folder or its config.json: hidden size, which layers are attention
or linear attention, dense or MoE MLPs, whether the consumers take FP8) or from
``--hidden`` (every site kind). For each site and token count:

1. check: the dispatched op (the backend the ranks agree on, the path it takes)
   against the spec on random inputs (``ops.self_check.check_call``, the startup
   self-check's own code and tolerance: max error in FP8 steps, a path that differs
   is reported and exits 1);
2. time, as graph replays on GPUs (eager on the CPU): the fused op; the unfused chain
   vLLM runs instead (its all-reduce, then an add + RMSNorm kernel, then a group-quant
   kernel: this package's Triton kernels on GPUs, torch ops on the CPU); and a floor,
   the same count of empty launches without a collective (what the timing itself costs).

Prints a table, writes it as markdown and the full results as JSON (``--out``), and,
with a model, the time saved per decode step over the model's sites.
``--check-up-to N`` also times the startup self-check as a server with
max_num_batched_tokens=N runs it (every site, both ends of every token bucket).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import positive_int

DEFAULT_TOKENS_GPU = (1, 4, 16, 64, 256, 1024, 4096, 8192)
DEFAULT_TOKENS_CPU = (1, 16, 128)
EPS = 1e-6
GEMMA_OFFSET = 1.0  # Qwen3.5's norms: x * (1 + w)


@dataclass(frozen=True)
class Site:
    """A fused site of the model: its kind, whether it all-reduces first, what it hands on,
    and how many of it one forward (a decode step) runs (None without a model)."""

    kind: str
    title: str
    all_reduce: bool
    quantize: bool
    emit_bf16: bool
    count: int | None = None

    @property
    def label(self) -> str:
        return self.kind if self.all_reduce else f"{self.kind} (no all-reduce)"


@dataclass
class Config:
    hiddens: list[int]
    sites: dict[int, list[Site]]  # hidden -> its sites
    tp: int
    tokens: list[int]
    device: str  # "cuda" or "cpu"
    scale_layout: str
    quant_dtype: str | None = None  # None: the device's (ops.platform_info)
    repeats: int = 16  # ops per graph (GPU) / calls per timing (CPU)
    replays: int = 20  # timed replays (GPU) / timings (CPU)
    check_up_to: int | None = None
    model: str | None = None
    time_ops: bool = True
    notes: list[str] = field(default_factory=list)


# --- sites from a checkpoint --------------------------------------------------------


def read_config(model: str) -> dict:
    """The language model's config.json of ``model`` (a folder or the file itself);
    Qwen3.5 VL configs nest it under text_config."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model}: cannot read {path} ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--model {model}: {path} is not a JSON object")
    text = config.get("text_config")
    if isinstance(text, dict):
        merged = dict(text)
        merged.setdefault("quantization_config", config.get("quantization_config"))
        return merged
    return config


def _fp8_consumer(quant: dict | None, layer: int, names: tuple[str, ...]) -> bool:
    """Whether the FP8 checkpoint quantizes layer ``layer``'s module ``names`` (any of
    them: HF splits what vLLM fuses) - not listed in modules_to_not_convert/ignored_layers."""
    if not isinstance(quant, dict) or str(quant.get("quant_method", "")).lower() != "fp8":
        return False
    skipped = [*(quant.get("modules_to_not_convert") or []), *(quant.get("ignored_layers") or [])]
    return not any(f"layers.{layer}.{n}" in s for s in skipped for n in names)


def sites_from_config(config: dict, tp: int) -> tuple[int, list[Site], str]:
    """(hidden size, the sites with their counts, a one-line description) of a Qwen3.5
    config, as the plugin fuses them (models/fusion.py): per layer an input site
    (attention or GDN; layer 0's without an all-reduce) and a post-attention site
    (dense: FP8 for gate_up_proj; MoE: bf16), and the final norm."""
    hidden = config.get("hidden_size")
    layers = config.get("num_hidden_layers")
    if not isinstance(hidden, int) or not isinstance(layers, int) or hidden < 1 or layers < 1:
        raise ValueError("the config has no positive hidden_size and num_hidden_layers")
    types = config.get("layer_types") or ["full_attention"] * layers
    moe = int(config.get("num_experts") or 0) > 0
    mlp_only = set(config.get("mlp_only_layers") or [])
    quant = config.get("quantization_config")
    counts: dict[tuple, int] = {}
    for i in range(layers):
        attn = types[i] == "full_attention"
        kind, names = (
            ("attn_input", ("self_attn.q_proj", "self_attn.qkv_proj"))
            if attn
            else (
                "gdn_input",
                ("linear_attn.in_proj_qkvz",),
            )
        )
        key = (kind, tp > 1 and i > 0, _fp8_consumer(quant, i, names), not attn)
        counts[key] = counts.get(key, 0) + 1
        if moe and i not in mlp_only:
            key = ("post_attn_moe", tp > 1, False, False)
        else:
            key = ("post_attn_dense", tp > 1, _fp8_consumer(quant, i, ("mlp.gate_proj", "mlp.gate_up_proj")), False)
        counts[key] = counts.get(key, 0) + 1
    counts[("final_norm", tp > 1, False, False)] = 1
    titles = _titles()
    sites = [Site(kind, titles[kind], ar, q, emit and q, count) for (kind, ar, q, emit), count in counts.items()]
    fp8 = "FP8" if any(s.quantize for s in sites) else "bf16"
    desc = f"{layers} layers ({sum(t == 'full_attention' for t in types[:layers])} attention), {'MoE' if moe else 'dense'}, {fp8}, hidden {hidden}"
    return hidden, sites, desc


def _titles() -> dict[str, str]:
    from ..sites import SITE_KINDS

    return {s.key: s.title for s in SITE_KINDS}


def sites_for_hidden(tp: int) -> list[Site]:
    """Every site kind, all-reducing when there is a group (``--hidden``: no model)."""
    from ..sites import SITE_KINDS

    return [Site(s.key, s.title, tp > 1, s.quantize, s.emit_bf16) for s in SITE_KINDS]


# --- one rank -------------------------------------------------------------------------


def _spec(site: Site, tokens: int, hidden: int, cfg: Config, device, world: int, quant_dtype):
    import torch

    from ..ops.backend_api import CallSpec

    return CallSpec(
        num_tokens=tokens,
        hidden=hidden,
        dtype=torch.bfloat16,
        device=device,
        world_size=world if site.all_reduce else 1,
        group_size=128,
        weight_offset=GEMMA_OFFSET,
        emit_bf16=site.emit_bf16,
        scale_layout=cfg.scale_layout,
        quant_dtype=quant_dtype,
        has_residual=True,
        quantize=site.quantize,
    )


def _barrier(group) -> None:
    import torch.distributed as dist

    if group is not None:
        dist.barrier(group=group)


def time_gpu(fn: Callable[[], object], cfg: Config, group) -> float:
    """Median microseconds per op over ``cfg.replays`` replays of a CUDA graph holding
    ``cfg.repeats`` calls of ``fn`` (every rank replays the same count: the graphs hold
    collectives)."""
    import torch

    for _ in range(2):  # eager warm-up: compiles, agrees, creates buffers
        fn()
    torch.cuda.synchronize()
    _barrier(group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(cfg.repeats):
            fn()
    torch.cuda.synchronize()
    _barrier(group)
    for _ in range(10):  # clocks up after the host-side pause
        graph.replay()
    torch.cuda.synchronize()
    _barrier(group)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(cfg.replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(cfg.replays)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) * 1000.0 / cfg.repeats for s, e in zip(starts, ends))


def time_cpu(fn: Callable[[], object], cfg: Config, group) -> float:
    """Median microseconds per call, eager (the CPU has no graphs)."""
    fn()
    samples = []
    for _ in range(max(1, min(cfg.replays, 3))):
        _barrier(group)
        t0 = time.perf_counter()
        for _ in range(cfg.repeats):
            fn()
        samples.append((time.perf_counter() - t0) * 1e6 / cfg.repeats)
    return statistics.median(samples)


def _unfused(site: Site, spec, x, residual, weight, scratch, group, on_gpu: bool):
    """What vLLM runs instead of one fused site: the all-reduce (in place, as vLLM's NCCL
    path does; averaged on GPUs so repeated replays keep the values finite), then add +
    RMSNorm, then the group quant."""
    import torch.distributed as dist

    from ..ops.reference import add_residual, group_quant_reference, rms_norm

    h = x
    if group is not None and site.all_reduce:
        if on_gpu:
            dist.all_reduce(scratch, op=dist.ReduceOp.AVG, group=group)
        else:
            scratch.copy_(x)
            dist.all_reduce(scratch, group=group)
        h = scratch
    if on_gpu:
        from ..kernels.add_rmsnorm_quant import add_rmsnorm_quant
        from ..kernels.group_quant import group_quant

        _, _, res, normed = add_rmsnorm_quant(
            h, residual, weight, EPS, out_dtype=x.dtype, weight_offset=GEMMA_OFFSET, quantize=False
        )
        assert normed is not None  # a norm-only launch returns it
        if site.quantize:
            return group_quant(normed, group_size=128, scale_layout=spec.scale_layout, quant_dtype=spec.quant_dtype)
        return res, normed
    s, res = add_residual(h, residual, x.dtype)
    normed = rms_norm(s, weight, EPS, GEMMA_OFFSET, x.dtype)
    if site.quantize:
        return group_quant_reference(normed, 128, spec.quant_dtype, spec.scale_layout)
    return res, normed


def _measure(site: Site, hidden: int, tokens: int, cfg: Config, ctx: dict) -> dict:
    """Check and time one site at one token count on this rank."""
    import torch

    from ..ops import self_check
    from ..ops.fused import fused_allreduce_rmsnorm_quant

    group, comm, device, world = ctx["group"], ctx["comm"], ctx["device"], ctx["world"]
    spec = _spec(site, tokens, hidden, cfg, device, world, ctx["quant_dtype"])
    weight = ctx["weights"][hidden]
    results = self_check.check_call("auto", weight, EPS, comm if site.all_reduce else None, spec, site=site.label)
    last = results[-1]
    differed = [r for r in results if r.disabled]
    compared = [r.errors for r in results if r.errors is not None]
    row: dict[str, Any] = {
        "hidden": hidden,
        "site": site.label,
        "kind": site.kind,
        "all_reduce": site.all_reduce,
        "quantize": site.quantize,
        "count": site.count,
        "tokens": tokens,
        "backend": last.backend,
        "path": last.path,
        "ok": not differed,
        "disabled": [f"{r.backend}/{r.path}" for r in differed],
        "q_steps": max((e.q_steps for e in compared), default=None),
        "differed": [r.line() for r in differed],
    }
    if not cfg.time_ops:
        return row
    x, residual = self_check.make_inputs(spec, comm if site.all_reduce else None)
    op_group = group if site.all_reduce else None
    scratch = x.clone()

    def fused():
        return fused_allreduce_rmsnorm_quant(
            x,
            residual,
            weight,
            EPS,
            group=op_group,
            weight_offset=GEMMA_OFFSET,
            emit_bf16=site.emit_bf16,
            scale_layout=cfg.scale_layout,
            quant_dtype=spec.quant_dtype,
            quantize=site.quantize,
        )

    def unfused():
        return _unfused(site, spec, x, residual, weight, scratch, op_group, device.type == "cuda")

    tiny = torch.zeros(1, device=device)

    def empty():
        return tiny.add_(1)

    timer = time_gpu if device.type == "cuda" else time_cpu
    us_fused, us_unfused = timer(fused, cfg, group), timer(unfused, cfg, group)
    row.update(
        us_fused=us_fused, us_unfused=us_unfused, us_saved=us_unfused - us_fused, us_floor=timer(empty, cfg, group)
    )
    return row


def rank_context(rank: int, world: int, port: int, cfg: Config) -> dict:
    """This rank's device, process group (``world`` > 1), communicator, FP8 type and
    norm weights (random, one per hidden size: the sites' shapes are what matter)."""
    import torch
    import torch.distributed as dist

    from ..ops.comm import communicator_for_group
    from ..platform_info import default_fp8_dtype

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    group = None
    if world > 1:
        dist.init_process_group(
            "nccl" if cfg.device == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            device_id=device if cfg.device == "cuda" else None,
        )
        group = dist.group.WORLD
    quant_dtype = getattr(torch, cfg.quant_dtype) if cfg.quant_dtype else default_fp8_dtype(device)
    g = torch.Generator().manual_seed(7)
    weights = {h: (torch.randn(h, generator=g) * 0.3).to(torch.bfloat16).to(device) for h in cfg.hiddens}
    return {
        "group": group,
        "comm": communicator_for_group(group),
        "device": device,
        "world": world,
        "quant_dtype": quant_dtype,
        "weights": weights,
    }


def rank_rows(cfg: Config, ctx: dict, *, progress: bool = False) -> list[dict]:
    """Every site x token count on this rank (every rank runs the same sequence);
    ``progress``: print a line per row as it is done."""
    rows = []
    for hidden in cfg.hiddens:
        for site in cfg.sites[hidden]:
            for tokens in cfg.tokens:
                row = _measure(site, hidden, tokens, cfg, ctx)
                rows.append(row)
                if progress:
                    us = (
                        f", {row['us_fused']:.1f} us fused, {row['us_unfused']:.1f} us unfused"
                        if "us_fused" in row
                        else ""
                    )
                    print(
                        f"selftest: hidden {hidden} {site.label} T={tokens}: {row['backend']}/{row['path']} "
                        f"{'ok' if row['ok'] else 'DIFFERS'}{us}",
                        flush=True,
                    )
    return rows


def rank_main(rank: int, world: int, port: int, cfg: Config, out_dir: str, setup: Callable[[], None] | None) -> None:
    """One rank: ``setup`` (if any), its device and group, every site x token count,
    the startup check's cost (``check_up_to``); results to ``out_dir/rank<r>.json``."""
    import torch.distributed as dist

    if setup is not None:
        setup()
    from ..ops import self_check
    from ..ops.comm import forget_group

    ctx = rank_context(rank, world, port, cfg)
    try:
        rows = rank_rows(cfg, ctx, progress=rank == 0)
        check_cost = _startup_check_cost(cfg, ctx) if cfg.check_up_to else None
        info = {
            "rows": rows,
            "check_cost": check_cost,
            "quant_dtype": str(ctx["quant_dtype"]).replace("torch.", ""),
            "self_check_lines": self_check.summary_lines(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(info))
    finally:
        group = ctx.pop("group")
        ctx.clear()  # its communicator holds the group too
        if group is not None:
            forget_group(group)
            dist.destroy_process_group()


def _startup_check_cost(cfg: Config, ctx: dict) -> dict:
    """The startup self-check as a server with max_num_batched_tokens=cfg.check_up_to runs
    it: every site (with its real facts) at both ends of every token bucket, timed."""
    import torch

    from ..ops import backends, self_check

    sizes = self_check.check_sizes(cfg.check_up_to or 1)
    sync = torch.cuda.synchronize if ctx["device"].type == "cuda" else (lambda: None)
    backends.reset_decisions()  # as in a fresh server: nothing agreed, nothing disabled
    sync()
    _barrier(ctx["group"])
    t0 = time.perf_counter()
    checked = 0
    differed = 0
    for hidden in cfg.hiddens:
        for site in cfg.sites[hidden]:
            spec = _spec(site, 1, hidden, cfg, ctx["device"], ctx["world"], ctx["quant_dtype"])
            comm = ctx["comm"] if site.all_reduce else None
            results = self_check.check_site(
                "auto", ctx["weights"][hidden], EPS, comm, spec, sizes, site=f"{site.label} h{hidden}"
            )
            checked += 1
            differed += sum(r.disabled for r in results)
    sync()
    _barrier(ctx["group"])
    return {
        "seconds": time.perf_counter() - t0,
        "sites": checked,
        "sizes": len(sizes),
        "max_tokens": cfg.check_up_to,
        "differed": differed,
    }


# --- all ranks ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_selftest(cfg: Config, setup: Callable[[], None] | None = None) -> dict:
    """Run every rank (spawned processes; TP=1 in this process) and merge their results.
    ``setup``: a picklable function each rank calls first (tests install fakes there)."""
    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        if cfg.tp == 1:
            rank_main(0, 1, 0, cfg, out_dir, setup)
        else:
            mp.start_processes(
                rank_main, args=(cfg.tp, _free_port(), cfg, out_dir, setup), nprocs=cfg.tp, start_method="spawn"
            )
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(cfg.tp)]
    return merge(cfg, per_rank, time.perf_counter() - t0)


def merge(cfg: Config, per_rank: list[dict], seconds: float) -> dict:
    """Rank 0's rows, each ok only if it was ok on every rank, times the slowest rank's
    (a collective finishes with its slowest member)."""
    rows = []
    for i, row in enumerate(per_rank[0]["rows"]):
        others = [p["rows"][i] for p in per_rank]
        merged = dict(row)
        merged["ok"] = all(o["ok"] for o in others)
        merged["differed"] = [line for o in others for line in o["differed"]]
        merged["disabled"] = list(dict.fromkeys(p for o in others for p in o["disabled"]))
        steps = [o["q_steps"] for o in others if o["q_steps"] is not None]
        merged["q_steps"] = max(steps) if steps else None
        for key in ("us_fused", "us_unfused", "us_floor"):
            if key in row:
                merged[key] = max(o[key] for o in others)
        if "us_fused" in merged:
            merged["us_saved"] = merged["us_unfused"] - merged["us_fused"]
        rows.append(merged)
    costs = [p["check_cost"] for p in per_rank if p["check_cost"]]
    return {
        "machine": machine_info(cfg),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sites"},
        "sites": {h: [dataclasses.asdict(s) for s in sites] for h, sites in cfg.sites.items()},
        "quant_dtype": per_rank[0]["quant_dtype"],
        "rows": rows,
        "per_step": per_step(rows),
        "check_cost": max(costs, key=lambda c: c["seconds"]) if costs else None,
        "ok": all(r["ok"] for r in rows),
        "seconds": seconds,
    }


def per_step(rows: list[dict]) -> list[dict]:
    """Per hidden and token count, with a model's site counts: the time one forward's
    sites take fused and unfused, and the difference (a decode step at that batch)."""
    out = []
    keys = sorted({(r["hidden"], r["tokens"]) for r in rows if r.get("count") and "us_fused" in r})
    for hidden, tokens in keys:
        rs = [r for r in rows if r["hidden"] == hidden and r["tokens"] == tokens and r.get("count")]
        fused = sum(r["count"] * r["us_fused"] for r in rs)
        unfused = sum(r["count"] * r["us_unfused"] for r in rs)
        out.append(
            {
                "hidden": hidden,
                "tokens": tokens,
                "sites": sum(r["count"] for r in rs),
                "us_fused": fused,
                "us_unfused": unfused,
                "us_saved": unfused - fused,
            }
        )
    return out


def machine_info(cfg: Config) -> dict:
    import torch

    from .. import __version__

    info: dict[str, object] = {
        "vllm-rocm-fused": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": cfg.device,
        "tp": cfg.tp,
    }
    if cfg.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["runtime"] = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


# --- output ------------------------------------------------------------------------


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(report: dict) -> str:
    """The markdown table (also what is printed)."""
    m, c = report["machine"], report["config"]
    where = m.get("gpu") or m.get("cpu")
    lines = [
        f"# vllm-rocm-fused selftest: {where}, TP={c['tp']}",
        "",
        f"vllm-rocm-fused {m['vllm-rocm-fused']}, torch {m['torch']}"
        + (f", {m['runtime']}" if "runtime" in m else "")
        + f"; {c['scale_layout']}-major scales, {report['quant_dtype']}"
        + (f"; model {c['model']}" if c.get("model") else ""),
        "",
    ]
    lines += [f"- {note}" for note in c.get("notes", [])]
    timed = any("us_fused" in r for r in report["rows"])
    head = "| hidden | site | T | path | max err (fp8 steps) | check |"
    rule = "|---:|---|---:|---|---:|---|"
    if timed:
        head += " us fused | us unfused | us saved | us floor |"
        rule += "---:|---:|---:|---:|"
    lines += ["", head, rule]
    for r in report["rows"]:
        steps = "-" if r["q_steps"] is None else f"{r['q_steps']:.2f}"
        path = " -> ".join([*(f"{p} (disabled)" for p in r.get("disabled", [])), f"{r['backend']}/{r['path']}"])
        line = f"| {r['hidden']} | {r['site']} | {r['tokens']} | {path} | {steps} | {'ok' if r['ok'] else 'DIFFERS'} |"
        if timed:
            line += f" {_us(r.get('us_fused'))} | {_us(r.get('us_unfused'))} | {_us(r.get('us_saved'))} | {_us(r.get('us_floor'))} |"
        lines.append(line)
    if report["per_step"]:
        lines += ["", "Per decode step (one forward, the model's sites):", ""]
        lines += ["| hidden | T | sites | us fused | us unfused | us saved |", "|---:|---:|---:|---:|---:|---:|"]
        for s in report["per_step"]:
            lines.append(
                f"| {s['hidden']} | {s['tokens']} | {s['sites']} | {s['us_fused']:.1f} | {s['us_unfused']:.1f} | {s['us_saved']:.1f} |"
            )
    cost = report.get("check_cost")
    if cost:
        lines += [
            "",
            f"Startup self-check as a server runs it (max_num_batched_tokens={cost['max_tokens']}): "
            f"{cost['sites']} sites x {cost['sizes']} token counts in {cost['seconds']:.2f} s"
            + (f", {cost['differed']} differed" if cost["differed"] else ""),
        ]
    differed = [line for r in report["rows"] for line in r["differed"]]
    lines += ["", "Result: " + ("every checked path matches the spec" if report["ok"] else "MISMATCH")]
    lines += [f"- {line}" for line in dict.fromkeys(differed)]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"selftest_{report['config']['device']}_tp{report['config']['tp']}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render(report))
    return json_path, md_path


# --- the command ----------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a local checkpoint folder or its config.json (the sites come from it)")
    what.add_argument("--hidden", type=positive_int, nargs="+", help="hidden sizes (every site kind each)")
    p.add_argument(
        "--tp", type=positive_int, default=None, help="ranks, one per GPU (default: every visible GPU; 1 on a CPU)"
    )
    p.add_argument(
        "--tokens",
        type=positive_int,
        nargs="+",
        default=None,
        help=f"token counts (default: {' '.join(map(str, DEFAULT_TOKENS_GPU))} on GPUs, "
        f"{' '.join(map(str, DEFAULT_TOKENS_CPU))} on the CPU)",
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: GPUs when visible")
    p.add_argument(
        "--scale-layout",
        choices=("row", "col"),
        default=None,
        help="the scale layout the consumer GEMM reads (default: col on NVIDIA, CUTLASS's; row elsewhere)",
    )
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="ops per timed graph (GPU 16) / per timing (CPU 3)"
    )
    p.add_argument("--no-timing", action="store_true", help="check only")
    p.add_argument(
        "--check-up-to",
        type=positive_int,
        default=None,
        metavar="N",
        help="also time the startup self-check of a server with max_num_batched_tokens=N",
    )
    p.add_argument("--out", default="selftest-results", help="folder for the JSON and markdown (default: %(default)s)")


def build_config(args: argparse.Namespace) -> Config:
    import torch

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU visible to torch")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    tp = args.tp or (gpus if device == "cuda" else 1)
    if device == "cuda" and tp > gpus:
        raise ValueError(f"--tp {tp}: only {gpus} GPU(s) visible")
    notes = []
    if args.model:
        hidden, sites, desc = sites_from_config(read_config(args.model), tp)
        hiddens, by_hidden = [hidden], {hidden: sites}
        notes.append(f"model: {desc}; sites per forward: " + ", ".join(f"{s.label} x{s.count}" for s in sites))
    else:
        hiddens = list(dict.fromkeys(args.hidden))
        by_hidden = {h: sites_for_hidden(tp) for h in hiddens}
    bad = [h for h in hiddens if h % 128]
    if bad:
        raise ValueError(f"hidden size {bad[0]} is not a multiple of the 128-wide quant group")
    cpu = device == "cpu"
    layout = args.scale_layout or ("col" if device == "cuda" and torch.version.hip is None else "row")
    unfused = "torch ops" if cpu else "this package's Triton kernels"
    notes.append(
        f"unfused chain: {'the all-reduce, then ' if tp > 1 else ''}add + RMSNorm, then group quant ({unfused}); "
        + ("times are eager (CPU)" if cpu else "times are CUDA-graph replays, per op")
    )
    return Config(
        hiddens=hiddens,
        sites=by_hidden,
        tp=tp,
        tokens=list(dict.fromkeys(args.tokens or (DEFAULT_TOKENS_CPU if cpu else DEFAULT_TOKENS_GPU))),
        device=device,
        scale_layout=layout,
        repeats=args.repeats or (3 if cpu else 16),
        replays=3 if cpu else 20,
        check_up_to=args.check_up_to,
        model=args.model,
        time_ops=not args.no_timing,
        notes=notes,
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
    except ValueError as e:
        print(f"selftest: error: {e}", file=sys.stderr)
        return 2
    print(
        f"selftest: {cfg.tp} rank(s) on {cfg.device}, hidden {', '.join(map(str, cfg.hiddens))}, "
        f"{sum(len(s) for s in cfg.sites.values())} site(s) x {len(cfg.tokens)} token count(s)",
        flush=True,
    )
    report = run_selftest(cfg)
    json_path, md_path = write(report, Path(args.out))
    print(render(report))
    print(f"selftest: wrote {md_path} and {json_path} ({report['seconds']:.1f} s)")
    return 0 if report["ok"] else 1
