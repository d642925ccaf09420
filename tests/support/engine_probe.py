"""Run a model in vLLM's offline engine in its own process and report, as JSON:
greedy outputs with top-1 logprobs, the plugin's fusion report and path
counters from every worker, and (optionally) the collectives of one forward.

    python -m support.engine_probe --model DIR --tp 2 --out result.json \
        [--prompts prompts.json] [--max-tokens 32] [--eager] [--count-collectives]

Run from tests/ (or with tests/ on PYTHONPATH). Environment variables (e.g.
VLLM_ROCM_FUSED_DISABLE=1) pass through to the engine.
"""

from __future__ import annotations

import argparse
import json
import os


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
    from vllm_rocm_fused import ops

    model = worker.model_runner.model
    report = getattr(model, "fusion_report", None)
    norms = {}
    for name, module in model.named_modules():
        if name.endswith(("input_layernorm", "post_attention_layernorm")) or name.endswith(".norm") \
                or name == "norm":
            norms[name] = type(module).__name__
    return {
        "model_class": type(model).__name__,
        "report": None if report is None else {
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
    ap.add_argument("--stop-token-ids", default=None,
                    help="JSON list of token ids that end a generation (default: none; EOS ignored)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--count-collectives", action="store_true")
    ap.add_argument("--skip-tokenizer", action="store_true", help="token-id prompts only (no tokenizer files)")
    ap.add_argument("--batched", action="store_true", help="submit all prompts at once (default: one by one)")
    ap.add_argument("--language-model-only", action="store_true", help="serve a VL checkpoint text-only")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with callables
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.load(open(args.prompts)) if args.prompts else default_prompts()
    llm = LLM(model=args.model, tensor_parallel_size=args.tp, enforce_eager=args.eager,
              max_model_len=args.max_model_len, max_num_seqs=32, dtype="bfloat16", seed=0,
              skip_tokenizer_init=args.skip_tokenizer,
              **({"language_model_only": True} if args.language_model_only else {}))
    result: dict = {"tp": args.tp, "eager": args.eager}

    if args.count_collectives:
        llm.collective_rpc(_install_counters)
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0])],
                     SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        result["one_forward"] = llm.collective_rpc(_read_counters)
        llm.collective_rpc(_install_counters)

    stop_ids = json.loads(args.stop_token_ids) if args.stop_token_ids else None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, logprobs=1, ignore_eos=stop_ids is None,
                            stop_token_ids=stop_ids, detokenize=False)
    if args.batched:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    else:
        # One prompt at a time: the batch composition of every step is then fixed, so two
        # engines compare on numerics alone (CPU GEMMs round differently with the batch
        # shape, and how requests join a batch depends on timing).
        outs = [llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0] for p in prompts]
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    result["logprobs"] = [[step[tok].logprob for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                          for o in outs]
    result["workers"] = llm.collective_rpc(_fusion_info)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
