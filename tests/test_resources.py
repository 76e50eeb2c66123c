"""Per-worker resources in the certificate: wall time and peak RSS of each worker's process group, and the
spec's peak_rss_bound judged on them (a worker over the bound fails the certificate, verify re-judges it)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import certificate
from harness.report.html import render_model_page
from harness.verify import Invalid, verify
from harness.workers import ResourceMeter, merge_records

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# A parent holding 200 MiB that starts a child holding 300 MiB: both alive together for a second.
_FAMILY = """
import subprocess, sys, time
held = bytearray(200 << 20)
child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(300 << 20); time.sleep(1.5)"])
child.wait()
"""


def test_meter_sums_the_whole_process_group_and_keeps_each_high_water_mark():
    proc = subprocess.Popen([sys.executable, "-c", _FAMILY], start_new_session=True)
    meter = ResourceMeter(proc.pid)
    proc.wait(timeout=60)
    meter.stop()
    record = meter.record()
    # counting only the worker (the leader) would give ~200 MiB; the child alone ~300 MiB
    assert record["peak_rss_bytes"] >= 480 * MIB, record
    assert 290 * MIB <= record["largest_process_rss_bytes"] < 480 * MIB, record
    assert record["processes"] == 2 and record["wall_s"] >= 1.5


# A parent that maps and reads a 300 MiB file, then forks two children that read the same pages: three
# processes share one copy (RSS 300 MiB each, PSS 100 MiB each).
_SHARED = """
import mmap, os, sys, time
with open(sys.argv[1], "rb") as handle:
    pages = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
touched = sum(pages[i] for i in range(0, len(pages), 4096))
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        touched = sum(pages[i] for i in range(0, len(pages), 4096))
        time.sleep(1.5)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


def test_pages_shared_by_a_groups_processes_count_once(tmp_path):
    """The group's total is its members' PSS (a library every rank maps is one copy), not their RSS summed."""
    shared = tmp_path / "shared.bin"
    shared.write_bytes(os.urandom(300 * MIB))
    proc = subprocess.Popen([sys.executable, "-c", _SHARED, str(shared)], start_new_session=True)
    meter = ResourceMeter(proc.pid)
    proc.wait(timeout=60)
    meter.stop()
    record = meter.record()
    assert record["processes"] == 3, record
    assert record["largest_process_rss_bytes"] >= 300 * MIB, record  # each member holds all of it resident
    # summed RSS would be >= 900 MiB; one copy plus three interpreters is well under 600
    assert 300 * MIB <= record["peak_rss_bytes"] < 600 * MIB, record


def test_a_restarted_worker_adds_wall_time_and_keeps_the_larger_peak():
    a = {"wall_s": 2.0, "peak_rss_bytes": 10, "largest_process_rss_bytes": 8, "processes": 3}
    b = {"wall_s": 1.5, "peak_rss_bytes": 7, "largest_process_rss_bytes": 9, "processes": 1}
    assert merge_records(a, b) == {"wall_s": 3.5, "peak_rss_bytes": 10, "largest_process_rss_bytes": 9,
                                   "processes": 4}


def test_judging_names_every_worker_over_the_bound_and_never_passes_on_nothing():
    workers = {"hf": {"wall_s": 1.0, "peak_rss_bytes": 3 << 30, "largest_process_rss_bytes": 3 << 30, "processes": 1},
               "megatron": {"wall_s": 1.0, "peak_rss_bytes": 9 << 30, "largest_process_rss_bytes": 4 << 30,
                            "processes": 3}}
    failed = certificate.judge_resources(workers, 2 << 30, 3.0, 2.0)  # limit 8 GiB
    assert failed["status"] == "failed" and failed["limit_bytes"] == 8 << 30
    assert "megatron peaked at 9.00 GiB > 8.00 GiB" in failed["reason"] and "hf" not in failed["reason"]
    passed = certificate.judge_resources(workers, 3 << 30, 3.0, 2.0)
    assert passed["status"] == "passed" and "worst megatron" in passed["reason"]
    assert certificate.judge_resources(workers, None, 3.0, 2.0)["status"] == "not_run"
    assert certificate.judge_resources({}, 2 << 30, 3.0, 2.0)["status"] == "not_run"


def test_a_worker_that_trained_is_judged_against_the_train_limit_where_the_spec_sets_one():
    workers = {"vllm/float32": {"wall_s": 1.0, "peak_rss_bytes": 7 << 30, "largest_process_rss_bytes": 7 << 30,
                                "processes": 1, "trains": False},
               "megatron": {"wall_s": 1.0, "peak_rss_bytes": 12 << 30, "largest_process_rss_bytes": 9 << 30,
                            "processes": 2, "trains": True}}
    # 3 x 2 GiB + 2 GiB = 8 GiB for inference; 6 x 2 GiB + 2 GiB = 14 GiB for a worker that trained
    judged = certificate.judge_resources(workers, 2 << 30, 3.0, 2.0, train_factor=6.0)
    assert judged["status"] == "passed" and judged["train_limit_bytes"] == 14 << 30, judged
    assert judged["reason"] == "worst vllm/float32 at 7.00 GiB, 0.88 of 8.00 GiB"
    workers["vllm/float32"]["trains"] = True  # the same peaks, had the engine trained: both within 14 GiB
    assert certificate.judge_resources(workers, 2 << 30, 3.0, 2.0, train_factor=6.0)["status"] == "passed"
    workers["vllm/float32"]["trains"] = False
    workers["vllm/float32"]["peak_rss_bytes"] = 9 << 30  # over 8 GiB: the train limit is never an engine's
    failed = certificate.judge_resources(workers, 2 << 30, 3.0, 2.0, train_factor=6.0)
    assert failed["status"] == "failed" and failed["reason"] == "vllm/float32 peaked at 9.00 GiB > 8.00 GiB"
    # without a train factor every worker gets the one limit
    assert "megatron peaked at 12.00 GiB" in certificate.judge_resources(workers, 2 << 30, 3.0, 2.0)["reason"]


def _spec(tmp_path: Path, name: str, bound: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        hf_model_type: qwen2
        plugins: [harness.templates.qwen2]
        reference:
          config: {{vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                    num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: false}}
        backends: {{train: [], infer: [hf]}}
        dtypes: [float32]
        peak_rss_bound: {bound}
        """))
    return path


def _certify(spec: Path, report_dir: Path) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--model-spec", str(spec),
                           "--report-dir", str(report_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    path = report_dir / spec.stem / "certificate.json"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same HF-only certification twice: under a generous bound, and under one no process fits in."""
    tmp = tmp_path_factory.mktemp("resources")
    generous = _certify(_spec(tmp, "res-ok", "{checkpoint_factor: 3, extra_gib: 2}"), tmp / "reports")
    tight = _certify(_spec(tmp, "res-tight", "{checkpoint_factor: 1, extra_gib: 0}"), tmp / "reports")
    return tmp, generous, tight


def test_a_certificate_records_each_workers_resources_and_passes_its_bound(runs):
    tmp, cert, _ = runs
    assert cert["verdict"] == "certified", cert["summary"]
    hf = cert["resources"]["workers"]["hf"]
    assert hf["wall_s"] > 0 and hf["peak_rss_bytes"] > 100 * MIB  # torch + transformers are resident
    bound = cert["resources"]["bound"]
    # the fp32 reference: ~100k parameters × 4 bytes, measured from the materialized files
    assert 300_000 < bound["checkpoint_bytes"] < 2_000_000
    assert bound["status"] == "passed" and bound["limit_bytes"] == 3 * bound["checkpoint_bytes"] + (2 << 30)
    verify(tmp / "reports" / "res-ok" / "certificate.json")
    assert "| hf |" in (tmp / "reports" / "res-ok" / "summary.md").read_text()
    assert "peak RSS bound" in render_model_page(cert)


def test_a_worker_over_its_bound_fails_the_certificate(runs):
    tmp, _, cert = runs
    bound = cert["resources"]["bound"]
    assert bound["status"] == "failed" and bound["reason"].startswith("hf peaked at ")
    assert cert["verdict"] == "failed" and "peak RSS over its bound: hf peaked at" in cert["summary"]
    verify(tmp / "reports" / "res-tight" / "certificate.json")  # an honest failure verifies


def _resealed(cert: dict) -> dict:
    cert = copy.deepcopy(cert)
    cert["integrity"] = certificate.seal(cert, key="")
    return cert


def test_verify_rejudges_the_bound_from_the_recorded_peaks(runs, tmp_path, monkeypatch):
    monkeypatch.delenv(certificate.SIGNING_KEY_ENV, raising=False)
    _, cert, _ = runs

    def check(edited: dict) -> str:
        path = tmp_path / "certificate.json"
        path.write_text(json.dumps(_resealed(edited)))
        with pytest.raises(Invalid) as exc:
            verify(path)
        return str(exc.value)

    inflated = copy.deepcopy(cert)  # a peak over the limit, the bound still saying passed
    inflated["resources"]["workers"]["hf"]["peak_rss_bytes"] = inflated["resources"]["bound"]["limit_bytes"] + 1
    assert "bound's reason, status" in check(inflated)
    trained = copy.deepcopy(cert)  # an HF-only run has no train row: hf may not claim the train limit
    trained["resources"]["workers"]["hf"]["trains"] = True
    assert "hf marked as having trained, but no train or refit row ran there" in check(trained)
    dropped = copy.deepcopy(cert)  # the spec asks for a bound: leaving it out is not allowed
    del dropped["resources"]["bound"]
    assert "records no judged bound" in check(dropped)


def test_the_page_shows_the_train_limit_where_the_spec_sets_one():
    cert = json.loads((REPO / "reports" / "examples" / "qwen2_5_0_5b_shape-cpu" / "certificate.json").read_text())
    page = render_model_page(cert)
    # the bound, and the worst worker judged against the limit that applies to it (DeepSpeed trained)
    assert "a worker that trained: 7.0 × checkpoint + 2.0 GiB" in page
    assert "worst deepspeed at 13.70 GiB, 0.92 of 14.88 GiB (its train limit)" in page
