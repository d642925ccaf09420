"""Run tiny models through vLLM's offline ``LLM`` API (the real loader, no dummy
weights) one after another in this process, and write what each produced.

    python tests/support/tiny_llm.py JOBS.json RESULTS.json [REFERENCES.json]

JOBS.json: [{"name", "model", "tp", "language_model_only": bool, "score": NAME | null,
"prompt": TEXT (optional, default PROMPT), "new_tokens": N (optional, default NEW_TOKENS)}, ...]
RESULTS.json (rewritten after every job): {NAME: {"prompt": [ids], "greedy": [ids],
"scored": {...} | null, "seconds": float} | {"error": "traceback"}}.

``greedy`` is a greedy continuation of the job's prompt (``PROMPT`` unless the job
gives one; ``NEW_TOKENS`` tokens unless it says otherwise; EOS ignored). With ``"score": OTHER`` the job also scores OTHER's greedy tokens (an
earlier job of this run, or an entry of REFERENCES.json) by teacher forcing:
``top1`` is this model's argmax at every position and ``rank`` the rank of
OTHER's token in this model's distribution (0 = its argmax, RANK_CAP = beyond).

All jobs of one run must have the same tp. TP=1 runs the engine in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the "uni" executor): same loader and model
code, no process spawns. TP>1 spawns the engine and its workers as ``vllm serve``
does, with ``VLLM_CPU_OMP_THREADS_BIND`` from ``serving.cpu_thread_binding``.
Started as a subprocess by the slow tests (vLLM needs a fresh interpreter and
this ``__main__`` guard).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does Tom have?"
NEW_TOKENS = 32
RANK_CAP = 20


def _run_job(job: dict, results: dict, references: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.monotonic()
    extra = {"language_model_only": True} if job.get("language_model_only") else {}
    if job["tp"] == 1:
        extra["distributed_executor_backend"] = "uni"
    llm = LLM(
        model=job["model"],
        tensor_parallel_size=job["tp"],
        max_model_len=1024,
        max_num_seqs=2,
        kv_cache_memory_bytes=64 * 2**20,
        enforce_eager=True,
        seed=0,
        **extra,
    )
    try:
        prompt = llm.get_tokenizer().encode(job.get("prompt", PROMPT))
        new_tokens = job.get("new_tokens", NEW_TOKENS)
        greedy = (
            llm.generate(
                [TokensPrompt(prompt_token_ids=prompt)],
                SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                use_tqdm=False,
            )[0]
            .outputs[0]
            .token_ids
        )
        scored = None
        if job.get("score"):
            ref = results.get(job["score"]) or references.get(job["score"])
            if not ref or "greedy" not in ref:
                raise RuntimeError(f"nothing to score: job {job['score']!r} has no result")
            if ref["prompt"] != prompt:
                raise RuntimeError("the reference was made from another prompt (tokenizers differ)")
            tokens = list(ref["greedy"])
            out = llm.generate(
                [TokensPrompt(prompt_token_ids=prompt + tokens)],
                SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=RANK_CAP),
                use_tqdm=False,
            )[0]
            top1, rank = [], []
            for tok, logprobs in zip(tokens, out.prompt_logprobs[len(prompt) :]):
                top1.append(next(k for k, v in logprobs.items() if v.rank == 1))
                rank.append(min(logprobs[tok].rank - 1, RANK_CAP) if tok in logprobs else RANK_CAP)
            scored = {"reference": job["score"], "tokens": tokens, "top1": top1, "rank": rank}
        return {"prompt": prompt, "greedy": list(greedy), "scored": scored, "seconds": time.monotonic() - t0}
    finally:
        del llm
        gc.collect()


def main(argv: list[str]) -> int:
    jobs = json.loads(Path(argv[0]).read_text())
    out_path = argv[1]
    references = json.loads(Path(argv[2]).read_text()) if len(argv) > 2 else {}
    tps = {job["tp"] for job in jobs}
    if len(tps) != 1:
        raise SystemExit(f"all jobs of a run need the same tp, got {sorted(tps)}")
    tp = tps.pop()
    if tp == 1:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    elif "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
        from vllm_rocm_fused.serving import cpu_thread_binding

        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tp)
    results: dict = {}
    for job in jobs:
        try:
            results[job["name"]] = _run_job(job, results, references)
        except Exception:  # noqa: BLE001 - recorded for the test to report
            results[job["name"]] = {"error": traceback.format_exc()}
        with open(out_path, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
