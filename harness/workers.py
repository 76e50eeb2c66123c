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
import threading
import time
from pathlib import Path
from typing import Any

from .errors import WorkerError

REPO_ROOT = Path(__file__).resolve().parent.parent


def python_for(backend: str) -> str:
    """Interpreter for a backend: HARNESS_PYTHON_<BACKEND> lets a clashing backend live in its own venv."""
    return os.environ.get(f"HARNESS_PYTHON_{backend.upper()}", sys.executable)


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def proportional_bytes(pid: str, rss: int) -> int:
    """A process's PSS: its resident pages, each shared one counted 1/n in each of the n processes mapping it.
    Summed over a group it is the memory the group holds; summed RSS counts the libraries every rank maps
    once per rank (torch + deepspeed + transformers: 454 MiB RSS, 282 MiB PSS in each of three processes).
    `rss` where the kernel has no smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            return next((int(line.split()[1]) * 1024 for line in handle if line.startswith(b"Pss:")), rss)
    except OSError:
        return rss


def group_memory(pgids) -> dict[int, tuple[int, dict[int, int]]]:
    """Per process group in `pgids`: resident bytes summed over its members now (PSS, proportional_bytes),
    and each member's high-water mark (VmHWM). One pass over /proc serves every worker.

    A worker's group is it and everything it spawned (rank processes, engine cores): the worker is a
    session leader and its children inherit the group. Ray actors are Ray's processes and are not counted."""
    out: dict[int, tuple[int, dict[int, int]]] = {pgid: (0, {}) for pgid in pgids}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
            fields = stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
            pgid = int(fields[2])  # field 5, pgrp
            if pgid not in out:
                continue
            rss = int(fields[21]) * PAGE_BYTES  # field 24, rss in pages
            with open(f"/proc/{entry.name}/status", "rb") as handle:
                hwm = next((int(line.split()[1]) * 1024 for line in handle if line.startswith(b"VmHWM:")), rss)
        except (OSError, ValueError, IndexError):  # the process ended between listing and reading
            continue
        total, members = out[pgid]
        members[int(entry.name)] = hwm
        out[pgid] = (total + proportional_bytes(entry.name, rss), members)
    return out


class ResourceMeter:
    """A worker's wall time and peak resident memory, sampled from /proc every SAMPLE_INTERVAL_S.

    peak_rss_bytes is the largest resident memory of the worker's process group seen at one sample (its
    members' PSS summed: a shared library counts once, not once per rank), floored by the largest single
    process's kernel high-water mark (its RSS, exact, so a spike between samples in one process still counts);
    a spike shared by several processes between two samples can be missed."""

    def __init__(self, pgid: int):
        self.pgid = pgid
        self.started = time.monotonic()
        self.ended: float | None = None
        self.peak_sum, self.hwm = 0, {}
        self._lock = threading.Lock()
        _SAMPLER.add(self)

    def update(self, total: int, hwm: dict[int, int]) -> None:
        with self._lock:
            self.peak_sum = max(self.peak_sum, total)
            for pid, value in hwm.items():
                self.hwm[pid] = max(self.hwm.get(pid, 0), value)

    def sample(self) -> None:
        self.update(*group_memory([self.pgid])[self.pgid])

    def stop(self) -> None:
        if self.ended is None:
            self.sample()  # the last look before the group is killed
            _SAMPLER.discard(self)
            self.ended = time.monotonic()

    def record(self) -> dict[str, Any]:
        with self._lock:
            largest = max(self.hwm.values(), default=0)
            return {"wall_s": round((self.ended or time.monotonic()) - self.started, 2),
                    "peak_rss_bytes": max(self.peak_sum, largest), "largest_process_rss_bytes": largest,
                    "processes": len(self.hwm)}


class _Sampler:
    """One daemon thread sampling every live meter's process group (started with the first meter)."""

    def __init__(self):
        self.meters: set[ResourceMeter] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, meter: ResourceMeter) -> None:
        with self.lock:
            self.meters.add(meter)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="harness-resource-sampler", daemon=True)
                self.thread.start()

    def discard(self, meter: ResourceMeter) -> None:
        with self.lock:
            self.meters.discard(meter)

    def _run(self) -> None:
        while True:
            time.sleep(SAMPLE_INTERVAL_S)
            with self.lock:
                meters = list(self.meters)
            if not meters:
                continue
            seen = group_memory({m.pgid for m in meters})
            for meter in meters:
                meter.update(*seen[meter.pgid])


SAMPLE_INTERVAL_S = 0.2
_SAMPLER = _Sampler()


def merge_records(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    """One entry for a worker restarted in a session: wall times add, peaks take the larger."""
    if first is None:
        return dict(second)
    return {"wall_s": round(first["wall_s"] + second["wall_s"], 2),
            "peak_rss_bytes": max(first["peak_rss_bytes"], second["peak_rss_bytes"]),
            "largest_process_rss_bytes": max(first["largest_process_rss_bytes"], second["largest_process_rss_bytes"]),
            "processes": first["processes"] + second["processes"]}


RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
# glibc serves allocations below its mmap threshold (raised on the fly up to 32 MB) from heap arenas it rarely
# returns: at a real shape, a layer's tensors (a few MB each) freed and allocated again step after step grew a
# DeepSpeed ZeRO-3 rank from 8 to 12 GiB over three train steps (the OOM killer took it); with a fixed 1 MiB
# threshold the same rank peaks at 7.3 GiB and ends each step at 5.4 (its optimizer state). Ranks inherit it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


class Worker:
    def __init__(self, backend: str, spec_path: str | None, python: str | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 300.0, device: str = "cpu"):
        self.backend = backend
        self.device = device  # "cpu" | "cuda": the backend computes there (Backend.start)
        self.python = python or python_for(backend)
        self._log = tempfile.NamedTemporaryFile(prefix=f"harness-{backend}-", suffix=".log", delete=False)
        # A rank group's rendezvous variables in this process are not the worker's: it picks its own.
        child_env = {**MALLOC_ENV, **{k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}}
        child_env.update(env or {})
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [self.python, "-m", "harness.worker_main", backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True, env=child_env, cwd=str(REPO_ROOT),
        )
        _LIVE.add(self)
        self.meter = ResourceMeter(self.proc.pid)
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
        self.meter.stop()
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
        self.meter.sample()  # before stdin closes: the worker and its children are still there
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
        self._finished: dict[tuple[str, str, str], dict[str, Any]] = {}  # resources of workers already gone

    def get(self, backend: str, spec_path: str | None, instance: str = "") -> Worker:
        """`instance` separates workers of one backend (an engine per dtype lives in its own process)."""
        key = (backend, str(spec_path), instance)
        if key in self.failed:
            raise self.failed[key]
        worker = self._workers.get(key)
        if worker is None or worker.proc.poll() is not None:
            if worker is not None:  # died: keep what it used before starting its successor
                self._retire(key, worker)
            try:
                worker = Worker(backend, spec_path, env=self.env, device=self.device)
            except WorkerError as exc:
                self.failed[key] = exc
                raise
            self._workers[key] = worker
        return worker

    def close_backend(self, backend: str, spec_path: str | None) -> int:
        """Close one spec's workers of a backend (every instance) that no later check needs; their resources are
        kept. A later call starts a fresh one. Returns how many were closed."""
        keys = [key for key in self._workers if key[0] == backend and key[1] == str(spec_path)]
        for key in keys:
            worker = self._workers.pop(key)
            worker.close()
            self._retire(key, worker)
        return len(keys)

    def close(self) -> None:
        for worker in self._workers.values():  # every worker starts shutting down at once, then each is reaped
            try:
                worker.proc.stdin.close()
            except OSError:
                pass
        for key, worker in self._workers.items():
            worker.close()
            self._retire(key, worker)
        self._workers.clear()

    def _retire(self, key: tuple[str, str, str], worker: Worker) -> None:
        worker.meter.stop()
        self._finished[key] = merge_records(self._finished.get(key), worker.meter.record())

    def resources(self, spec_path: str | None) -> dict[str, dict[str, Any]]:
        """{backend or backend/instance: {wall_s, peak_rss_bytes, ...}} of one spec's workers, live or gone."""
        out: dict[str, dict[str, Any]] = {}
        for key in sorted(set(self._finished) | set(self._workers)):
            if key[1] != str(spec_path):
                continue
            record = self._finished.get(key)
            live = self._workers.get(key)
            if live is not None:
                record = merge_records(record, live.meter.record())
            out["/".join(filter(None, (key[0], key[2])))] = record
        return out
