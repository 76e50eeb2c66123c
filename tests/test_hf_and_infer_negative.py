"""Negative controls for the HF suite (load, save->load) and DeepSpeed's ZeRO-3 inference logits."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from fixtures.prompts import prompt_sets
from harness.checks import hf_checks, logits
from harness.tolerances import LOGIT_METRICS, resolve
from harness.workers import Worker

from .conftest import REPO, base_spec

DATA = REPO / "tests" / "data"


def _spec(tmp: Path, plugins: list[str], **changes) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec("negative", plugins=plugins, dtypes=["float32"], **changes)))
    return path


def _materialize(hf: Worker, spec_path: Path) -> str:
    data = yaml.safe_load(spec_path.read_text())
    return hf.call("materialize", {"model_type": data["hf_model_type"], "overrides": data["reference"]["config"],
                                   "seed": 0, "dtype": "float32", "path": None})["dir"]


def test_hf_load_fails_naming_a_tensor_missing_from_the_checkpoint(tmp_path):
    spec = _spec(tmp_path, ["harness.templates.qwen2"])
    hf = Worker("hf", str(spec))
    try:
        broken = tmp_path / "broken"
        shutil.copytree(_materialize(hf, spec), broken)
        state = load_file(str(broken / "model.safetensors"))
        del state["model.norm.weight"]  # a checkpoint written without the final norm
        save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
        verdict = hf_checks.judge_load(hf.call("load", {"dir": str(broken), "dtype": "float32"}))
    finally:
        hf.close()
    assert verdict.status == "failed"
    assert "missing keys: model.norm.weight" in verdict.reason


def test_hf_save_load_fails_for_a_class_that_saves_a_weight_differently(tmp_path):
    spec = _spec(tmp_path, [str(DATA / "asymmetric_save_model.py")], hf_model_type="zerocentredsave",
                 backends={"train": [], "infer": ["hf"]})
    hf = Worker("hf", str(spec))
    try:
        verdict = hf_checks.judge_save_load(hf.call("save_load", {"dir": _materialize(hf, spec), "dtype": "float32"}),
                                            resolve("float32", {}, ["save_load_max_abs_diff"]))
    finally:
        hf.close()
    assert verdict.status == "failed"
    assert "model.norm.weight" in verdict.reason


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_zero3_infer_fails_when_the_provider_drops_a_bias(tmp_path):
    spec = _spec(tmp_path, [str(DATA / "train_bugs" / "dropped_bias.py")])
    hf, ds = Worker("hf", str(spec)), Worker("deepspeed", str(spec))
    try:
        ref_dir = _materialize(hf, spec)
        vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
        prompts = prompt_sets(vocab)
        reference = hf.call("logprobs", {"dir": ref_dir, "dtype": "float32", "prompts": prompts,
                                         "out_path": str(tmp_path / "hf.safetensors")})["path"]
        run = ds.call("logprobs", {"dir": ref_dir, "dtypes": ["float32"], "prompts": prompts,
                                   "out_dir": str(tmp_path / "ds")}, timeout=600)
        verdict = logits.evaluate(reference, run["files"]["float32"], prompts, "float32", {}, "zero3-infer float32")
    finally:
        hf.close()
        ds.close()
    assert verdict.status == "failed"
    assert "zero3-infer float32 prompt set" in verdict.reason and "max_abs_logprob" in verdict.reason
