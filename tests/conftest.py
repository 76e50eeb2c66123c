"""Shared helpers for the harness's own tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
QWEN2_SPEC = REPO / "model_specs" / "qwen2.yaml"
# CI sets this (.ci/run): the backends whose tests must run, never skip for want of the package
REQUIRED = [b for b in os.environ.get("CERTIFY_REQUIRE_BACKENDS", "").split(",") if b.strip()]
# packages that are not backends but whose tests CI must run too (the Ray executor)
REQUIRED_EXTRAS = [b for b in os.environ.get("CERTIFY_REQUIRE_EXTRAS", "").split(",") if b.strip()]
MISSING_WORDS = ("not installed", "needs a CUDA GPU; none is visible", "are needed")


def pytest_configure(config):
    if not REQUIRED:
        return
    from harness.backends import backend_class

    missing = {name: backend_class(name).unavailable() for name in REQUIRED}
    missing = {name: why for name, why in missing.items() if why}
    if missing:
        raise pytest.UsageError(f"CERTIFY_REQUIRE_BACKENDS: {'; '.join(f'{k}: {v}' for k, v in missing.items())}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CERTIFY_REQUIRE_BACKENDS a test skipped for a missing backend package fails instead."""
    outcome = yield
    report = outcome.get_result()
    required = REQUIRED + REQUIRED_EXTRAS
    if required and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[-1])
        if any(word in reason for word in MISSING_WORDS) and any(b in reason.lower() for b in required):
            report.outcome = "failed"
            report.longrepr = f"skipped for a package CI must exercise ({', '.join(required)}): {reason}"


def base_spec(name: str = "tmp-model", **changes) -> dict:
    """The repo's qwen2 spec as a dict, renamed, with top-level keys replaced."""
    data = yaml.safe_load(QWEN2_SPEC.read_text())
    data.pop("calibration", None)  # relative to model_specs/ and qwen2's own: a renamed copy cites none
    data["name"] = name
    data.update(changes)
    return data


@pytest.fixture
def make_spec(tmp_path):
    """Write a spec (dict or raw YAML text) plus plugin files into a fresh folder; returns the spec path."""

    def _make(spec: dict | str, files: dict[str, str] | None = None, filename: str = "spec.yaml") -> Path:
        folder = tmp_path / "specs"
        folder.mkdir(exist_ok=True)
        for rel, text in (files or {}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(textwrap.dedent(text))
        path = folder / filename
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
        return path

    return _make


class CertifyRun:
    def __init__(self, proc: subprocess.CompletedProcess, report_dir: Path):
        self.returncode = proc.returncode
        self.output = proc.stdout + proc.stderr
        self.report_dir = report_dir

    def certificate(self, model: str) -> dict:
        return json.loads((self.report_dir / model / "certificate.json").read_text())

    def check(self, model: str, check_id: str) -> dict:
        checks = {c["id"]: c for c in self.certificate(model)["checks"]}
        return checks[f"{model}/{check_id}"]


@pytest.fixture
def run_certify(tmp_path):
    """Run `pytest <args>` in a subprocess the way a user would, reports under tmp_path."""

    def _run(*args: str, timeout: float = 600, cwd: Path = REPO) -> CertifyRun:
        report_dir = tmp_path / "reports"
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        # the harness's own expectations are CPU ones (gloo ranks, CPU tolerances): a GPU machine runs them on
        # the CPU too unless CERTIFY_DEVICE says otherwise (tests/test_device.py covers the device choice)
        env.setdefault("CERTIFY_DEVICE", "cpu")
        env.pop("PYTEST_XDIST_WORKER", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--report-dir", str(report_dir), *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return CertifyRun(proc, report_dir)

    return _run
