"""One certification run: specs, their plans, backend workers, and the results they produce.

Plain Python (no pytest imports) so it can be driven and tested directly; the
pytest plugin is a thin adapter over it.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import calibration, certificate
from . import device as devices
from . import executor as executors
from .backends import backend_class, package_versions
from .errors import WorkerError
from .plan import PlannedCheck, build_plan, ranks_needed
from .spec import SPECS_DIR, Spec
from .tolerances import cite, resolve
from .verdict import Verdict
from .workers import WorkerPool


def reference_record(spec: Spec) -> dict[str, Any] | None:
    """The certificate's `reference`: a real checkpoint's directory and every file in it (name, bytes,
    sha256), or None for a tiny random reference. spec_plugins.validate_environment checked the files."""
    if spec.reference.path is None:
        return None
    import hashlib

    path = spec.resolve_relative(spec.reference.path)
    files = []
    for item in sorted(p for p in path.iterdir() if p.is_file()):
        digest = hashlib.sha256()
        with open(item, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        files.append({"name": item.name, "bytes": item.stat().st_size, "sha256": digest.hexdigest()})
    return {"path": str(path), "sharded": (path / "model.safetensors.index.json").is_file(), "files": files}



def _log_call(model: str, backend: str, op: str, args: dict, seconds: float, status: str) -> None:
    """With CERTIFY_CALL_LOG=PATH, one JSON line per worker call run (not memo hits): what bench/bare.py replays
    without the harness, so that bench (a) compares the same calls."""
    if path := os.environ.get("CERTIFY_CALL_LOG"):
        with open(path, "a") as log:
            log.write(json.dumps({"model": model, "backend": backend, "op": op, "args": args,
                                  "seconds": round(seconds, 3), "status": status}, default=str) + "\n")


TRAIN_OPS = ("train", "train_reference", "refit_source")  # worker operations that take optimizer steps


class CertifySession:
    def __init__(self, specs: list[Spec], backends: list[str] | None = None, dtypes: list[str] | None = None,
                 report_dir: str | Path = "reports", device: devices.Device | None = None,
                 executor_kind: str | None = None, ray_address: str | None = None):
        self.specs = {spec.name: spec for spec in specs}
        # each spec's checked-in calibration file (SpecError when it is missing or malformed): bounds cite it
        self.citations = {spec.name: calibration.load(spec) for spec in specs}
        # a real checkpoint (reference.path) is certified as it is: its files and their sha256, read before use
        self.references = {spec.name: reference_record(spec) for spec in specs}
        # where every computing worker operation runs (--device / CERTIFY_DEVICE) and how many GPUs it may use
        self.device = device or devices.CPU
        self.backends, self.dtypes = backends or [], dtypes or []
        # The plan is always the spec's whole plan, so a filtered run can never certify a model.
        self.plans = {spec.name: build_plan(spec) for spec in specs}
        self.selected = {c.id for spec in specs for c in build_plan(spec, self.backends, self.dtypes)}
        self.report_dir = Path(report_dir)
        # who starts each spec's rank groups (--executor, else CERTIFY_EXECUTOR, else the spec): ExecutorError
        self.executors = {spec.name: executors.resolve(spec, executor_kind, ray_address) for spec in specs}
        env = {"CUDA_VISIBLE_DEVICES": ""} if self.device.hide_gpus else {}
        self.pool = WorkerPool(self.device.kind, {**env, **executors.worker_env(executor_kind, ray_address)} or None)
        self.results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in self.specs}
        self.versions = package_versions()
        if any(e.kind == "ray" for e in self.executors.values()):
            self.versions["ray"] = next(e.record()["ray"] for e in self.executors.values() if e.kind == "ray")
        self._memo: dict[str, Any] = {}
        # (model, backend) -> {"start_s", "calls", "busy_s"}: how long each worker took, for people
        self.worker_times: dict[tuple[str, str], dict[str, float]] = {}
        self.checkpoint_bytes: dict[str, int] = {}  # model -> its largest materialized reference (resources bound)
        self.trained_workers: set[tuple[str, str]] = set()  # (model, worker name) that ran a TRAIN_OPS call
        self.progress = lambda message: None  # the pytest plugin points this at the terminal

    # ---- planning ----
    def checks_for(self, suite: str) -> list[PlannedCheck]:
        return [c for plan in self.plans.values() for c in plan if c.suite == suite and c.id in self.selected]

    def unavailable(self, check: PlannedCheck) -> str | None:
        cls = backend_class(check.backend)
        if cls is None:
            return f"no {check.backend!r} backend module in this harness version yet"
        if check.suite not in cls.suites:
            return f"the {check.backend!r} backend does not implement the {check.suite!r} suite yet"
        return cls.suite_unavailable(check.suite) or self.device_unavailable(check, cls)

    def device_unavailable(self, check: PlannedCheck, cls=None) -> str | None:
        """Why this check cannot run on this run's device: a GPU-scope suite under --device cpu, a backend
        that cannot compute there, or (cuda) a layout needing more GPUs, one per rank, than this run may use.
        On cpu gloo ranks are processes: no count limit."""
        cls = cls or backend_class(check.backend)
        if not self.device.cuda and check.scope == "gpu":
            return f"{check.backend}'s {check.suite} suite runs on a CUDA GPU; this run uses --device cpu"
        reason = cls.device_unavailable(self.device.kind) if cls is not None else None
        return reason or self.device.short_of(ranks_needed(check, self.specs[check.model]))

    # ---- running ----
    def call(self, model: str, backend: str, op: str, **args: Any) -> dict[str, Any]:
        """A worker operation, memoised for the session (several checks judge one measurement)."""
        key = json.dumps([model, backend, op, args], sort_keys=True, default=str)
        if key not in self._memo:
            spec = self.specs[model]
            times = self.worker_times.setdefault((model, backend), {"start_s": 0.0, "calls": 0, "busy_s": 0.0})
            if not times["calls"]:
                self.progress(f"[{model}] starting the {backend} worker")
            started, instance = time.monotonic(), ""
            try:
                cls = backend_class(backend)
                instance = str(args.get("dtype", "")) if cls is not None and cls.worker_per_dtype else ""
                worker = self.pool.get(backend, str(spec.source) if spec.source else None, instance)
                times["start_s"] = round(worker.start_seconds, 2)
                self.versions.update(worker.versions)
                self._memo[key] = ("ok", worker.call(op, args, timeout=spec.worker_timeout_s))
            except WorkerError as exc:
                self._memo[key] = ("error", exc)
            times["calls"] += 1
            times["busy_s"] = round(times["busy_s"] + time.monotonic() - started, 2)
            _log_call(model, backend, op, args, time.monotonic() - started, self._memo[key][0])
            if op in TRAIN_OPS:  # its peak holds an optimizer state: the resource bound's train limit applies
                self.trained_workers.add((model, "/".join(filter(None, (backend, instance)))))
            shown = {k: v for k, v in args.items() if k in ("dtype", "dtypes", "tp", "pp", "stage", "world")}
            self.progress(f"[{model}] {backend}.{op}({', '.join(f'{k}={v}' for k, v in shown.items())}) "
                          f"{time.monotonic() - started:.1f}s")
        status, value = self._memo[key]
        if status == "error":
            raise value
        return value

    def selected_dtypes(self, model: str) -> list[str]:
        """The spec's dtypes this run selects (--dtype), in spec order."""
        return [d for d in self.specs[model].dtypes if not self.dtypes or d in self.dtypes]

    def first_dtype(self, model: str) -> str:
        """The first dtype this run selects (engines are started per dtype: reuse that one)."""
        return (self.selected_dtypes(model) or self.specs[model].dtypes)[0]

    def reference_dir(self, model: str, dtype: str) -> str:
        ref = self.specs[model].reference
        path = str(self.specs[model].resolve_relative(ref.path)) if ref.path else None
        out = self.call(model, "hf", "materialize", model_type=self.specs[model].hf_model_type,
                        overrides=ref.config, seed=ref.seed, dtype=dtype, path=path)["dir"]
        self.checkpoint_bytes[model] = max(self.checkpoint_bytes.get(model, 0), certificate.checkpoint_bytes(out))
        return out

    def scratch(self, model: str) -> Path:
        """A per-session scratch folder for measurement files (removed at close)."""
        if not hasattr(self, "_scratch"):
            import tempfile

            self._scratch = tempfile.TemporaryDirectory(prefix="harness-run-")
        path = Path(self._scratch.name) / model
        path.mkdir(parents=True, exist_ok=True)
        return path

    def release(self, out_dir: str) -> None:
        """Delete a measurement's files once its check is judged, and forget the measurement (a later call
        makes it again). A real shape's train step writes 4 GB a run (first-step gradients and weights); kept
        for the whole session, they filled the disk before the last train row."""
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
        for key in [k for k in self._memo if json.loads(k)[3].get("out_dir") == out_dir]:
            del self._memo[key]

    def tolerance(self, check: PlannedCheck, metrics: list[str]) -> dict[str, float]:
        return resolve(check.dtype or "float32", self.specs[check.model].tolerances, metrics)

    @contextmanager
    def judging(self, check: PlannedCheck) -> Iterator[dict[str, Verdict]]:
        """Run a check body; worker failures and exceptions become an `error` verdict, never a pass."""
        box: dict[str, Verdict] = {}
        started = time.monotonic()
        try:
            yield box
        except WorkerError as exc:
            box["verdict"] = Verdict("error", f"{exc}\n{exc.stderr_tail[-1500:]}".strip())
        except Exception as exc:  # noqa: BLE001 - a crash in a check is reported, not hidden
            box["verdict"] = Verdict("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
        box.setdefault("verdict", Verdict("error", "check body produced no verdict"))
        box["seconds"] = round(time.monotonic() - started, 3)

    def row(self, check: PlannedCheck, verdict: Verdict, seconds: float = 0.0) -> dict[str, Any]:
        row = {"id": check.id, "suite": check.suite, "backend": check.backend, "variant": check.variant,
               "dtype": check.dtype, "layout": check.layout, "scope": check.scope, "seconds": seconds,
               **verdict.as_dict()}
        row["tolerance"] = cite(row["tolerance"], check.suite, check.dtype,
                                getattr(self, "citations", {}).get(check.model))
        return row

    def add_result(self, model: str, row: dict[str, Any], versions: dict[str, str] | None = None) -> None:
        self.results.setdefault(model, {})[row["id"]] = row
        if versions:
            self.versions.update(versions)

    # ---- finishing ----
    def certificates(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, spec in self.specs.items():
            rows = []
            for check in self.plans[name]:
                row = self.results[name].get(check.id)
                if row is None and check.not_applicable:  # by design, whatever this run selected
                    row = self.row(check, Verdict("not_applicable", check.not_applicable))
                elif row is None and check.id not in self.selected:
                    row = self.row(check, Verdict("not_run", "not selected by --backend/--dtype in this run"))
                elif row is None:
                    row = self.row(check, Verdict("not_run", "not executed in this run (deselected or interrupted)"))
                rows.append(row)
            in_repo = spec.source is None or spec.source.parent == SPECS_DIR.resolve()
            command = f"pytest --model {name}" if in_repo else f"pytest --model-spec {spec.source}"
            command += "".join(f" --backend {b}" for b in self.backends) + "".join(f" --dtype {d}" for d in self.dtypes)
            if self.device.cuda:
                command += " --device cuda"
            if self.executors[name].kind != spec.executor.kind:
                command += f" --executor {self.executors[name].kind}"
            citation = self.citations.get(name)
            out[name] = certificate.build(name, spec.sha256, dict(sorted(self.versions.items())), rows, command,
                                          str(spec.source or ""), spec.text, device=self.device_for(name),
                                          calibration=citation.as_dict() if citation else None,
                                          reference=getattr(self, "references", {}).get(name),
                                          resources=certificate.resources_section(
                                              self._worker_resources(name),
                                              getattr(self, "checkpoint_bytes", {}).get(name), spec.peak_rss_bound))
        return out

    def _worker_resources(self, model: str) -> dict[str, dict[str, Any]]:
        """The pool's records of one model's workers, each marked with whether it trained."""
        spec = self.specs[model]
        records = self.pool.resources(str(spec.source) if spec.source else None)
        trained = getattr(self, "trained_workers", set())
        return {name: {**record, "trains": (model, name) in trained} for name, record in records.items()}

    @property
    def device_record(self) -> dict[str, Any]:
        """The certificate's `device` (read once: nvidia-smi is not asked per model)."""
        if not hasattr(self, "_device_record"):
            self._device_record = devices.record(self.device)
        return self._device_record

    def device_for(self, model: str) -> dict[str, Any]:
        """The device record plus, where not the default local spawn, the executor of the model's rank groups."""
        record = self.executors[model].record()
        return {**self.device_record, "executor": record} if record else self.device_record

    def write_certificates(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        return {name: (certificate.write(cert, self.report_dir), cert) for name, cert in self.certificates().items()}

    def close_engine(self, model: str, backend: str) -> None:
        """The model's engine workers of `backend`, closed once no later check needs them (plugin teardown)."""
        spec = self.specs.get(model)
        if spec is not None and self.pool.close_backend(backend, str(spec.source) if spec.source else None):
            self.progress(f"[{model}] closed the {backend} worker: no later check needs it")

    def close(self) -> None:
        self.pool.close()
        if hasattr(self, "_scratch"):
            self._scratch.cleanup()
