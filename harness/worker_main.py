"""Entry point of a backend worker process: `python -m harness.worker_main BACKEND`.

Replies go to a private copy of the original stdout; fd 1 is pointed at
stderr so that library prints cannot corrupt the protocol.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _return_freed_memory() -> None:
    """Between operations: hand freed heap pages back to the OS (glibc keeps them otherwise). A worker idles
    beside the others for the whole session; at a real shape the tensors an operation freed (a layer's weights
    are a few MB: heap, not mmap) kept an idle vLLM engine 3 GB above its own weights."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main(backend_name: str) -> int:
    _die_with_parent()
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    replies = os.fdopen(reply_fd, "w", buffering=1)
    sys.stdout = sys.stderr

    from harness.backends import load_backend

    backend = None
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            if request["op"] == "__init__":
                backend = load_backend(backend_name)
                result = backend.start(request["args"].get("spec_path"), request["args"].get("device", "cpu"))
            else:
                result = backend.handle(request["op"], request["args"])
            reply = {"ok": True, "result": result}
        except BaseException as exc:  # noqa: BLE001 - report everything, including SystemExit from libraries
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply, default=str) + "\n")
        _return_freed_memory()  # after the reply: the caller is not kept waiting
    if backend is not None:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
