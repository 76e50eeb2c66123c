"""ROLL's own llama, qwen3 and mistral templates (tests/data/roll_<family>_template.py: only the imports changed),
each a user's plugin of an external spec, certified in ONE subprocess run (`pytest --model-spec ... x5`), Megatron +
HF, fp32, TP1/TP2/PP2 (train left out, as in tests/test_end_to_end.py: it has its own tests; its rows stay not_run).

ROLL's templates map no sliding window at all: on a reference whose window is active, mistral's (and qwen3's, with
use_sliding_window) must fail config naming sliding_window, and logit parity with it. Without a window they pass
every check that runs. Mistral's reference keeps head_dim = hidden_size / heads here: ROLL's mistral template does
not map head_dim either (a second real bug, for Mistral-Nemo-like configs), and this test isolates the window.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, CertifyRun
from .test_end_to_end import SELECT, _assert_contract, _assert_runnable_checks_pass

DATA = Path(__file__).resolve().parent / "data"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
LAYOUTS = [{"tp": 1, "pp": 1}, {"tp": 2, "pp": 1}, {"tp": 1, "pp": 2}]
# spec name -> (ROLL family, reference overrides on model_specs/<family>.yaml, layouts)
SPECS = {
    "roll-llama": ("llama", {}, LAYOUTS),
    "roll-qwen3": ("qwen3", {"use_sliding_window": False}, LAYOUTS),  # as every released Qwen3 config
    "roll-mistral": ("mistral", {"head_dim": 32, "sliding_window": None}, LAYOUTS),
    "roll-mistral-window": ("mistral", {"head_dim": 32}, LAYOUTS[:1]),  # sliding_window 16: active
    "roll-qwen3-window": ("qwen3", {}, LAYOUTS[:1]),
}
FAILING = {"roll-mistral-window", "roll-qwen3-window"}


def _spec(name: str, family: str, overrides: dict, layouts: list) -> dict:
    spec = yaml.safe_load((REPO / "model_specs" / f"{family}.yaml").read_text())
    spec.update(name=name, plugins=[f"roll_{family}_template.py"], converter={"template": family},
                backends={"train": ["megatron"], "infer": ["hf"]}, dtypes=["float32"], parallel=layouts)
    spec["reference"]["config"].update(overrides)
    spec.pop("calibration", None)  # the family's bf16 calibration file: this run is fp32 and lives elsewhere
    return spec


@pytest.fixture(scope="module")
def roll_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("roll-specs")
    paths = {}
    for name, (family, overrides, layouts) in SPECS.items():
        (folder / f"roll_{family}_template.py").write_text((DATA / f"roll_{family}_template.py").read_text())
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(_spec(name, family, overrides, layouts), sort_keys=False))
    report_dir = folder / "reports"
    args = [a for p in paths.values() for a in ("--model-spec", str(p))]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "CERTIFY_DEVICE": "cpu"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--report-dir",
                           str(report_dir), *args, *SELECT, "-k", "not test_train"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    return CertifyRun(proc, report_dir), paths


def _check(cert: dict, suffix: str) -> dict:
    return next(c for c in cert["checks"] if c["id"] == f"{cert['model']}/{suffix}")


@pytest.mark.parametrize("name", sorted(set(SPECS) - FAILING))
def test_roll_template_without_a_window_passes_every_check_that_runs(roll_run, name):
    run, paths = roll_run
    cert = run.certificate(name)
    _assert_contract(cert, paths[name], name)
    _assert_runnable_checks_pass(cert, skipped_suites=("train",))
    assert {f"{name}/logits/megatron/float32/{layout}" for layout in ("tp1pp1", "tp2pp1", "tp1pp2")} <= {
        c["id"] for c in cert["checks"] if c["status"] == "passed"}
    config = _check(cert, "config/megatron")["metrics"]
    assert config["unknown_backend_keys"] == []  # rope_scaling (llama) and qk_layernorm (qwen3) are understood
    assert "rope_theta" in config["template_reads_absent_keys"]  # transformers 5 moved it into rope_parameters


def test_roll_llama_rope_scaling_is_read_as_no_scaling(roll_run):
    keys = _check(roll_run[0].certificate("roll-llama"), "config/megatron")["metrics"]["keys"]
    assert keys["rope_parameters"]["state"] == "mapped"
    assert keys["rope_parameters"]["hf"]["scaling"] is None and keys["rope_parameters"]["backend"]["scaling"] is None


def test_roll_qwen3_builds_the_qk_layernorm(roll_run):
    cert = roll_run[0].certificate("roll-qwen3")
    shapes = _check(cert, "roundtrip/megatron/names-shapes")
    assert shapes["status"] == "passed", shapes["reason"]
    assert _check(cert, "config/megatron")["metrics"]["keys"]["use_sliding_window"]["state"] == "inactive"


@pytest.mark.parametrize("name", sorted(FAILING))
def test_roll_template_with_an_active_window_fails_config_naming_sliding_window(roll_run, name):
    run, paths = roll_run
    assert run.returncode == 1, run.output[-3000:]
    cert = run.certificate(name)
    _assert_contract(cert, paths[name], name)
    assert cert["verdict"] == "failed"
    config = _check(cert, "config/megatron")
    assert config["status"] == "failed" and "sliding_window: hf=[16, 16] but backend=[None, None]" in config["reason"]
    # the window is the bug, and it is not cosmetic: Megatron attends to the whole prefix
    logits = _check(cert, "logits/megatron/float32/tp1pp1")
    assert logits["status"] == "failed" and "max_abs_logprob" in logits["reason"]
    failed = {c["id"].split("/", 1)[1] for c in cert["checks"] if c["status"] in ("failed", "error")}
    assert failed == {"config/megatron", "logits/megatron/float32/tp1pp1"}, failed
