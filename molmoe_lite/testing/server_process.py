"""A ``molmoe-lite serve`` process on a loopback port, for tests and benchmarks.

``ServerProcess.start(model_dir, *extra_args)`` picks a free port on 127.0.0.1, starts
the CLI in a child process (its output goes to a log file, so no pipe fills up) and
``wait_ready`` polls ``/health`` until the model is loaded, with a deadline, failing with
the server's log if the process dies first. ``image_data_url`` turns a PIL image into the
``data:image/png;base64,...`` URL that OpenAI's clients send.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_data_url(image: Any, format: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, model_dir: str | Path, *args: str, device: str | None = "cpu", dtype: str | None = "float32",
              log_dir: str | Path | None = None, env: dict[str, str] | None = None) -> "ServerProcess":
        """Start serving ``model_dir`` (on the CPU in float32 unless told otherwise; None: the CLI's default)."""
        port = free_port()
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="molmoe-serve-"))
        log_path = log_dir / f"server-{port}.log"
        cmd = [sys.executable, "-m", "molmoe_lite.cli", "serve", str(model_dir), "--port", str(port), *args]
        cmd += (["--device", device] if device else []) + (["--dtype", dtype] if dtype else [])
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        return cls(proc, port, log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health()[0] == 200:
                    return self
            except (OSError, ValueError):  # not listening yet
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server was not ready within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait for it to exit; kill it if it does not. Its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
