"""Starting ``python -m tokenpacker_jax.serve`` as a process and waiting until it answers
(the load benchmark and the tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import IO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, deadline_s: float, process: subprocess.Popen | None = None,
                 poll_s: float = 0.2) -> None:
    """Polls ``url`` until it answers 200; raises when ``process`` exits first or the
    deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it "
                               f"answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(poll_s)
    raise TimeoutError(f"{url} did not answer within {deadline_s} s")


def start_server(flags: Sequence[str], log: IO, deadline_s: float = 600
                 ) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server started with ``flags`` (a free port is added),
    once its health endpoint answers; its output goes to ``log``."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tokenpacker_jax.serve", *flags,
                                f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", deadline_s, process)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return process, url
