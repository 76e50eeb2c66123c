"""Out-of-tree backends for tests/test_workers.py, loaded as Worker("tests.backends_for_tests:NAME", None).

They run inside a real worker process (`python -m harness.worker_main tests.backends_for_tests:NAME`)
and misbehave on purpose: hang, crash, raise, print to stdout, spawn children.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from harness.backends.base import Backend


class SleepyBackend(Backend):
    name = "sleepy"
    suites = ()

    def op_pid(self) -> dict:
        return {"pid": os.getpid()}

    def op_echo(self, value=None) -> dict:
        return {"value": value, "pid": os.getpid()}

    def op_env(self, names: list[str]) -> dict:
        return {"env": {name: os.environ.get(name) for name in names}}

    def op_device(self) -> dict:
        """The device the worker was started for (Backend.start's `device`, sent by the parent)."""
        return {"device": self.device, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def op_spawn(self) -> dict:
        """Start a long-lived grandchild and return its pid (used to check close() reaps it)."""
        child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
        return {"pid": os.getpid(), "child_pid": child.pid}

    def op_spawn_and_hang(self, pid_file: str) -> dict:
        """Start a grandchild, record its pid, then never answer (the parent's timeout must kill both)."""
        child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
        tmp = Path(pid_file + ".tmp")
        tmp.write_text(f"{os.getpid()} {child.pid}")
        tmp.rename(pid_file)  # atomic: the test never reads half a line
        time.sleep(300)
        return {}

    def op_crash(self, marker: str, code: int = 3) -> dict:
        sys.stderr.write(f"{marker}\n")
        sys.stderr.flush()
        os._exit(code)

    def op_fail(self, message: str) -> dict:
        raise ValueError(message)

    def op_noisy(self) -> dict:
        """Writes to stdout every way a library might; none of it may reach the reply channel."""
        print("print() to stdout {not json")
        sys.stdout.write('{"ok": true, "result": {"forged": 1}}\n')
        sys.stdout.flush()
        os.write(1, b"raw write to fd 1 without newline")
        subprocess.run(["echo", "a child's stdout"], check=True)
        return {"clean": True, "pid": os.getpid()}


class BrokenSetupBackend(Backend):
    name = "broken-setup"
    suites = ()

    def setup(self) -> None:
        raise RuntimeError("setup exploded on purpose")
