"""`python -m harness calibrate`: a reduced grid through the real CLI, the citation in bound records and the
certificate, `verify` catching a changed calibration file, and one-line errors for a bad one."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import certificate
from harness.__main__ import main as harness_main
from harness.calibrate_summary import selftest_section
from harness.calibration import Citation, read, sha256_of
from harness.errors import SpecError
from harness.session import CertifySession
from harness.spec import load_spec
from harness.tolerances import LOGIT_METRICS, Calibration, cite, resolve
from harness.verdict import Verdict

from .conftest import REPO, base_spec

MEGATRON = importlib.util.find_spec("megatron") is not None
MODEL = "calq"
# a synthetic self-test results file: one strong log-prob catch, one too weak for bf16, one below the goal
SELFTEST = [
    {"mutation": "(none)", "status": "passed", "caught_by": [], "margin": None},
    {"mutation": "strong", "status": "caught", "caught_by": [f"{MODEL}/logits/megatron/float32/tp1pp1"],
     "margin": 5e4, "margin_from": {"key": "max_abs_logprob", "metric": "max_abs_logprob", "value": 5.0,
                                     "bound": 1e-4, "upper": True, "dtype": "float32"}},
    {"mutation": "subtle", "status": "caught", "caught_by": [f"{MODEL}/logits/megatron/float32/tp1pp1"],
     "margin": 500.0, "margin_from": {"key": "max_abs_logprob", "metric": "max_abs_logprob", "value": 0.05,
                                      "bound": 1e-4, "upper": True, "dtype": "float32"}},
    {"mutation": "weak", "status": "caught", "caught_by": [f"{MODEL}/train/deepspeed/zero0-ws1/float32"],
     "margin": 3.0},
    {"mutation": "prefix", "status": "caught", "caught_by": [f"{MODEL}/config/megatron"], "margin": "structural"},
]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One CLI run on a 1-checkpoint grid (HF, plus Megatron TP1 where it imports): (spec path, data, stdout)."""
    root = tmp_path_factory.mktemp("calibrate")
    specs = root / "specs"
    specs.mkdir()
    spec_path = specs / f"{MODEL}.yaml"
    spec_path.write_text(yaml.safe_dump(base_spec(MODEL, calibration="cal.json"), sort_keys=False))
    (root / "st").mkdir()
    (root / "st" / "selftest.json").write_text(json.dumps(SELFTEST))
    env = {**os.environ, "HARNESS_CACHE_DIR": str(root / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness", "calibrate", "--model-spec", str(spec_path),
                           "--out", str(specs / "cal.json"), "--seeds", "0", "--init-ranges", "0.1",
                           "--backends", "hf,megatron" if MEGATRON else "hf", "--selftest", str(root / "st"),
                           "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return spec_path, json.loads((specs / "cal.json").read_text()), proc.stdout


def test_reduced_grid_measures_noise_nondeterminism_and_bounds(calibrated):
    spec_path, data, out = calibrated
    assert data["model"] == MODEL and data["spec_sha256"] == sha256_of(spec_path)
    assert data["grid"]["seeds"] == [0] and data["grid"]["initializer_range"] == [0.1]
    assert set(data["grid"]["prompt_sets"]) == set(data["bfloat16"]["by_prompt_set"])
    noise = data["bfloat16"]["metrics"]["max_abs_logprob"]
    assert 0 < noise["measured"] < 1 and noise["at"]["seed"] == 0 and noise["at"]["prompt_set"]
    assert noise["per_run"] == noise["measured"]  # one checkpoint: the grid is the spec's own run
    bound = data["suggested"]["bfloat16"]["max_abs_logprob"]
    assert bound["value"] == pytest.approx(2 * noise["measured"]) and bound["grid_over_run"] == pytest.approx(1)
    assert data["nondeterminism"]["hf"]["float32"]["max_abs_diff"] == 0.0  # CPU: bitwise repeatable
    assert data["versions"]["torch"] and data["versions"]["transformers"] and data["generated"]
    if MEGATRON:
        fp32 = data["float32"]["metrics"]["max_abs_logprob"]
        assert 0 < fp32["measured"] < 1e-4 and fp32["headroom"] == pytest.approx(1e-4 / fp32["measured"])
        assert data["nondeterminism"]["megatron_tp1"]["float32"]["max_abs_diff"] == 0.0
    else:
        assert "not_run" in data["float32"]
    assert "## bf16 noise" in out and "prompt-length dependence" in out and "bitwise identical" in out
    read(spec_path.parent / "cal.json", MODEL)  # the file it wrote is one the harness cites


def test_selftest_margins_flag_the_goal_and_what_bf16_cannot_see(calibrated, tmp_path):
    _, data, out = calibrated
    st = data["selftest"]
    assert st["below_goal"] == ["weak"] and st["bf16_cannot_see"] == ["subtle"]
    rows = {r["mutation"]: r for r in st["mutations"]}
    assert rows["strong"]["bf16"]["visible"] is True and rows["subtle"]["bf16"]["derived_margin"] < 1
    assert "structural" in rows["prefix"]["bf16_note"] and "(none)" not in rows
    assert "**below goal**" in out and "**bf16 cannot see it**" in out
    absent = selftest_section(tmp_path / "nothing", MODEL, data["suggested"])
    assert "no self-test results" in absent["absent"] and "mutations" not in absent


def _session_with_rows(spec_path: Path):
    """A session on the spec with failed logits rows (fp32 and bf16) carrying real bound records."""
    session = CertifySession([load_spec(spec_path)], device=None)
    plan = {c.id: c for c in session.plans[MODEL]}
    calibration = Calibration("2 x HF-bf16 vs HF-fp32 noise, same prompts",
                              {"max_abs_logprob": 0.1, "mean_abs_logprob": 0.01, "top1_agreement": 1.0,
                               "topk_overlap": 1.0, "greedy_equal": 1.0, "mean_exp_abs_logprob": 1.01})
    for dtype in ("float32", "bfloat16"):
        check = plan[f"{MODEL}/logits/megatron/{dtype}/tp1pp1"]
        tolerance = resolve(dtype, {}, LOGIT_METRICS, calibration if dtype == "bfloat16" else None)
        session.add_result(MODEL, session.row(check, Verdict("failed", "planted", {}, tolerance)))
    return session


def test_bound_records_and_the_certificate_cite_the_calibration(calibrated, tmp_path):
    spec_path, data, _ = calibrated
    cert = _session_with_rows(spec_path).certificates()[MODEL]
    cal_path = spec_path.parent / "cal.json"
    assert cert["calibration"] == {"file": str(cal_path.resolve()), "sha256": sha256_of(cal_path),
                                   "generated": data["generated"]}
    rows = {c["id"]: c for c in cert["checks"]}
    bf16 = rows[f"{MODEL}/logits/megatron/bfloat16/tp1pp1"]["tolerance"]["max_abs_logprob"]
    measured = data["bfloat16"]["metrics"]["max_abs_logprob"]["measured"]
    assert bf16["source"] == "calibrated" and bf16["evidence"]["measured"] == measured
    assert bf16["evidence"]["grid_bound"] == pytest.approx(2 * measured)
    assert bf16["evidence"]["sha256"] == sha256_of(cal_path)
    fp32 = rows[f"{MODEL}/logits/megatron/float32/tp1pp1"]["tolerance"]["max_abs_logprob"]
    if MEGATRON:
        assert fp32["source"] == "default" and fp32["evidence"]["measured"] == data["float32"]["metrics"][
            "max_abs_logprob"]["measured"]
    assert "calibration: `" in certificate.render_markdown(cert)
    citation = Citation(cal_path, sha256_of(cal_path), read(cal_path, MODEL))
    exact = resolve("float32", {}, ["roundtrip_max_abs_diff"]).records  # not a log-prob suite: nothing to cite
    assert "evidence" not in cite(exact, "roundtrip", "float32", citation)["roundtrip_max_abs_diff"]
    # a spec value is the spec's, not the calibration's: no evidence is claimed for it
    spec_bound = resolve("bfloat16", {"bfloat16": {"max_abs_logprob": 0.5}}, ["max_abs_logprob"]).records
    assert "evidence" not in cite(spec_bound, "logits", "bfloat16", citation)["max_abs_logprob"]


def _verify(cert: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    path = tmp_path / f"cert-{len(list(tmp_path.glob('cert-*')))}.json"
    path.write_text(json.dumps(cert))
    status = harness_main(["verify", str(path)])
    return status, capsys.readouterr().out.strip()


def test_verify_checks_the_cited_calibration_file(calibrated, tmp_path, capsys):
    spec_path, _, _ = calibrated
    cert = _session_with_rows(spec_path).certificates()[MODEL]
    status, out = _verify(cert, tmp_path, capsys)
    assert status == 0 and out.startswith("OK "), out

    forged = copy.deepcopy(cert)  # evidence that is not what the file measured
    bound = next(c for c in forged["checks"] if c["id"] == f"{MODEL}/logits/megatron/bfloat16/tp1pp1")["tolerance"]
    bound["max_abs_logprob"]["evidence"]["measured"] = 1e-9
    forged["integrity"] = certificate.seal(forged, key="")
    status, out = _verify(forged, tmp_path, capsys)
    assert status == 1 and "bound max_abs_logprob evidence" in out

    uncited = copy.deepcopy(cert)  # evidence, but no calibration file cited
    uncited["calibration"] = None
    uncited["integrity"] = certificate.seal(uncited, key="")
    status, out = _verify(uncited, tmp_path, capsys)
    assert status == 1 and "cites none" in out

    cal_path = spec_path.parent / "cal.json"
    original = cal_path.read_text()
    try:
        cal_path.write_text(original.replace('"model"', ' "model"', 1))  # the same JSON, other bytes
        status, out = _verify(cert, tmp_path, capsys)
        assert status == 1 and "calibration:" in out and "changed since the run" in out
        cal_path.unlink()
        status, out = _verify(cert, tmp_path, capsys)
        assert status == 1 and "does not exist here" in out
    finally:
        cal_path.write_text(original)


@pytest.mark.parametrize("content, key, words", [
    ("{not json", None, "malformed JSON"),
    ('{"calibration_version": 1, "model": "llama", "generated": "x", "float32": {"metrics": {}}, '
     '"bfloat16": {"metrics": {}}}', "model", "calibrates 'llama'"),
    ('{"calibration_version": 1, "model": "calq"}', "generated", "required key is missing"),
    ('{"calibration_version": 1, "model": "calq", "generated": "x", "float32": {"metrics": {}}, '
     '"bfloat16": {"metrics": {"max_abs_logprob": {"measured": "big"}}}}', "bfloat16.metrics.max_abs_logprob.measured",
     "not a finite number"),
    (None, "calibration", "does not exist"),
])
def test_a_bad_calibration_file_is_one_line_naming_file_and_key(tmp_path, capsys, content, key, words):
    spec_path = tmp_path / f"{MODEL}.yaml"
    spec_path.write_text(yaml.safe_dump(base_spec(MODEL, calibration="bad.json"), sort_keys=False))
    if content is not None:
        (tmp_path / "bad.json").write_text(content)
    assert harness_main(["validate", str(spec_path)]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    named = spec_path if content is None else tmp_path / "bad.json"
    assert err.startswith(f"{named}: {key}:" if key else f"{named}: ")
    with pytest.raises(SpecError):  # the certification session refuses it the same way
        CertifySession([load_spec(spec_path)])


def test_a_certification_run_with_a_bad_calibration_file_stops_with_one_line(tmp_path):
    spec_path = tmp_path / f"{MODEL}.yaml"
    spec_path.write_text(yaml.safe_dump(base_spec(MODEL, calibration="bad.json"), sort_keys=False))
    (tmp_path / "bad.json").write_text("[1, 2")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--model-spec",
                           str(spec_path), "--report-dir", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert f"{tmp_path / 'bad.json'}: not a calibration file (malformed JSON" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_bad_grid_options_are_one_line_errors():
    from harness.calibrate import main

    with pytest.raises(SystemExit, match="--seeds: 'a,b' is not a comma list"):
        main(["--model", "qwen2", "--seeds", "a,b"])
