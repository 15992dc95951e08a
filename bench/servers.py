"""Start and stop the OpenAI-compatible servers the benchmarks compare, as child processes.

Each server gets the same model file and thread count; `Server` is a context manager that waits
for readiness, reports the child's resident memory, and always stops the child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["Server", "free_port", "kvfork_server", "llama_server", "llama_cpp_python_server", "rss_bytes"]

LLAMA_SERVER = Path(__file__).resolve().parent / "peers" / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of a Linux process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


@dataclass
class Server:
    """A server child process on 127.0.0.1:port, ready once `ready_path` answers 200."""

    name: str
    argv: list[str]
    port: int
    ready_path: str = "/v1/models"
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Server:
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        finally:
            if self.log:  # NOTE: the child holds its own copy of the descriptor
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (log: {self.log})")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"{self.name} was not ready in 300 s (log: {self.log})")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def memory(self) -> tuple[int, int]:
        assert self.proc is not None
        return rss_bytes(self.proc.pid)


def kvfork_server(model: str, threads: int, n_ctx: int, *, extra: list[str] | None = None,
                  log: Path | None = None) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "kvfork", "serve", "--model", model, "--port", str(port),
            "--threads", str(threads), "--n-ctx", str(n_ctx), "--model-name", "model", *(extra or [])]
    return Server("kvfork serve", argv, port, log=log)


def llama_server(model_path: Path, threads: int, slots: int, ctx_per_slot: int, *,
                 extra: list[str] | None = None, log: Path | None = None) -> Server:
    """llama.cpp's server with its defaults (f16 cache, flash attention auto, prompt cache + cache-ram on)."""
    if not LLAMA_SERVER.exists():
        raise FileNotFoundError(f"{LLAMA_SERVER} is missing: run `python bench/build_llama_server.py`")
    port = free_port()
    argv = [str(LLAMA_SERVER), "-m", str(model_path), "--port", str(port), "--host", "127.0.0.1",
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
            "--alias", "model", "--no-webui", *(extra or [])]
    return Server(f"llama-server -np {slots}", argv, port, ready_path="/health", log=log)


def llama_cpp_python_server(model_path: Path, threads: int, n_ctx: int, *, log: Path | None = None) -> Server:
    """llama-cpp-python's own server (`llama_cpp.server`) with its RAM prompt cache on."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
            "--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(n_ctx), "--cache", "true", "--model_alias", "model"]
    return Server("llama-cpp-python server", argv, port, log=log)
