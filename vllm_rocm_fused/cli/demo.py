"""``vllm-rocm-fused demo``: serve a tiny Qwen3.5 FP8 model with the plugin at TP=2
on this machine and show what happens.

1. build (or reuse, from the cache folder) a tiny checkpoint of ``--preset``;
2. start ``vllm serve`` on it (``serving.VllmServer``: own process group, the CPU
   thread binding and memory settings, a free port, a log file), wait for /health;
3. send chat and completion requests (greedy) and print the replies;
4. stop the server (also on Ctrl-C, SIGTERM, or a failed start: then with the
   log's tail and a non-zero exit), and print the plugin's lines from the
   server log: what it registered and which path each fused site took.

The default model (``trained-dense-fp8``) was trained on tiny-gsm8k, so the demo asks
it questions of that task it has never seen (the test split), as a chat and as
lm-eval's 5-shot GSM8K prompt, and prints each reply next to the expected answer: a
right answer is the proof that the fused path computes what the model needs. Exit
status 1 if a trained model answers one wrong. A random-weight preset
(``--preset dense-fp8``, ...) shows the serving path only: its replies are gibberish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import non_negative_int, positive_float, positive_int

PLUGIN_TAG = "vllm-rocm-fused:"
DEFAULT_PRESET = "trained-dense-fp8"
FEWSHOT = 5  # shots in a completion prompt, as lm-eval's gsm8k task sends


@dataclass(frozen=True)
class Question:
    """One demo request: a tiny-gsm8k test question, how it is asked, what must come back."""

    kind: str  # "chat" or "completion"
    question: str
    prompt: str  # the chat message, or the whole 5-shot completion prompt
    expected: int  # the number after "####"


def demo_questions(count: int) -> list[Question]:
    """``count`` test questions of tiny-gsm8k (data seed 0, which the trained models
    never trained on), alternating chat and 5-shot completion."""
    from ..tiny_models import tiny_gsm8k

    train, test = tiny_gsm8k.split(tiny_gsm8k.DEFAULT_SEED)
    out = []
    for i in range(count):
        item = test[i % len(test)]
        expected = tiny_gsm8k.final_answer(item["answer"])
        if i % 2 == 0:
            out.append(Question("chat", item["question"], item["question"], expected))
        else:
            shots = train[FEWSHOT * i : FEWSHOT * (i + 1)]
            out.append(
                Question("completion", item["question"], tiny_gsm8k.fewshot_prompt(item["question"], shots), expected)
            )
    return out


def reply_answer(text: str) -> int | None:
    """The number after the first ``####`` in a reply (lm-eval's strict-match), or None."""
    m = re.search(r"#### (-?[0-9.,]+)", text)
    if m is None:
        return None
    try:
        return int(m.group(1).replace(",", "").rstrip("."))
    except ValueError:
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"tiny model to serve (default {DEFAULT_PRESET}, trained; see `vllm-rocm-fused tiny-model --list`)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="weights seed (default 0)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset key, as for tiny-model (e.g. num_hidden_layers=4)",
    )
    p.add_argument("--tp", type=positive_int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--max-tokens", type=positive_int, default=96, help="tokens per reply at most (default 96)")
    p.add_argument(
        "--requests",
        type=positive_int,
        default=4,
        help="how many requests, alternating chat and completion (default 4)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM torch.compile the model (default: --enforce-eager, faster to start)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="where built models and server logs go (default: VLLM_ROCM_FUSED_CACHE_DIR)"
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the model even if the cached one is current")
    p.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=900.0,
        help="seconds to wait for the server to be healthy (default 900)",
    )
    p.add_argument(
        "--serve-arg",
        dest="serve_args",
        action="append",
        default=[],
        metavar="ARG",
        help="one more `vllm serve` argument (repeatable; e.g. --serve-arg=--max-num-seqs=8)",
    )


def _say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def model_folder(cache_dir: Path, preset: str, seed: int, overrides: dict[str, Any]) -> Path:
    name = f"{preset}-seed{seed}"
    if overrides:
        name += "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / "models" / name


def ensure_model(cache_dir: Path, preset: str, seed: int, overrides: dict[str, Any], rebuild: bool) -> Path:
    from ..tiny_models import build_tiny_model, is_current

    folder = model_folder(cache_dir, preset, seed, overrides)
    if not rebuild and is_current(folder, preset, seed, overrides):
        _say(f"reusing {folder}")
        return folder
    _say(f"building tiny model {preset!r} (seed {seed}) in {folder}")
    t0 = time.monotonic()
    build_tiny_model(preset, folder, seed=seed, overrides=overrides, progress=lambda m: _say("  " + m))
    _say(f"built in {time.monotonic() - t0:.1f} s")
    return folder


# --- the plugin's lines in the server log ---------------------------------------------

# vLLM prefixes each process's log lines with "(<Process> pid=<n>) <LEVEL> <date> <time> [file:line] ".
_LINE = re.compile(r"^\((?P<proc>[^)]*?)\s+pid=(?P<pid>\d+)\)\s+\S+\s+\S+\s+\S+\s+\[[^\]]*\]\s+")
_RANK = re.compile(r"\brank (\d+)\b")


def plugin_report(lines: list[str]) -> list[str]:
    """The plugin's log lines, once each: identical messages from several processes
    are shown once with how many processes logged them; messages that differ only
    in "rank N" are merged into one with the ranks listed."""
    groups: dict[str, dict[str, Any]] = {}
    for line in lines:
        at = line.find(PLUGIN_TAG)
        if at < 0:
            continue
        m = _LINE.match(line)
        pid = m.group("pid") if m else None
        message = line[at:].strip()
        ranks = _RANK.findall(message)
        key = _RANK.sub("rank {ranks}", message) if len(ranks) == 1 else message
        g = groups.setdefault(key, {"pids": set(), "ranks": set(), "order": len(groups)})
        if pid:
            g["pids"].add(pid)
        g["ranks"].update(ranks if len(ranks) == 1 else [])
    out = []
    for key, g in sorted(groups.items(), key=lambda kv: kv[1]["order"]):
        text = key.replace("{ranks}", ",".join(sorted(g["ranks"], key=int))) if g["ranks"] else key
        n = len(g["pids"])
        out.append(f"{text}" + (f"   [{n} processes]" if n > 1 else ""))
    return out


# --- requests ----------------------------------------------------------------------------


def _show(q: Question, reply: dict[str, Any], seconds: float) -> bool:
    """Print one exchange; True if the reply's final answer is the expected one."""
    choice = reply["choices"][0]
    text = choice["message"]["content"] if q.kind == "chat" else choice["text"]
    usage = reply.get("usage") or {}
    got = reply_answer(text)
    shots = f" (after {FEWSHOT} solved examples)" if q.kind == "completion" else ""
    print(f"\n[{q.kind}] {q.question}{shots}", flush=True)
    print("  -> " + text.strip().replace("\n", "\n     "))
    verdict = "right" if got == q.expected else "WRONG"
    print(
        f"     expected #### {q.expected}: {verdict} ({usage.get('completion_tokens', '?')} tokens, "
        f"finish: {choice.get('finish_reason')}, {seconds:.1f} s)",
        flush=True,
    )
    return got == q.expected


def send_requests(server, count: int, max_tokens: int) -> int:
    """Ask ``count`` questions (greedy); return how many were answered right."""
    right = 0
    for q in demo_questions(count):
        t0 = time.monotonic()
        if q.kind == "chat":
            reply = server.chat([{"role": "user", "content": q.prompt}], max_tokens=max_tokens, temperature=0)
        else:
            reply = server.completion(q.prompt, max_tokens=max_tokens, temperature=0, stop=["Question:"])
        right += _show(q, reply, time.monotonic() - t0)
    return right


def _raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def recipe_tp_problem(recipe, tp: int) -> str | None:
    """Why the recipe's model cannot be served at TP=``tp`` (the builder's partition
    checks for that size: heads, and FP8 blocks in every shard), or None."""
    from dataclasses import replace

    from ..tiny_models.recipe import check

    problems = check(replace(recipe, builder={**recipe.builder, "tp_sizes": [tp]}))
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"--tp {tp}: {recipe.name} cannot be split across {tp} ranks: {problems[0]}{more}"


def run(args: argparse.Namespace) -> int:
    from .. import envs
    from ..serving import ServerError, VllmServer
    from ..tiny_models import PresetError, parse_overrides, resolve, serve_args

    _raise_on_sigterm()
    cache_dir = Path(args.cache_dir or envs.cache_dir()).expanduser()
    # Everything that can be checked is checked before building or starting anything.
    try:
        overrides = parse_overrides(args.overrides)
        recipe = resolve(args.preset, overrides)
    except PresetError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    problem = (
        recipe_tp_problem(recipe, args.tp)
        or (
            f"--cache-dir {cache_dir}: exists and is not a folder"
            if cache_dir.exists() and not cache_dir.is_dir()
            else None
        )
        or next((f"invalid setting {p}" for p in VllmServer.settings_problems()), None)
    )
    if problem:
        print(f"demo: error: {problem}", file=sys.stderr)
        return 2
    trained = recipe.trained is not None
    try:
        folder = ensure_model(cache_dir, args.preset, args.seed, overrides, args.rebuild)
    except (PresetError, FileNotFoundError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2

    log_path = cache_dir / "logs" / f"demo-{folder.name}-tp{args.tp}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    # The server says when it stops (also on Ctrl-C: stopping takes up to half a minute).
    server = VllmServer(
        folder,
        tp=args.tp,
        extra_args=serve_args(folder) + list(args.serve_args),
        log_path=log_path,
        served_model_name=f"tiny-{args.preset}",
        enforce_eager=not args.compile,
        startup_timeout_s=args.startup_timeout,
        progress=_say,
    )
    mode = "torch.compile" if args.compile else "eager"
    _say(f"starting vllm serve (TP={args.tp}, {mode}, log: {log_path})")
    t0 = time.monotonic()
    exit_code = 0
    try:
        with server:
            _say(
                f"server healthy at {server.url} after {time.monotonic() - t0:.0f} s; asking "
                f"{args.requests} tiny-gsm8k test questions (greedy, up to {args.max_tokens} tokens)"
                + ("" if trained else "; the weights are random, so expect gibberish")
            )
            right = send_requests(server, args.requests, args.max_tokens)
            print(flush=True)
            _say(
                f"{right}/{args.requests} answers right"
                + ("" if trained else " (random weights: not expected to be right)")
            )
            if trained and right < args.requests:
                print(
                    f"demo: error: the trained model answered {args.requests - right} of {args.requests} "
                    "questions wrong",
                    file=sys.stderr,
                    flush=True,
                )
                exit_code = 1
    except ServerError as e:
        print(f"demo: error: {e}", file=sys.stderr, flush=True)
        exit_code = 1
    _say(f"server stopped (exit code {server.proc.returncode if server.proc else 'n/a'})")

    report = plugin_report(server.log_lines(PLUGIN_TAG))
    if report:
        print("\nplugin report (the server log's vllm-rocm-fused lines; one line per message):", flush=True)
        for line in report:
            print(f"  {line}")
    elif exit_code == 0:
        print(
            f"\ndemo: no {PLUGIN_TAG!r} lines in the server log: the plugin did not load "
            "(is VLLM_PLUGINS excluding it?)",
            flush=True,
        )
    return exit_code
