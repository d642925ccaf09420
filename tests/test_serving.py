"""serving.VllmServer: environment, command, and the lifecycle (health wait,
failure with the log's tail, stopping the whole process group), the lifecycle
against small fake servers so it runs without vLLM."""

import sys
import textwrap
import time

import pytest

from support.processes import new_marker, processes_left, processes_with
from vllm_rocm_fused import serving
from vllm_rocm_fused.serving import ServerError, VllmServer, cpu_thread_binding

# A stand-in for `vllm serve`: answers /health after a delay, has a child process
# in its group, and behaves as MODE says ("ok", "exit", "hang", "stubborn").
FAKE = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys, threading, time
    mode, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    if mode == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("fake server: starting", flush=True)
    if mode == "exit":
        print("ValueError: the model is broken", flush=True)
        sys.exit(3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def do_POST(self):
            body = b'{"choices": [{"text": "hi", "finish_reason": "length"}]}'
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    time.sleep(delay)
    if mode != "hang":
        threading.Thread(target=http.server.HTTPServer(("127.0.0.1", port), H).serve_forever, daemon=True).start()
        print("fake server: healthy", flush=True)
    while True:
        time.sleep(0.1)
""")


class FakeServer(VllmServer):
    def __init__(self, mode, delay=0.5, **kw):
        super().__init__("/models/fake", **kw)
        self.mode, self.delay = mode, delay

    def command(self):
        return [sys.executable, "-c", FAKE, self.mode, str(self.port), str(self.delay)]


def test_thread_binding_splits_the_cores():
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(1, [0, 1]) == "0-1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4, 5, 6, 7]) == "0-3|4-7"
    assert cpu_thread_binding(2, [2, 3, 6, 7]) == "2-3|6-7"
    assert cpu_thread_binding(4, [0, 1]) == "0|1|0|1"
    assert cpu_thread_binding(2, [0, 1, 2]) == "0|1"
    with pytest.raises(ValueError):
        cpu_thread_binding(0)


def test_environment_and_command(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "vllm_rocm_fused")
    monkeypatch.setattr(serving, "usable_cpus", lambda: [0, 1])
    server = VllmServer(
        tmp_path / "model",
        tp=2,
        env={"VLLM_ROCM_FUSED_DISABLE": "1"},
        cpu=True,
        extra_args=["--language-model-only"],
        port=1234,
    )
    env = server.environment()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert env["VLLM_ROCM_FUSED_DISABLE"] == "1"
    assert env["VLLM_PLUGINS"] == "vllm_rocm_fused"  # passed through, never set by us
    cmd = server.command()
    assert cmd[1:4] == ["-m", "vllm_rocm_fused.cli.vllm_serve", str(tmp_path / "model")]
    for flag, value in (("--tensor-parallel-size", "2"), ("--port", "1234"), ("--served-model-name", "model")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" in cmd and "--kv-cache-memory-bytes" in cmd
    assert cmd[-1] == "--language-model-only"
    # the caller's own binding wins; no CPU settings for a GPU vLLM
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")
    assert server.environment()["VLLM_CPU_OMP_THREADS_BIND"] == "1|0"
    gpu = VllmServer("m", tp=2, cpu=False, enforce_eager=False, port=1)
    assert "--kv-cache-memory-bytes" not in gpu.command() and "--enforce-eager" not in gpu.command()


def test_healthy_server_serves_and_stops_with_its_group(tmp_path):
    marker = new_marker()
    messages = []
    with FakeServer("ok", delay=1.5, env=marker, log_path=tmp_path / "serve.log", progress=messages.append) as server:
        assert server.alive()
        assert len(processes_with(marker)) == 2  # the server and its child
        assert server.completion("x", max_tokens=1)["choices"][0]["text"] == "hi"
    assert processes_with(marker) == []
    assert not server.alive()
    assert "fake server: healthy" in (tmp_path / "serve.log").read_text()
    assert server.log_lines("fake server") == ["fake server: starting", "fake server: healthy"]


def test_server_that_exits_raises_with_the_log_tail(tmp_path):
    marker = new_marker()
    with pytest.raises(ServerError) as err:
        with FakeServer("exit", env=marker, log_path=tmp_path / "serve.log"):
            pytest.fail("must not get here")
    assert err.value.returncode == 3
    assert "exited with code 3 before it was ready" in str(err.value)
    assert "ValueError: the model is broken" in err.value.log_tail
    assert "--- last lines of the vllm serve log ---" in str(err.value)
    assert str(tmp_path / "serve.log") in str(err.value)
    assert processes_left(marker) == []  # its orphaned child was stopped too


def test_timeout_stops_the_server(tmp_path):
    marker = new_marker()
    with pytest.raises(ServerError, match="not healthy after 2 s"):
        with FakeServer("hang", env=marker, startup_timeout_s=2, log_path=tmp_path / "serve.log"):
            pass
    assert processes_with(marker) == []


def test_stubborn_server_is_killed(tmp_path):
    marker = new_marker()
    server = FakeServer("stubborn", env=marker, log_path=tmp_path / "serve.log")
    with server:
        pass
    assert processes_with(marker) == []
    assert server.proc.returncode == -9  # SIGINT and SIGTERM were ignored


def test_stop_is_idempotent_and_safe_before_start(tmp_path):
    server = FakeServer("ok", log_path=tmp_path / "serve.log")
    assert server.stop() is None
    with server:
        pass
    first = server.proc.returncode
    assert server.stop() == first


def test_interrupt_while_waiting_stops_the_server(tmp_path, monkeypatch):
    marker = new_marker()
    server = FakeServer("hang", env=marker, log_path=tmp_path / "serve.log")
    calls = {"n": 0}
    real_healthy = serving._healthy

    def interrupt_after_a_while(url):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_healthy(url)

    monkeypatch.setattr(serving, "_healthy", interrupt_after_a_while)
    with pytest.raises(KeyboardInterrupt):
        with server:
            pass
    assert processes_with(marker) == []


def test_stopping_says_each_signal_it_sends(tmp_path):
    marker = new_marker()
    messages = []
    with FakeServer("stubborn", env=marker, log_path=tmp_path / "serve.log", progress=messages.append):
        pass
    assert messages[0].startswith("stopping vllm serve (SIGINT to its processes; SIGTERM after ")
    assert messages[1:] == ["vllm serve still running: sending SIGTERM", "vllm serve still running: sending SIGKILL"]
    assert processes_with(marker) == []


def test_ctrl_c_while_stopping_takes_the_next_step_at_once(tmp_path):
    marker = new_marker()

    class Interrupted(FakeServer):
        # a Ctrl-C arrives during each wait for the group to empty (calls 2 and 4)
        calls = 0

        def alive(self):
            self.calls += 1
            if self.calls in (2, 4):
                raise KeyboardInterrupt
            return super().alive()

    server = Interrupted("stubborn", env=marker, log_path=tmp_path / "serve.log")
    server.start()
    server.wait_ready()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        server.stop(grace=(60.0, 60.0))
    assert time.monotonic() - t0 < 15  # not the 120 s of grace
    assert server.proc.returncode == -9
    assert processes_with(marker) == []


def test_invalid_plugin_setting_starts_nothing(tmp_path, monkeypatch):
    server = FakeServer("ok", env={"VLLM_ROCM_FUSED_MAX_TOKENS": "abc"}, log_path=tmp_path / "serve.log")
    with pytest.raises(ValueError, match="invalid plugin setting: VLLM_ROCM_FUSED_MAX_TOKENS='abc': not an integer"):
        server.start()
    assert server.proc is None
    monkeypatch.setenv("VLLM_ROCM_FUSED_BACKEND", "bogus")
    assert VllmServer.settings_problems() == [
        "VLLM_ROCM_FUSED_BACKEND='bogus': not a backend (one of auto, native, cuda, rocm)"
    ]
    assert VllmServer.settings_problems({"VLLM_ROCM_FUSED_BACKEND": "native"}) == []


def test_progress_shows_the_last_info_line_of_vllms_log(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text(
        "\n".join(
            [
                "(APIServer pid=1) INFO 12-01 23:41:36 [api_utils.py:347]  ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.32.0",
                "(APIServer pid=1) INFO 12-01 23:41:36 [api_utils.py:286] non-default args: {'model': 'm'}",
                "(APIServer pid=1) WARNING 12-01 23:41:36 [system_utils.py:255] Found ulimit of 20000 and failed to "
                "automatically increase with error current limit exceeds maximum limit.",
                "some line a library printed",
            ]
        )
        + "\n"
    )
    assert serving._last_log_message(str(log)) == "non-default args: {'model': 'm'}"
    with log.open("a") as f:
        f.write("(Worker_TP0 pid=2) INFO 12-01 23:42:52 [cpu_model_runner.py:68] Starting to load model m...\n")
    assert serving._last_log_message(str(log)) == "Starting to load model m..."
    with log.open("a") as f:
        f.write(
            "(EngineCore pid=3) INFO 12-01 23:42:20 [ompmultiprocessing.py:185] OpenMP thread binding info: \n"
            "(EngineCore pid=3) INFO 12-01 23:42:20 [ompmultiprocessing.py:185] \treserved_cpus=[]\n"
        )
    assert serving._last_log_message(str(log)) == "OpenMP thread binding info:"
    assert serving._last_log_message(str(tmp_path / "missing.log")) == ""


@pytest.fixture(autouse=True)
def short_grace(monkeypatch):
    # keep the SIGINT -> SIGTERM -> SIGKILL ladder quick for the fake servers
    monkeypatch.setattr(serving, "STOP_GRACE_S", (0.5, 0.5))
