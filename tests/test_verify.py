"""`python -m harness verify`: a real certificate verifies; hand-edited ones are rejected with a reason."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from harness import certificate
from harness.__main__ import main as harness_main
from harness.verify import schema, tolerance_violations

REPO = Path(__file__).resolve().parent.parent
QWEN2_SPEC = REPO / "model_specs" / "qwen2.yaml"


@pytest.fixture(scope="module")
def real_cert_path(tmp_path_factory) -> Path:
    """One real certificate, written by the harness (HF backend only: ~20 s)."""
    report_dir = tmp_path_factory.mktemp("reports")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--model", "qwen2",
                           "--backend", "hf", "--report-dir", str(report_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    path = report_dir / "qwen2" / "certificate.json"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return path


@pytest.fixture
def real_cert(real_cert_path) -> dict:
    return json.loads(real_cert_path.read_text())


@pytest.fixture
def verify(tmp_path, capsys):
    """Write `cert` (a dict, or raw text) and run the CLI on it: (exit status, output lines)."""
    counter = iter(range(1000))

    def _verify(*certs, spec: Path | None = None, extra: list[str] | None = None) -> tuple[int, list[str]]:
        paths = []
        for cert in certs:
            path = tmp_path / f"cert{next(counter)}" / "certificate.json"
            path.parent.mkdir()
            path.write_text(cert if isinstance(cert, str) else json.dumps(cert, indent=2))
            paths.append(str(path))
        argv = ["verify", *paths, *(["--spec", str(spec)] if spec else []), *(extra or [])]
        status = harness_main(argv)
        return status, capsys.readouterr().out.splitlines()

    return _verify


def _passed(cert: dict, id_part: str) -> dict:
    return next(c for c in cert["checks"] if id_part in c["id"] and c["status"] == "passed")


# ---- the schema itself ----

def test_schema_is_a_valid_draft_2020_12_schema_for_this_version():
    Draft202012Validator.check_schema(schema())
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema()["properties"]["certificate_version"]["const"] == certificate.CERTIFICATE_VERSION
    assert schema()["$id"].endswith(f"v{certificate.CERTIFICATE_VERSION}")


def test_schema_statuses_are_the_verdict_statuses():
    from typing import get_args

    from harness.verdict import Status

    assert set(schema()["$defs"]["check"]["properties"]["status"]["enum"]) == set(get_args(Status))


# ---- real certificates ----

def reseal(cert: dict) -> dict:
    """What a careful forger does after an edit: recompute the sha256 seal (no signing key)."""
    cert["integrity"] = certificate.seal(cert, key="")
    return cert


def test_real_certificate_verifies_via_the_cli(real_cert_path):
    proc = subprocess.run([sys.executable, "-m", "harness", "verify", str(real_cert_path), "--spec", str(QWEN2_SPEC)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"OK {real_cert_path}: incomplete (CPU scope not run here: ")


def test_real_certificate_records_bounds_with_their_source(real_cert):
    # so that the tolerance tests below edit a check the harness really wrote
    check = _passed(real_cert, "/save-load/")
    assert check["tolerance"] == {"save_load_max_abs_diff": {"value": 0.0, "metric": "max_abs_diff", "upper": True,
                                                             "source": "default"}}
    assert check["metrics"]["max_abs_diff"] == 0.0 and check["scope"] == "cpu"
    assert real_cert["spec_text"] == QWEN2_SPEC.read_text()
    lmdeploy_fp32 = next(c for c in real_cert["checks"] if c["id"] == "qwen2/logits/lmdeploy/float32")
    assert lmdeploy_fp32["status"] == "not_applicable" and "no float32" in lmdeploy_fp32["reason"]


# ---- tampered certificates: each rejected with its one-line reason, even after resealing ----

def test_the_forgery_from_the_issue_is_rejected(verify, real_cert):
    """Delete every row that is not passed and call it certified: the plan is rebuilt from the spec."""
    cert = copy.deepcopy(real_cert)
    cert["checks"] = [c for c in cert["checks"] if c["status"] == "passed"]
    cert["verdict"] = "certified"
    cert["scopes"], cert["summary"] = certificate.scope_verdicts(cert["checks"]), certificate.summary_line(cert["checks"])
    for spec in (None, QWEN2_SPEC):
        status, out = verify(reseal(cert), spec=spec)
        assert status == 1 and "planned check(s) missing: 'qwen2/config/vllm'" in out[0], out


def _tamper(cert: dict, how: str) -> dict:
    checks = cert["checks"]
    if how == "rows deleted":
        del checks[-1]
    elif how == "status flipped":
        row = next(c for c in checks if c["status"] == "not_run" and c["suite"] == "logits")
        row["status"], row["reason"] = "passed", ""
    elif how == "metric edited":
        _passed(cert, "/save-load/")["metrics"]["max_abs_diff"] = 0.5
    elif how == "tolerance loosened":
        _passed(cert, "/save-load/")["tolerance"]["save_load_max_abs_diff"]["value"] = 1.0
    elif how == "verdict edited":
        cert["verdict"] = "certified"
    elif how == "spec swapped":
        cert["spec_text"] = cert["spec_text"].replace("rope_theta: 1000000.0", "rope_theta: 10000.0")
    elif how == "versions edited":
        cert["versions"]["transformers"] = "not installed"
    elif how == "row moved to another model":
        row = copy.deepcopy(_passed(cert, "/save-load/"))
        cert["model"] = "llama"
    elif how == "scope edited":
        next(c for c in checks if c["backend"] == "sglang")["scope"] = "cpu"
    elif how == "not_applicable claimed":
        row = next(c for c in checks if c["id"] == "qwen2/logits/vllm/bfloat16")
        row["status"], row["reason"] = "not_applicable", "vLLM has no bf16"
    return cert


TAMPERING = {
    "rows deleted": "planned check(s) missing",
    "status flipped": "is passed without the bounds its suite judges",
    "metric edited": "is passed but max_abs_diff = 0.5 > save_load_max_abs_diff 0.0",
    "tolerance loosened": "bound save_load_max_abs_diff value is 1.0, the harness derives 0.0",
    "verdict edited": "verdict 'certified' but the checks",
    "spec swapped": "spec_text is not the spec whose sha256 is recorded",
    "versions edited": "versions: hf checks passed, but transformers is not recorded as installed",
    "row moved to another model": "the certificate is for model 'llama' but its spec is 'qwen2'",
    "scope edited": "has scope 'cpu'; its backend declares 'gpu'",
    "not_applicable claimed": "is not_applicable but the backend declares it possible",
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampering_is_rejected_with_its_reason(verify, real_cert, how):
    edited = _tamper(copy.deepcopy(real_cert), how)
    status, out = verify(edited)  # not resealed: the seal alone catches it
    assert status == 1 and "integrity: the body's sha256" in out[0], out
    status, out = verify(reseal(edited))  # resealed: the re-derivation catches it
    assert status == 1 and TAMPERING[how] in out[0], out
    assert len(out) == 1


def test_a_signing_key_makes_resealing_useless(verify, real_cert, monkeypatch):
    monkeypatch.setenv(certificate.SIGNING_KEY_ENV, "ci-secret")
    status, out = verify(real_cert)  # written without the key: unsigned
    assert status == 1 and "not signed" in out[0]
    signed = copy.deepcopy(real_cert)
    signed["integrity"] = certificate.seal(signed, key="ci-secret")
    assert verify(signed)[0] == 0
    forged = copy.deepcopy(signed)
    forged["created"] = "2030-01-01T00:00:00+00:00"
    forged["integrity"] = certificate.seal(forged, key="a guess")
    status, out = verify(forged)
    assert status == 1 and "HMAC does not match" in out[0]


def test_a_failed_row_beyond_its_tolerance_is_consistent(verify, real_cert):
    cert = copy.deepcopy(real_cert)
    check = _passed(cert, "/save-load/")
    check["metrics"]["max_abs_diff"] = 0.5
    check["status"], check["reason"] = "failed", "1 differences after save->load: ..."
    cert["verdict"] = "failed"
    cert["scopes"], cert["summary"] = certificate.scope_verdicts(cert["checks"]), certificate.summary_line(cert["checks"])
    status, out = verify(reseal(cert))
    assert status == 0 and out[0].split(": ", 1)[1].startswith("failed"), out


@pytest.mark.parametrize("where", ["top", "check"])
def test_rejects_missing_required_key(verify, real_cert, where):
    cert = copy.deepcopy(real_cert)
    if where == "top":
        del cert["spec_sha256"]
    else:
        del cert["checks"][3]["status"]
    status, out = verify(cert)
    assert status == 1 and "schema:" in out[0] and "'" + ("spec_sha256" if where == "top" else "status") in out[0]
    if where == "check":
        assert "checks/3" in out[0]


def test_rejects_unknown_status_value(verify, real_cert):
    cert = copy.deepcopy(real_cert)
    cert["checks"][0]["status"] = "skipped"
    status, out = verify(cert)
    assert status == 1 and "schema: checks/0/status: 'skipped' is not one of" in out[0]


def test_rejects_unknown_verdict_and_extra_keys(verify, real_cert):
    cert = copy.deepcopy(real_cert)
    cert["verdict"] = "certified-ish"
    assert verify(cert)[0] == 1
    cert = copy.deepcopy(real_cert)
    cert["checks"][0]["waived"] = True
    status, out = verify(cert)
    assert status == 1 and "'waived' was unexpected" in out[0]


def test_rejects_duplicate_check_ids(verify, real_cert):
    cert = copy.deepcopy(real_cert)
    cert["checks"].append(copy.deepcopy(cert["checks"][0]))
    status, out = verify(reseal(cert))
    assert status == 1 and f"duplicate check id {cert['checks'][0]['id']!r}" in out[0]


def test_rejects_check_id_that_does_not_match_its_fields(verify, real_cert):
    cert = copy.deepcopy(real_cert)
    cert["checks"][0]["id"] = cert["checks"][0]["id"].replace("qwen2/", "llama/", 1)
    status, out = verify(reseal(cert))
    assert status == 1 and "does not match its fields" in out[0]


def test_spec_hash(verify, real_cert, tmp_path):
    assert verify(real_cert, spec=QWEN2_SPEC)[0] == 0
    edited = tmp_path / "qwen2.yaml"
    edited.write_text(QWEN2_SPEC.read_text().replace("rope_theta: 1000000.0", "rope_theta: 10000.0"))
    status, out = verify(real_cert, spec=edited)
    assert status == 1 and "spec_sha256" in out[0] and f"is not the sha256 of {edited}" in out[0]


def test_spec_for_another_model_is_rejected(verify, real_cert):
    status, out = verify(real_cert, spec=REPO / "model_specs" / "llama.yaml")
    assert status == 1 and "no --spec given for model 'qwen2'" in out[0]


@pytest.mark.parametrize("text", ["", "{\"model\": ", "not json at all", "[1, 2"])
def test_rejects_not_json(verify, text):
    status, out = verify(text)
    assert status == 1 and ": not JSON: " in out[0]


def test_rejects_non_object_json_and_duplicate_json_keys(verify, real_cert):
    assert verify("[]")[0] == 1
    text = json.dumps(real_cert).replace('"verdict": "incomplete"', '"verdict": "incomplete", "verdict": "certified"', 1)
    status, out = verify(text)
    assert status == 1 and "JSON key 'verdict' appears twice" in out[0]


def test_rejects_unsupported_version(verify, real_cert):
    cert = copy.deepcopy(real_cert)
    cert["certificate_version"] = 1
    status, out = verify(cert)
    assert status == 1 and "unsupported certificate_version 1" in out[0]


def test_missing_file_and_several_certificates(verify, real_cert, tmp_path, capsys):
    bad = copy.deepcopy(real_cert)
    bad["checks"][1]["status"] = "bogus"
    status, out = verify(real_cert, bad)
    assert status == 1 and out[0].startswith("OK ") and out[1].startswith("INVALID ") and len(out) == 2
    assert harness_main(["verify", str(tmp_path / "absent.json")]) == 1
    assert "INVALID" in capsys.readouterr().out


# ---- the generic tolerance rule, on the metric shapes the suites record ----

def _check(metrics: dict, tolerance: dict) -> dict:
    from harness.tolerances import as_records

    return {"status": "passed", "metrics": metrics, "tolerance": as_records(tolerance)}


LOGIT_TOL = {"max_abs_logprob": 1e-4, "mean_abs_logprob": 1e-5, "min_top1_agreement": 1.0,
             "min_topk_overlap": 0.99, "min_greedy_equal": 1.0, "max_mean_exp_abs_logprob": 1.0001}
LOGIT_OK = {"max_abs_logprob": 5e-5, "mean_abs_logprob": 1e-6, "top1_agreement": 1.0, "topk_overlap": 1.0,
            "greedy_equal": 1.0, "mean_exp_abs_logprob": 1.00001, "per_set": {"a": {"max_abs_logprob": 9.0}}}


def test_tolerance_rule_on_logit_metrics():
    assert tolerance_violations(_check(LOGIT_OK, LOGIT_TOL)) == []  # nested per_set values are not judged
    for metric, value, expected in [("max_abs_logprob", 2e-4, "max_abs_logprob = 0.0002 > max_abs_logprob"),
                                    ("mean_abs_logprob", 1e-4, "mean_abs_logprob = 0.0001 > mean_abs_logprob"),
                                    ("top1_agreement", 0.875, "top1_agreement = 0.875 < min_top1_agreement"),
                                    ("mean_exp_abs_logprob", 1.5, "mean_exp_abs_logprob = 1.5 > max_mean_exp")]:
        problems = tolerance_violations(_check({**LOGIT_OK, metric: value}, LOGIT_TOL))
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_tolerance_rule_is_conservative():
    # nothing to match, non-numeric, bool, or nested: not judged
    assert tolerance_violations(_check({"forward": {"unconsumed": {"x": 1}}}, {"unconsumed": 0})) == []
    assert tolerance_violations(_check({"expected": 17, "produced": 17}, {"mismatches": 0})) == []
    assert tolerance_violations(_check({"max_abs_diff": "n/a"}, {"roundtrip_max_abs_diff": 0.0})) == []
    assert tolerance_violations(_check({"missing_keys": True}, {"missing_keys": 0})) == []
    # a bound names its metric: the roundtrip bound judges max_abs_diff, nothing else
    assert tolerance_violations(_check({"max_abs_diff": 1.0}, {"roundtrip_max_abs_diff": 0.0})) != []
    assert tolerance_violations(_check({"roundtrip_max_abs_diff": 1.0}, {"roundtrip_max_abs_diff": 0.0})) == []
    # NaN never satisfies a bound
    assert tolerance_violations(_check({"max_abs_diff": math.nan}, {"roundtrip_max_abs_diff": 0.0}))


def test_a_train_rows_routing_bounds_are_re_derived_at_the_routing_suites_factor():
    """An MoE train row judges its routing by the routing suite's rules (2 x HF-bf16's routing noise) while
    its loss/grad/weight bounds are 4 x: verify re-derives each at its own factor."""
    from harness.spec import load_spec, spec_path_for
    from harness.tolerances import Calibration, record
    from harness.verify import _expected_bound

    spec = load_spec(spec_path_for("qwen2_moe"))
    check = {"suite": "train", "dtype": "bfloat16"}
    for key, noise, factor in (("max_router_prob_diff_mean", 1e-3, 2.0), ("max_loss_diff", 1e-3, 4.0)):
        bound = record(key, "bfloat16", spec.tolerances, Calibration("m", {key: noise}, factor))
        assert bound["value"] == pytest.approx(noise * factor)
        assert _expected_bound(check, key, bound, spec) == bound, key


@pytest.mark.parametrize("example", sorted(p.parent.name for p in (REPO / "reports" / "examples").glob("*/certificate.json")))
def test_every_example_certificate_still_verifies(example):
    """The certificates the README points at are re-judged by today's verify (their embedded specs)."""
    path = REPO / "reports" / "examples" / example / "certificate.json"
    proc = subprocess.run([sys.executable, "-m", "harness", "verify", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"OK {path}"), proc.stdout + proc.stderr
