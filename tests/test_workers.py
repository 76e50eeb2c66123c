"""Backend worker processes: timeouts kill the whole process tree, crashes and errors are reported
with the worker's stderr, stdout noise cannot corrupt the protocol, and nothing outlives close().

Uses the out-of-tree backends in tests/backends_for_tests.py, loaded by "module:Class" name.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from harness.errors import WorkerError
from harness.workers import Worker, WorkerPool

SLEEPY = "tests.backends_for_tests:SleepyBackend"
BROKEN = "tests.backends_for_tests:BrokenSetupBackend"


def alive(pid: int) -> bool:
    """True while pid is a live process; a zombie (exited, not yet reaped) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def wait_dead(*pids: int, timeout: float = 10.0) -> list[int]:
    """Pids still alive after `timeout` seconds (empty when all died)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def children_of_us(needle: str) -> list[int]:
    """Live direct children of this process whose command line contains `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and needle in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture
def worker():
    w = Worker(SLEEPY, None, start_timeout=60)
    try:
        yield w
    finally:
        w.close(grace=2)


def test_worker_starts_and_answers(worker):
    assert worker.call("echo", {"value": [1, "two", {"3": None}]}, timeout=30) == \
        {"value": [1, "two", {"3": None}], "pid": worker.pid}
    assert worker.versions["python"]
    assert worker.start_seconds > 0


def test_timeout_kills_worker_and_grandchildren(worker, tmp_path):
    pid_file = tmp_path / "pids"
    start = time.monotonic()
    with pytest.raises(WorkerError, match="timed out") as info:
        worker.call("spawn_and_hang", {"pid_file": str(pid_file)}, timeout=2)
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"timeout of 2 s took {elapsed:.1f} s to fire"
    assert "spawn_and_hang" in str(info.value)
    worker_pid, child_pid = map(int, pid_file.read_text().split())
    assert worker_pid == worker.pid
    assert wait_dead(worker_pid, child_pid) == [], "a timed-out worker or its child outlived the timeout"
    with pytest.raises(WorkerError, match="not running"):
        worker.call("pid", timeout=5)


def test_crash_reports_exit_code_and_stderr(worker):
    marker = "MARKER-before-os._exit-7f3a"
    with pytest.raises(WorkerError, match=r"crashed in 'crash' \(exit 3\)") as info:
        worker.call("crash", {"marker": marker, "code": 3}, timeout=30)
    assert marker in info.value.stderr_tail
    assert wait_dead(worker.pid) == []


def test_error_in_op_is_reported_and_worker_stays_usable(worker):
    with pytest.raises(WorkerError, match=r"failed in 'fail': ValueError: bad shape \(3, 4\)") as info:
        worker.call("fail", {"message": "bad shape (3, 4)"}, timeout=30)
    assert "Traceback" in info.value.stderr_tail and "op_fail" in info.value.stderr_tail
    assert worker.call("pid", timeout=30) == {"pid": worker.pid}


def test_unknown_op_is_an_error_not_a_crash(worker):
    with pytest.raises(WorkerError, match="has no operation 'nosuch'"):
        worker.call("nosuch", timeout=30)
    assert worker.call("pid", timeout=30) == {"pid": worker.pid}


def test_stdout_noise_does_not_corrupt_protocol(worker):
    assert worker.call("noisy", timeout=30) == {"clean": True, "pid": worker.pid}
    assert worker.call("echo", {"value": "after"}, timeout=30)["value"] == "after"
    tail = worker.stderr_tail()
    assert "print() to stdout {not json" in tail and "a child's stdout" in tail


def test_close_leaves_no_process():
    w = Worker(SLEEPY, None, start_timeout=60)
    spawned = w.call("spawn", timeout=30)
    assert spawned["pid"] == w.pid and alive(spawned["child_pid"])
    log = Path(w._log.name)
    w.close(grace=5)
    assert w.proc.poll() is not None
    assert wait_dead(w.pid, spawned["child_pid"]) == []
    assert not log.exists()
    w.close()  # closing twice is harmless


def test_failed_start_is_reported_and_leaves_no_process():
    with pytest.raises(WorkerError, match="setup exploded on purpose"):
        Worker(BROKEN, None, start_timeout=60)
    deadline = time.monotonic() + 10
    while children_of_us("BrokenSetupBackend") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children_of_us("BrokenSetupBackend") == [], "a worker that failed to start was left running"


def test_pool_reuses_worker_and_replaces_a_dead_one():
    pool = WorkerPool()
    try:
        first = pool.get(SLEEPY, None)
        pid_a = first.call("pid", timeout=30)["pid"]
        second = pool.get(SLEEPY, None)
        assert second is first
        assert second.call("pid", timeout=30)["pid"] == pid_a == first.pid

        with pytest.raises(WorkerError, match="crashed"):
            first.call("crash", {"marker": "x"}, timeout=30)
        replacement = pool.get(SLEEPY, None)
        assert replacement is not first and replacement.pid != pid_a
        assert replacement.call("pid", timeout=30)["pid"] == replacement.pid
    finally:
        pool.close()
    assert wait_dead(pid_a, replacement.pid) == []


def test_a_backend_no_later_check_needs_is_closed_and_keeps_its_resources():
    pool = WorkerPool()
    try:
        one, two = pool.get(SLEEPY, None, "float32"), pool.get(SLEEPY, None, "bfloat16")  # an engine per dtype
        pids = [one.call("pid", timeout=30)["pid"], two.call("pid", timeout=30)["pid"]]
        assert pool.close_backend(SLEEPY, "other-spec.yaml") == 0  # another spec's workers are not touched
        assert pool.close_backend(SLEEPY, None) == 2
        assert wait_dead(*pids) == []
        records = pool.resources(None)  # measured until closed, still in the certificate
        assert set(records) == {f"{SLEEPY}/float32", f"{SLEEPY}/bfloat16"}
        assert all(r["wall_s"] > 0 and r["peak_rss_bytes"] > 0 for r in records.values())
        again = pool.get(SLEEPY, None, "float32")  # a later call starts a fresh one
        assert again.call("pid", timeout=30)["pid"] not in pids
    finally:
        pool.close()


def test_pool_remembers_a_failed_start():
    pool = WorkerPool()
    try:
        with pytest.raises(WorkerError) as first:
            pool.get(BROKEN, None)
        with pytest.raises(WorkerError) as second:
            pool.get(BROKEN, None)
        assert second.value is first.value  # not retried: one broken backend costs one start
    finally:
        pool.close()


def test_a_backend_in_its_own_interpreter_is_judged_available_there(monkeypatch, tmp_path):
    """HARNESS_PYTHON_<BACKEND> moves a backend's worker to another venv (a GPU runner's CUDA engines):
    whether it can run is then asked of that interpreter, not of the one running pytest."""
    import venv

    from harness.backends.hf import HFBackend
    from harness.backends.vllm import VLLMBackend

    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # an interpreter with none of the backends installed
    monkeypatch.setenv("HARNESS_PYTHON_VLLM", str(bare / "bin" / "python"))
    reason = VLLMBackend.unavailable()
    assert reason and "vllm is not installed" in reason, reason
    monkeypatch.setenv("HARNESS_PYTHON_HF", sys.executable)
    assert HFBackend.unavailable() is None
    monkeypatch.setenv("HARNESS_PYTHON_HF", str(bare / "bin" / "python"))
    assert "torch is not installed in" in HFBackend.unavailable()


def test_a_worker_does_not_inherit_a_rank_groups_rendezvous(monkeypatch):
    """A process that once joined a gloo group keeps MASTER_PORT in its environment while the group's store holds
    that port; a worker inheriting it collided (EADDRINUSE) in every later one-rank group."""
    monkeypatch.setenv("MASTER_PORT", "40085")
    monkeypatch.setenv("RANK", "3")
    w = Worker(SLEEPY, None, start_timeout=60)
    try:
        env = w.call("env", {"names": ["MASTER_PORT", "RANK", "PYTHONUNBUFFERED"]}, timeout=30)["env"]
    finally:
        w.close()
    assert env == {"MASTER_PORT": None, "RANK": None, "PYTHONUNBUFFERED": "1"}


def test_a_one_rank_group_ignores_a_taken_master_port():
    import socket
    import subprocess

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        code = ("import torch.distributed as dist; from harness.backends.base import init_single_rank_group; "
                "init_single_rank_group(dist); print(dist.get_world_size()); dist.destroy_process_group()")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(held.getsockname()[1]),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr[-2000:]


def test_a_port_taken_before_bind_is_retried_on_a_new_one_and_other_errors_are_not():
    from harness.backends.base import on_a_fresh_port

    ports = []

    def taken_once(port):
        ports.append(port)
        if len(ports) == 1:
            raise RuntimeError("The server socket has failed to listen on any local network address. EADDRINUSE")
        return "up"

    assert on_a_fresh_port(taken_once, (RuntimeError,)) == "up" and len(ports) == 2

    def broken(port):
        ports.append(port)
        raise RuntimeError("connection refused")

    ports.clear()
    with pytest.raises(RuntimeError, match="refused"):
        on_a_fresh_port(broken, (RuntimeError,))
    assert len(ports) == 1
    with pytest.raises(RuntimeError, match="EADDRINUSE"):
        on_a_fresh_port(lambda port: (_ for _ in ()).throw(RuntimeError("EADDRINUSE")), (RuntimeError,), attempts=2)


def test_workers_start_with_a_fixed_malloc_mmap_threshold_unless_the_user_set_one(monkeypatch):
    """glibc's heap kept a real-shape DeepSpeed rank's freed layer tensors (12 GiB after three steps, OOM-killed;
    7.3 GiB with the threshold fixed): every worker, and the ranks it spawns, starts with MALLOC_ENV; a user's
    own value wins, and Ray actors get it forwarded (they start in the cluster's environment)."""
    from harness.backends.ray_executor import _forwarded_env
    from harness.workers import MALLOC_ENV

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    names = {"names": list(MALLOC_ENV)}
    w = Worker(SLEEPY, None, start_timeout=60)
    try:
        assert w.call("env", names, timeout=30)["env"] == MALLOC_ENV
    finally:
        w.close()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    w = Worker(SLEEPY, None, start_timeout=60)
    try:
        assert w.call("env", names, timeout=30)["env"] == {"MALLOC_MMAP_THRESHOLD_": "65536"}
    finally:
        w.close()
    assert _forwarded_env()["MALLOC_MMAP_THRESHOLD_"] == "65536"
