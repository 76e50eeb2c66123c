"""Backend worker processes: one per (backend, spec), reused for the session.

Parent and worker talk JSON lines over a private pipe. The worker runs in its
own session (process group) so that a timeout kills it and every child it
spawned (torchrun, engine subprocesses); it also dies with its parent
(PR_SET_PDEATHSIG) and when its stdin closes, so nothing outlives a run.
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import WorkerError

REPO_ROOT = Path(__file__).resolve().parent.parent


def python_for(backend: str) -> str:
    """Interpreter for a backend: HARNESS_PYTHON_<BACKEND> lets a clashing backend live in its own venv."""
    return os.environ.get(f"HARNESS_PYTHON_{backend.upper()}", sys.executable)


class Worker:
    def __init__(self, backend: str, spec_path: str | None, python: str | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 300.0, device: str = "cpu"):
        self.backend = backend
        self.device = device  # "cpu" | "cuda": the backend computes there (Backend.start)
        self.python = python or python_for(backend)
        self._log = tempfile.NamedTemporaryFile(prefix=f"harness-{backend}-", suffix=".log", delete=False)
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [self.python, "-m", "harness.worker_main", backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True, env=child_env, cwd=str(REPO_ROOT),
        )
        _LIVE.add(self)
        self.started = time.monotonic()
        try:
            hello = self.call("__init__", {"spec_path": spec_path, "device": device}, timeout=start_timeout)
        except BaseException:
            self.close(grace=0)  # a worker that failed to start must not linger (holding memory, GPUs)
            raise
        self.versions: dict[str, str] = hello.get("versions", {})
        self.start_seconds = time.monotonic() - self.started

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 900.0) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.backend} worker is not running (exit {self.proc.returncode})", self.stderr_tail())
        try:
            self.proc.stdin.write((json.dumps({"op": op, "args": args or {}}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.kill()
            raise WorkerError(f"{self.backend} worker died before {op!r}", self.stderr_tail()) from None
        line = self._read_line(timeout, op)
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(f"{self.backend} worker failed in {op!r}: {reply.get('error')}",
                              reply.get("traceback", "") or self.stderr_tail())
        return reply["result"]

    def _read_line(self, timeout: float, op: str) -> bytes:
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise WorkerError(f"{self.backend} worker timed out after {timeout:.0f}s in {op!r}",
                                      self.stderr_tail())
                if not sel.select(timeout=min(left, 1.0)):
                    if self.proc.poll() is not None:
                        break
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                buf += chunk
        if not buf.endswith(b"\n"):
            code = self.proc.wait(timeout=10)
            self.kill()
            raise WorkerError(f"{self.backend} worker crashed in {op!r} (exit {code})", self.stderr_tail())
        return buf

    def kill(self) -> None:
        """Kill the worker's whole process group (it and anything it spawned)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(self)

    def close(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the worker exits on EOF
                self.proc.wait(timeout=grace)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


_LIVE: set[Worker] = set()


@atexit.register
def _kill_all() -> None:
    for worker in list(_LIVE):
        worker.kill()


class WorkerPool:
    """One worker per (backend, spec, instance), started on first use and reused, all on one device."""

    def __init__(self, device: str = "cpu", env: dict[str, str] | None = None):
        self.device, self.env = device, env
        self._workers: dict[tuple[str, str, str], Worker] = {}
        self.failed: dict[tuple[str, str, str], WorkerError] = {}

    def get(self, backend: str, spec_path: str | None, instance: str = "") -> Worker:
        """`instance` separates workers of one backend (an engine per dtype lives in its own process)."""
        key = (backend, str(spec_path), instance)
        if key in self.failed:
            raise self.failed[key]
        worker = self._workers.get(key)
        if worker is None or worker.proc.poll() is not None:
            try:
                worker = Worker(backend, spec_path, env=self.env, device=self.device)
            except WorkerError as exc:
                self.failed[key] = exc
                raise
            self._workers[key] = worker
        return worker

    def close(self) -> None:
        for worker in self._workers.values():  # every worker starts shutting down at once, then each is reaped
            try:
                worker.proc.stdin.close()
            except OSError:
                pass
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()
