"""Data, a fake ``vllm serve`` and log lines for the GSM8K-check tests (fixtures
in ``conftest.py``).

The fake is an OpenAI-compatible HTTP server whose answers, greedy token ids and
plugin log lines a test chooses, so the whole ``run_gsm8k`` pipeline (lm-eval
included, scoring the fake's answers with its own filters) runs in seconds; the
real vLLM run is the slow end-to-end test.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"

# (question, first operand, second operand): test questions ask "a plus b".
MINI_TEST = [
    (f"Sam has {a} apples and buys {b} more. How many apples does Sam have now?", a, b)
    for a, b in ((3, 4), (12, 30), (7, 8), (100, 23), (5, 5), (41, 1))
]
MINI_TRAIN = [
    (f"A box holds {a} pens and {b} pencils. How many items are in the box?", a, b)
    for a, b in ((2, 2), (6, 1), (10, 20), (9, 9), (14, 3), (1, 50))
]


def row(question: str, a: int, b: int) -> dict:
    return {"question": question, "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}


# --- the fake server ---------------------------------------------------------------------

BASELINE_LOG = [
    "(APIServer pid=11) INFO 01-01 00:00:00 [log.py:27] vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing",
    "(EngineCore pid=12) INFO 01-01 00:00:01 [log.py:27] vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing",
    "(Worker_TP0 pid=13) INFO 01-01 00:00:02 [log.py:27] vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing",
]
FUSED_LOG = [
    "(APIServer pid=21) INFO 01-01 00:00:00 [log.py:27] vllm-rocm-fused: registered the fused op",
    "(EngineCore pid=22) INFO 01-01 00:00:01 [log.py:27] vllm-rocm-fused: registered the fused op",
    "(Worker_TP0 pid=23) INFO 01-01 00:00:02 [log.py:27] vllm-rocm-fused: fused sites (Qwen3_5ForCausalLM, TP=2, rank 0): attention input x2: AR fused 2/2",
    "(Worker_TP1 pid=24) INFO 01-01 00:00:02 [log.py:27] vllm-rocm-fused: fused sites (Qwen3_5ForCausalLM, TP=2, rank 1): attention input x2: AR fused 2/2",
    "(Worker_TP0 pid=23) INFO 01-01 00:00:03 [log.py:27] vllm-rocm-fused: site attn_input ran generic via backend native (first such call: 7 tokens)",
    "(Worker_TP1 pid=24) INFO 01-01 00:00:03 [log.py:27] vllm-rocm-fused: site attn_input ran generic via backend native (first such call: 7 tokens)",
]


class FakeBrain:
    """What one fake server answers.

    ``wrong``: test questions (indices into MINI_TEST) answered with sum + 1.
    ``diverge_at``: parity completions differ from the reference sequence from
    this token on (None: never)."""

    def __init__(self, tokenizer_dir: Path, wrong: set[int] = frozenset(), diverge_at: int | None = None):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.wrong = set(wrong)
        self.diverge_at = diverge_at
        self.requests = 0

    def answer(self, prompt_text: str) -> str:
        question = prompt_text.rsplit("Question: ", 1)[-1].split("\nAnswer:", 1)[0]
        for i, (q, a, b) in enumerate(MINI_TEST):
            if q == question:
                s = a + b + (1 if i in self.wrong else 0)
                return f" {a} + {b} = {s}.\n#### {s}"
        return " I do not know."

    def tokens(self, prompt_text: str, n: int) -> list[int]:
        seed = int(hashlib.sha256(prompt_text.encode()).hexdigest()[:8], 16)
        ids = [(seed + 7919 * i) % 390 for i in range(n)]
        if self.diverge_at is not None and self.diverge_at < n:
            ids[self.diverge_at] = (ids[self.diverge_at] + 1) % 390
        return ids

    def complete(self, body: dict) -> dict:
        self.requests += 1
        prompts = body["prompt"]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        choices = []
        for i, p in enumerate(prompts):
            text = p if isinstance(p, str) else self.tok.decode(p)
            if body.get("return_token_ids"):
                ids = self.tokens(text, int(body["max_tokens"]))
                choices.append(
                    {
                        "index": i,
                        "text": self.tok.decode(ids),
                        "finish_reason": "length",
                        "token_ids": ids,
                        "logprobs": {
                            "top_logprobs": [{f"token_id:{t}": -0.5, f"token_id:{(t + 1) % 390}": -0.9} for t in ids]
                        },
                    }
                )
            else:
                choices.append({"index": i, "text": self.answer(text), "finish_reason": "stop"})
        return {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"), "choices": choices}


class FakeVllmServer:
    """Context manager with ``.url``, like ``serving.VllmServer``, serving ``brain``
    and writing ``log_lines`` to ``log_path``."""

    def __init__(self, brain: FakeBrain, log_path: Path, log_lines: list[str], served_name: str = "fake-model"):
        self.brain, self.log_path, self.log_lines, self.served_name = brain, Path(log_path), log_lines, served_name
        self.httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        brain, served = self.brain, self.served_name

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": served, "max_model_len": 4096}]})
                else:
                    self._send(404, {"error": self.path})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    self._send(404, {"error": self.path})
                elif body.get("model") != served:
                    self._send(404, {"error": f"model {body.get('model')!r} does not exist"})
                else:
                    self._send(200, brain.complete(body))

        self.log_path.write_text("\n".join(["INFO starting fake server", *self.log_lines]) + "\n")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
