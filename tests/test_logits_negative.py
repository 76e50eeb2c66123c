"""Negative controls for logit parity: each planted template/converter bug must fail, naming layout, set and metric.

All bugs here survive the round trip; only megatron-core's forward on the converted weights exposes them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.prompts import prompt_sets
from harness.checks import logits
from harness.metrics import compare_files
from harness.tolerances import LOGIT_METRICS, resolve
from harness.workers import Worker

from .conftest import REPO, base_spec

DATA = REPO / "tests" / "data"
pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("megatron") is None, reason="megatron-core not installed")


class Rig:
    """One HF reference + one Megatron worker for a spec; runs a template at a layout and judges it (fp32)."""

    def __init__(self, spec_path: Path, tmp: Path):
        self.tmp = tmp
        self.hf = Worker("hf", str(spec_path))
        self.mcore = Worker("megatron", str(spec_path))
        cfg = base_spec()["reference"]
        self.ref_dir = self.hf.call("materialize", {"model_type": "qwen2", "overrides": cfg["config"],
                                                    "seed": cfg["seed"], "dtype": "float32", "path": None})["dir"]
        vocab = json.loads((Path(self.ref_dir) / "config.json").read_text())["vocab_size"]
        self.prompts = prompt_sets(vocab)
        self.reference = self.hf.call("logprobs", {"dir": self.ref_dir, "dtype": "float32", "prompts": self.prompts,
                                                   "out_path": str(tmp / "hf.safetensors")})["path"]

    def judge(self, template: str | None, tp: int, pp: int):
        out = self.tmp / f"{template}-{tp}-{pp}"
        run = self.mcore.call("logprobs", {"dir": self.ref_dir, "dtypes": ["float32"], "tp": tp, "pp": pp,
                                           "prompts": self.prompts, "out_dir": str(out), "template": template},
                              timeout=600)
        per_set = {} if run["load_problems"] else compare_files(self.reference, run["files"]["float32"], self.prompts)
        tolerance = resolve("float32", {}, list(LOGIT_METRICS))
        return logits.judge(per_set, tolerance, f"tp{tp}pp{pp} float32", run["load_problems"])

    def close(self):
        self.hf.close()
        self.mcore.close()


def _spec(tmp_path_factory, plugin: str) -> Path:
    folder = tmp_path_factory.mktemp("spec")
    spec = base_spec("buggy", plugins=[str(DATA / plugin)], dtypes=["float32"])
    import yaml

    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(_spec(tmp_path_factory, "buggy_templates.py"), tmp_path_factory.mktemp("rig"))
    yield r
    r.close()


def test_correct_template_passes_at_tp2(rig):
    verdict = rig.judge("qwen2", 2, 1)
    assert verdict.status == "passed", verdict.reason
    assert verdict.metrics["max_abs_logprob"] < 1e-4


@pytest.mark.parametrize("template", ["qwen2-qkv-concat", "qwen2-up-gate", "qwen2-transposed-proj",
                                      "qwen2-rope-unmapped"])
def test_planted_bug_fails_at_tp1(rig, template):
    verdict = rig.judge(template, 1, 1)
    assert verdict.status == "failed"
    assert "tp1pp1 float32 prompt set" in verdict.reason and "max_abs_logprob" in verdict.reason
    # the margin between the bug and the tolerance is what makes the check trustworthy
    assert verdict.metrics["max_abs_logprob"] > 100 * verdict.tolerance["max_abs_logprob"]


def test_swiglu_concat_only_shows_at_tp2(rig):
    assert rig.judge("qwen2-swiglu-concat", 1, 1).status == "passed"
    verdict = rig.judge("qwen2-swiglu-concat", 2, 1)
    assert verdict.status == "failed" and "tp2pp1" in verdict.reason


def test_layer_shift_at_pp2_fails(tmp_path_factory):
    shifted = Rig(_spec(tmp_path_factory, "layer_shift_plugin.py"), tmp_path_factory.mktemp("shift"))
    try:
        assert shifted.judge(None, 1, 1).status == "passed"  # one stage: the shift cannot happen
        verdict = shifted.judge(None, 1, 2)
        assert verdict.status == "failed" and "tp1pp2" in verdict.reason
    finally:
        shifted.close()
