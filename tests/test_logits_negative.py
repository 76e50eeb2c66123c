"""Negative controls for logit parity: each planted template/converter bug must fail, naming layout, set and metric.

All bugs here survive the round trip; only megatron-core's forward on the converted weights exposes them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.prompts import prompt_sets
from harness.checks import logits
from harness.workers import Worker

from .conftest import REPO, base_spec

DATA = REPO / "tests" / "data"
pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("megatron") is None, reason="megatron-core not installed")


class Rig:
    """One HF reference + one Megatron worker for a spec; runs a template at a layout and judges it."""

    def __init__(self, spec_path: Path, tmp: Path, overrides: dict | None = None, seed: int | None = None,
                 model_type: str = "qwen2"):
        self.tmp = tmp
        self.hf = Worker("hf", str(spec_path))
        self.mcore = Worker("megatron", str(spec_path))
        self.workers = [self.hf, self.mcore]
        self.materialize(overrides or base_spec()["reference"]["config"],
                         base_spec()["reference"]["seed"] if seed is None else seed, model_type)

    def materialize(self, overrides: dict, seed: int, model_type: str = "qwen2") -> None:
        """A (new) tiny reference model; its HF log-probs in each dtype are computed on demand."""
        self.ref_dir = self.hf.call("materialize", {"model_type": model_type, "overrides": overrides,
                                                    "seed": seed, "dtype": "float32", "path": None})["dir"]
        vocab = json.loads((Path(self.ref_dir) / "config.json").read_text())["vocab_size"]
        self.prompts = prompt_sets(vocab)
        self._hf: dict[str, str] = {}

    def hf_logprobs(self, dtype: str, attention: str | None = None) -> str:
        if (dtype, attention) not in self._hf:
            out = self.tmp / f"hf-{Path(self.ref_dir).name}-{dtype}-{attention or 'sdpa'}.safetensors"
            extra = {"attention": attention} if attention else {}
            self._hf[dtype, attention] = self.hf.call("logprobs", {"dir": self.ref_dir, "dtype": dtype,
                                                                   "prompts": self.prompts, "out_path": str(out),
                                                                   **extra})["path"]
        return self._hf[dtype, attention]

    @property
    def reference(self) -> str:
        return self.hf_logprobs("float32")

    def judge(self, template: str | None, tp: int, pp: int, dtype: str = "float32"):
        run = self.mcore.call("logprobs", {"dir": self.ref_dir, "dtypes": [dtype], "tp": tp, "pp": pp,
                                           "prompts": self.prompts, "out_dir": str(self.tmp / f"{template}-{tp}-{pp}"),
                                           "template": template}, timeout=600)
        return self.evaluate(run, f"tp{tp}pp{pp} {dtype}", dtype)

    def evaluate(self, run: dict, where: str, dtype: str):
        noise = self.hf_logprobs(dtype) if dtype != "float32" else None
        return logits.evaluate(self.reference, run["files"].get(dtype), self.prompts, dtype, {}, where,
                               run["load_problems"], noise)

    def close(self):
        for worker in self.workers:
            worker.close()


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


# bf16: the bounds are calibrated on HF's own bf16 rounding, and agreement is judged at decisive positions only;
# wiring bugs must still fail, by a visible margin (metric / bound, recorded for the note)
BF16_BUG_MARGINS: dict[str, float] = {}


@pytest.mark.parametrize("template", ["qwen2-up-gate", "qwen2-transposed-proj", "qwen2-rope-unmapped",
                                      "qwen2-qkv-concat"])
def test_planted_bug_fails_in_bf16(rig, template):
    verdict = rig.judge(template, 1, 1, "bfloat16")
    assert verdict.status == "failed", verdict.metrics.get("max_abs_logprob")
    margin = verdict.metrics["max_abs_logprob"] / verdict.tolerance["max_abs_logprob"]
    BF16_BUG_MARGINS[template] = margin
    print(f"bf16 bug margin {template}: max_abs_logprob {verdict.metrics['max_abs_logprob']:.3g} / bound "
          f"{verdict.tolerance['max_abs_logprob']:.3g} = {margin:.1f}x; top1_agreement "
          f"{verdict.metrics['top1_agreement']}")
    assert margin > 2, verdict.reason


def test_correct_template_passes_in_bf16(rig):
    verdict = rig.judge("qwen2", 2, 1, "bfloat16")
    assert verdict.status == "passed", verdict.reason


def test_swiglu_concat_only_shows_at_tp2(rig):
    assert rig.judge("qwen2-swiglu-concat", 1, 1).status == "passed"
    verdict = rig.judge("qwen2-swiglu-concat", 2, 1)
    assert verdict.status == "failed" and "tp2pp1" in verdict.reason


def test_layer_shift_at_pp2_fails(tmp_path_factory):
    plugin = REPO / "harness" / "selftest" / "plugins" / "pp_layer_shift.py"  # the self-test catalogue's plugin
    shifted = Rig(_spec(tmp_path_factory, str(plugin)), tmp_path_factory.mktemp("shift"))
    try:
        assert shifted.judge(None, 1, 1).status == "passed"  # one stage: the shift cannot happen
        verdict = shifted.judge(None, 1, 2)
        assert verdict.status == "failed" and "tp1pp2" in verdict.reason
    finally:
        shifted.close()
