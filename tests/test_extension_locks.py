"""A torch extension build killed midway leaves its FileBaton lock; every later DeepSpeed rank on the machine
would sleep on it until the worker's timeout with an empty log. The backend refuses to start ranks then,
naming the lock; a fresh lock (a build running now) is left to finish."""
from __future__ import annotations

import os
import time

import pytest

from harness.backends import deepspeed


def _lock(root, name: str, age_s: float):
    path = root / name / "lock"
    path.parent.mkdir(parents=True)
    path.write_text("")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_an_old_lock_is_refused_naming_it_and_a_fresh_one_is_not(tmp_path):
    old = _lock(tmp_path, deepspeed.SHM_COMM_OP, deepspeed.STALE_LOCK_S + 60)
    _lock(tmp_path, "another_op", 5)  # a build in progress right now
    assert deepspeed.stale_build_locks(tmp_path) == [old]
    with pytest.raises(RuntimeError, match=rf"^{old}: a torch extension build lock left 16 min ago"):
        deepspeed.refuse_stale_build_locks(tmp_path)
    old.unlink()
    deepspeed.refuse_stale_build_locks(tmp_path)


def test_the_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert deepspeed.extensions_root() == tmp_path
