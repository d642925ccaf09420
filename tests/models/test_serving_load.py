"""`vllm serve` with the plugin under load: 64 concurrent requests of mixed
lengths all complete, with the greedy outputs each gives when sent alone, and
the server stays healthy."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.markers import requires_vllm

pytestmark = [requires_vllm, pytest.mark.slow]


def _requests(n=64, seed=7):
    rng = random.Random(seed)
    return [([rng.randrange(16, 4096) for _ in range(rng.randint(3, 120))], rng.randint(4, 24)) for _ in range(n)]


def test_64_concurrent_requests_match_one_by_one(tiny_models, tmp_path):
    from vllm_rocm_fused.serving import VllmServer, http_json

    requests = _requests()
    with VllmServer(
        tiny_models("dense-fp8"), tp=2, max_num_seqs=64, max_model_len=512, log_path=tmp_path / "serve.log"
    ) as server:

        def send(req):
            prompt, max_tokens = req
            reply = server.completion(
                prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, return_token_ids=True
            )
            choice = reply["choices"][0]
            return choice.get("token_ids") or choice["text"], choice["finish_reason"]

        with ThreadPoolExecutor(max_workers=64) as pool:
            together = list(pool.map(send, requests))
        alone = [send(req) for req in requests]
        http_json(server.url + "/health", timeout=30)  # raises unless 200
        assert server.alive()
        assert send(requests[0]) == alone[0]  # still serving, same answer
        fused_lines = server.log_lines("vllm-rocm-fused: fused sites")
    assert len(together) == len(alone) == 64
    assert all(reason == "length" for _, reason in together)
    mismatched = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    assert not mismatched, f"{len(mismatched)} of 64 differ when batched: {mismatched}"
    assert fused_lines, "the plugin's startup report is missing from the server log"
