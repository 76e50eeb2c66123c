"""No backend process (worker, Megatron rank, DeepSpeed rank) outlives a certification run."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from .conftest import REPO


def _tagged(tag: str) -> list[int]:
    """Pids whose environment carries `tag` (inherited by every process the run spawned)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if tag.encode() in (proc / "environ").read_bytes():
                status = (proc / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_run_leaves_no_process_behind(tmp_path):
    tag = f"HARNESS_ORPHAN_PROBE={uuid.uuid4().hex}"
    key, value = tag.split("=")
    env = {**os.environ, key: value}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--model", "qwen2",
           "--backend", "megatron,deepspeed", "--dtype", "float32", "--report-dir", str(tmp_path),
           "-k", "logits and (tp2pp1 or zero3)"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "passed" in proc.stdout
    assert _tagged(value) == [], "processes from the run are still alive"
