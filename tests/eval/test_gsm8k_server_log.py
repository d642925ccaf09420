"""The plugin's lines in a vllm serve log."""

from __future__ import annotations

from vllm_rocm_fused.eval.server_log import plugin_lines, read_plugin_report

LOG = """\
INFO 11-29 23:09:00 [api_server.py:1] vLLM API server version 0.32.0
(EngineCore pid=18479) INFO 11-29 23:09:31 [log.py:27] vllm-rocm-fused: registered the fused op for Qwen3_5ForCausalLM
(VllmWorker-1 pid=18664) INFO 11-29 23:10:16 [log.py:27] vllm-rocm-fused: registered the fused op for Qwen3_5ForCausalLM
\x1b[1;36m(Worker_TP1 pid=18664)\x1b[0;0m INFO 11-29 23:10:20 [log.py:27] vllm-rocm-fused: fused sites (Qwen3_5ForCausalLM, TP=2, rank 1): GDN input x6: AR fused 5/6
(Worker_TP0 pid=18663) INFO 11-29 23:10:20 [log.py:27] vllm-rocm-fused: fused sites (Qwen3_5ForCausalLM, TP=2, rank 0): GDN input x6: AR fused 5/6
(Worker_TP0 pid=18663) INFO 11-29 23:10:21 [log.py:27] vllm-rocm-fused: site gdn_input ran generic via backend native (first such call: 4096 tokens)
(Worker_TP1 pid=18664) INFO 11-29 23:10:21 [log.py:27] vllm-rocm-fused: site gdn_input ran generic via backend native (first such call: 4096 tokens)
INFO:     127.0.0.1:59084 - "GET /health HTTP/1.1" 200 OK
"""


def test_lines_deduplicated_in_order_without_prefixes():
    lines = plugin_lines(LOG)
    assert lines == [
        "vllm-rocm-fused: registered the fused op for Qwen3_5ForCausalLM",
        "vllm-rocm-fused: fused sites (Qwen3_5ForCausalLM, TP=2, rank 1): GDN input x6: AR fused 5/6",
        "vllm-rocm-fused: fused sites (Qwen3_5ForCausalLM, TP=2, rank 0): GDN input x6: AR fused 5/6",
        "vllm-rocm-fused: site gdn_input ran generic via backend native (first such call: 4096 tokens)",
    ]


def test_fused_report(tmp_path):
    (tmp_path / "server.log").write_text(LOG)
    r = read_plugin_report(tmp_path / "server.log")
    assert r.fused_active and not r.disabled
    assert len(r.fused_sites) == 2 and len(r.site_paths) == 1 and r.not_fused == []


def test_baseline_and_missing_log(tmp_path):
    (tmp_path / "server.log").write_text(
        "(APIServer pid=1) INFO [log.py:27] vllm-rocm-fused: VLLM_ROCM_FUSED_DISABLE=1, the plugin registers nothing\n"
    )
    r = read_plugin_report(tmp_path / "server.log")
    assert r.disabled and not r.fused_active
    missing = read_plugin_report(tmp_path / "nothing.log")
    assert missing.lines == [] and not missing.disabled and not missing.fused_active


def test_not_fused_model_is_not_active(tmp_path):
    (tmp_path / "server.log").write_text(
        "INFO vllm-rocm-fused: Qwen3_5ForCausalLM: not fused: tensor-parallel size 1 has no all-reduce\n"
    )
    r = read_plugin_report(tmp_path / "server.log")
    assert not r.fused_active and len(r.not_fused) == 1


def test_first_error_is_the_root_cause(tmp_path):
    from vllm_rocm_fused.eval.server_log import first_error

    log = tmp_path / "server.log"
    log.write_text(
        "(APIServer pid=1) WARNING 11-29 23:24:39 [system_utils.py:255] Found ulimit of 20000; this can cause "
        "`OSError: [Errno 24] Too many open files`\n"
        "(Worker_TP0 pid=3) ERROR 11-29 23:25:25 [multiproc_executor.py:953]     raise RuntimeError(\n"
        "(Worker_TP0 pid=3) ERROR 11-29 23:25:25 [multiproc_executor.py:953] RuntimeError: Cannot find any "
        "model weights with `/m`\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert first_error(log) == "RuntimeError: Cannot find any model weights with `/m`"
    log.write_text("INFO all good\n")
    assert first_error(log) is None
    assert first_error(tmp_path / "missing.log") is None
