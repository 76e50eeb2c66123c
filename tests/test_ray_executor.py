"""The Ray executor (--executor ray): the same rank functions on Ray actors give the local path's numbers
bit for bit; a rank that raises, dies or hangs is an error naming it with its log tail; nothing survives."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from harness import certificate
from harness import executor as executors
from harness.errors import SpecError, WorkerError
from harness.plan import PlannedCheck
from harness.session import CertifySession
from harness.spec import load_spec, parse_spec
from harness.workers import Worker

from .conftest import QWEN2_SPEC, REPO, base_spec
from .test_no_orphans import _tagged

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason=f"ray is not installed (pip install {executors.RAY_PIN})")
needs_megatron = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron not installed")


def _spec(name: str, **changes) -> dict:
    """qwen2's spec renamed, without its calibration file (which lives beside the repo's spec only)."""
    data = base_spec(name, **changes)
    data.pop("calibration", None)
    return data


# ---- choosing the executor (cheap) ----

def test_the_option_beats_the_environment_which_beats_the_spec():
    spec = parse_spec(_spec("ex", executor={"kind": "ray", "ray_address": "spec-head:6379"}))
    assert executors.resolve(None, env={}) == executors.LOCAL
    if HAS_RAY:
        assert executors.resolve(spec, env={}) == executors.Executor("ray", "spec-head:6379")
        assert executors.resolve(spec, env={"CERTIFY_RAY_ADDRESS": "env:1"}).address == "env:1"
        assert executors.resolve(spec, address="cli:2", env={"CERTIFY_RAY_ADDRESS": "env:1"}).address == "cli:2"
        assert executors.resolve(None, "ray", env={}) == executors.Executor("ray", None)  # a local instance
    assert executors.resolve(spec, env={"CERTIFY_EXECUTOR": "local"}) == executors.LOCAL
    assert executors.resolve(spec, "local", env={"CERTIFY_EXECUTOR": "ray"}) == executors.LOCAL


def test_bad_choices_are_one_line_errors_naming_the_source():
    with pytest.raises(executors.ExecutorError, match=r"^--executor: 'slurm' is not an executor \(known: local, ray\)$"):
        executors.resolve(None, "slurm", env={})
    with pytest.raises(executors.ExecutorError, match="^CERTIFY_EXECUTOR: 'mp' is not an executor"):
        executors.resolve(None, env={"CERTIFY_EXECUTOR": "mp"})
    with pytest.raises(executors.ExecutorError, match="^--ray-address head:6379: needs --executor ray$"):
        executors.resolve(None, address="head:6379", env={})
    with pytest.raises(SpecError, match=r"executor.kind: Input should be 'local' or 'ray'"):
        parse_spec(_spec("ex", executor={"kind": "slurm"}), "spec.yaml")
    with pytest.raises(SpecError, match=r"spec.yaml: executor.adress: unknown key"):
        parse_spec(_spec("ex", executor={"adress": "x"}), "spec.yaml")


def test_a_bad_executor_option_is_a_usage_error(make_spec):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--model-spec",
                           str(make_spec(_spec("ex"))),
                           "--executor", "slurm"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"})
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--executor: 'slurm' is not an executor (known: local, ray)" in proc.stderr


@needs_ray
def test_the_certificate_records_the_executor_and_still_verifies(tmp_path, make_spec):
    from harness.verify import verify

    session = CertifySession([load_spec(make_spec(_spec("ex")))], ["hf"], report_dir=tmp_path, executor_kind="ray")
    try:
        assert session.pool.env["CERTIFY_EXECUTOR"] == "ray"  # how the workers learn it
        cert = session.certificates()["ex"]
    finally:
        session.close()
    assert cert["device"] == {"kind": "cpu", "executor": {"kind": "ray", "address": "local instance",
                                                          "ray": executors.Executor("ray").record()["ray"]}}
    assert cert["command"].endswith(" --executor ray") and cert["versions"]["ray"] != "not installed"
    assert "device: cpu · ray executor (ray " in certificate.render_markdown(cert)
    verify(certificate.write(cert, tmp_path) / "certificate.json")  # raises on a certificate that does not verify


# ---- through real workers: one local Ray instance per worker process ----

def _tag() -> tuple[str, str]:
    return "HARNESS_ORPHAN_PROBE", uuid.uuid4().hex


def _files_equal(a: str, b: str) -> None:
    """Same names, dtypes (fp32), shapes and bits."""
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    assert sorted(left) == sorted(right) and left
    for name in left:
        assert left[name].dtype == right[name].dtype == torch.float32 and left[name].shape == right[name].shape
        assert torch.equal(left[name].view(torch.int32), right[name].view(torch.int32)), f"{name}: bits differ"


@needs_ray
@needs_megatron
def test_qwen2_tp2pp2_logits_and_train_are_bit_identical_through_ray(tmp_path):
    from fixtures.prompts import prompt_sets
    from harness.train_step import STEPS

    key, value = _tag()
    spec = load_spec(QWEN2_SPEC)
    ref = spec.reference
    hf = Worker("hf", str(QWEN2_SPEC))
    workers = {"local": Worker("megatron", str(QWEN2_SPEC), env={key: value}),
               "ray": Worker("megatron", str(QWEN2_SPEC), env={key: value, "CERTIFY_EXECUTOR": "ray"})}
    try:
        ref_dir = hf.call("materialize", {"model_type": spec.hf_model_type, "overrides": ref.config,
                                          "seed": ref.seed, "dtype": "float32", "path": None})["dir"]
        sets = prompt_sets(ref.config["vocab_size"])
        got = {}
        for name, worker in workers.items():
            logits = worker.call("logprobs", {"dir": ref_dir, "dtypes": ["float32"], "tp": 2, "pp": 2, "prompts": sets,
                                              "out_dir": str(tmp_path / name / "logits")}, timeout=600)
            train = worker.call("train", {"dir": ref_dir, "dtype": "float32", "tp": 2, "pp": 2, "steps": STEPS,
                                          "sequences": sets["padded_batch"], "out_dir": str(tmp_path / name / "train")},
                                timeout=600)
            got[name] = (logits, train)
        assert "raylet" in _commands(value), "the ray worker's ranks did not run on Ray"
    finally:
        for worker in (hf, *workers.values()):
            worker.close()
    (local_logits, local_train), (ray_logits, ray_train) = got["local"], got["ray"]
    assert not local_logits["load_problems"] and not ray_logits["load_problems"]
    _files_equal(local_logits["files"]["float32"], ray_logits["files"]["float32"])
    assert len(local_train["losses"]) == STEPS and local_train["losses"] == ray_train["losses"]  # exact floats
    _files_equal(local_train["grads"], ray_train["grads"])
    _files_equal(local_train["weights"], ray_train["weights"])
    _assert_nothing_left(value)


def _commands(tag_value: str) -> str:
    out = []
    for pid in _tagged(tag_value):
        try:
            out.append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(out)


def _assert_nothing_left(tag_value: str) -> None:
    deadline = time.monotonic() + 20  # Ray's processes exit with their worker; give them a moment
    while _tagged(tag_value) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _tagged(tag_value) == [], "processes of the run (workers, Ray, actors) are still alive"


@needs_ray
def test_a_rank_that_raises_dies_or_hangs_is_an_error_with_its_tail_and_nothing_survives(tmp_path, make_spec):
    key, value = _tag()
    # the group timeout is 0.9 x the worker timeout: a hung rank is reported before the parent gives up
    spec_path = make_spec(_spec("raygroup", worker_timeout_s=40))
    worker = Worker("tests.ray_ranks:RankGroupBackend", str(spec_path), env={key: value, "CERTIFY_EXECUTOR": "ray"})
    session = CertifySession([load_spec(spec_path)], ["hf"], report_dir=tmp_path)
    check = PlannedCheck("raygroup", "logits", "megatron", "", "float32", "tp2pp1")
    try:
        out = tmp_path / "ok"
        out.mkdir()
        assert worker.call("group", {"kind": "ok", "world": 2, "out_dir": str(out)}, timeout=40)["ranks"] == \
            ["rank0.json", "rank1.json"]
        assert {json.loads(p.read_text())["sum"] for p in out.glob("*.json")} == {3.0}
        expected = {"raise": "rank 1 of 2 (Ray actor on 127.0.0.1) raised ValueError: planted failure",
                    "exit": "rank 1 of 2 (Ray actor on 127.0.0.1) died: its process exited (ActorDiedError",
                    "hang": "ranks [0, 1] of 2 (Ray actors) still running after the group timeout"}
        for kind, text in expected.items():
            marker = uuid.uuid4().hex
            started = time.monotonic()
            with session.judging(check) as box:  # as a suite body turns a worker failure into a row
                worker.call("group", {"kind": kind, "world": 2, "out_dir": str(tmp_path), "marker": marker},
                            timeout=40)
            verdict = box["verdict"]
            assert verdict.status == "error" and text in verdict.reason, verdict.reason
            assert f"rank 1 log tail ---\nrank 1 about to {kind}: {marker}" in verdict.reason, verdict.reason
            assert time.monotonic() - started < 40, "reported by the executor, not by the worker timeout"
            left = worker.call("leftovers", {}, timeout=60)
            assert left["ray"] and left["actors"] == [] and left["placement_groups"] == [], left
    finally:
        worker.close()
        session.close()
    _assert_nothing_left(value)


def test_the_spec_example_in_the_readme_parses():
    text = (REPO / "README.md").read_text()
    block = text[text.index("executor:                        #"):].split("\n```")[0]
    assert parse_spec(_spec("ex", **yaml.safe_load(block))).executor.kind == "ray"
