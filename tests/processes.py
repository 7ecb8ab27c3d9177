"""Start and stop the real processes the end-to-end tests talk to (nanio, Celery, uvicorn).

Every process runs in its own session (process group) so a test can SIGKILL a Celery worker
together with its prefork children, the way a machine dies, and so teardown never leaves
orphans. Output goes to a log file whose tail is attached to any start-up failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ManagedProcess:
    """A child process in its own process group, logging to `log_path`."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group (the worker and its pool children): a crash, not a shutdown."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after `timeout`."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Children may outlive a parent that exited on SIGTERM; the group kill reaps them.
        self._signal_group(signal.SIGKILL)
        if self.alive():
            self.popen.wait(timeout=10)


def start_process(
    name: str, argv: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path = REPO
) -> ManagedProcess:
    """Start `argv` in a new session with `env` added to the current environment."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return ManagedProcess(name, popen, log_path)


def wait_until(
    check: object, timeout: float, process: ManagedProcess | None = None, what: str = ""
) -> None:
    """Poll `check()` until it returns truthy; fail with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(
                f"{process.name} exited ({process.popen.returncode}) "
                f"while waiting for {what}:\n{process.log_tail()}"
            )
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.2)
    tail = process.log_tail() if process is not None else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def wait_for_log(process: ManagedProcess, text: str, timeout: float) -> None:
    """Wait until `text` appears in the process's log."""
    wait_until(lambda: text in process.log_tail(1_000_000), timeout, process, repr(text))


@dataclass
class NanioServer:
    """A running nanio S3 server and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    process: ManagedProcess


@contextmanager
def nanio_server(data_dir: Path, log_dir: Path, region: str = "us-east-1") -> Iterator[NanioServer]:
    """Run `nanio serve` on a free port with real SigV4 credentials."""
    port = free_port()
    access_key, secret_key = "tailortestkey", "tailor-test-secret-" + os.urandom(8).hex()
    process = start_process(
        "nanio",
        [
            str(BIN / "python"),
            "-m",
            "nanio",
            "serve",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--region",
            region,
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        {"NANIO_ACCESS_KEY": access_key, "NANIO_SECRET_KEY": secret_key},
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Unauthenticated requests get 403 once the server is up: any HTTP answer will do.
        wait_until(lambda: httpx.get(url, timeout=1).status_code, 30, process, "nanio")
        yield NanioServer(url, access_key, secret_key, region, process)
    finally:
        process.stop()
