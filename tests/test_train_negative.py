"""Train-step checks have teeth: planted trainer/provider/template bugs fail and the message names what diverged.

Bugs are injected the way they happen: a plugin replaces one trainer-side step (model provider, batch,
loss reduction) inside the backend's rank processes only, or a template's reverse direction is wrong.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from fixtures.prompts import prompt_sets
from harness.checks import train
from harness.tolerances import resolve
from harness.train_step import STEPS
from harness.workers import Worker

from .conftest import REPO, base_spec

BUGS = REPO / "tests" / "data" / "train_bugs"
needs = {name: importlib.util.find_spec(name) is None for name in ("deepspeed", "megatron")}
TOLERANCE = resolve("float32", {}, list(train.TRAIN_METRICS))


def _spec(tmp: Path, plugin: str | None, tied: bool = False, **changes) -> Path:
    spec = base_spec("trainbug", plugins=[str(BUGS / plugin)] if plugin else ["harness.templates.qwen2"],
                     dtypes=["float32"], **changes)
    spec["reference"]["config"]["tie_word_embeddings"] = tied
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(tmp: Path, spec_path: Path, backend: str, dtype: str = "float32", **args):
    """Reference and backend train results for one spec (fresh workers: plugins are per spec), judged as
    the train suite judges them (bf16: against HF's emulation of the mixed-precision recipe, bounds
    calibrated on the same recipe computed in fp32)."""
    data = yaml.safe_load(spec_path.read_text())
    hf, worker = Worker("hf", str(spec_path)), Worker(backend, str(spec_path))
    try:
        ref_dir = hf.call("materialize", {"model_type": data["hf_model_type"], "overrides": data["reference"]["config"],
                                          "seed": 0, "dtype": "float32", "path": None})["dir"]
        seqs = prompt_sets(data["reference"]["config"]["vocab_size"])["padded_batch"]

        def reference(compute_dtype: str, attention: str | None = None):
            return hf.call("train_reference", {"dir": ref_dir, "dtype": dtype, "sequences": seqs, "steps": STEPS,
                                               "out_dir": str(tmp / f"ref-{compute_dtype}-{attention}"),
                                               "compute_dtype": compute_dtype, "attention": attention})

        ref = reference(dtype)
        got = worker.call("train", {"dir": ref_dir, "dtype": dtype, "sequences": seqs, "steps": STEPS,
                                    "out_dir": str(tmp / "backend"), **args}, timeout=600)
        if dtype == "float32":
            return train.judge(train.measure(ref, got), TOLERANCE, f"{backend} float32",
                               forward_order=ref.get("parameter_order"))
        exact = reference("float32")
        return train.evaluate(ref, got, dtype, {}, f"{backend} {dtype}",
                              [(ref, exact), (reference(dtype, "eager"), exact)])
    finally:
        hf.close()
        worker.close()


DS_ARGS = {"stage": 2, "world": 2}


@pytest.mark.skipif(needs["deepspeed"], reason="deepspeed not installed")
@pytest.mark.parametrize("plugin, tied, expected", [
    ("loss_summed.py", False, "first-step gradient of"),
    ("frozen_param.py", False, "model.layers.0.mlp.down_proj.weight: no value from the backend"),
    ("label_shift.py", False, "loss differs"),
    ("untied.py", True, "lm_head.weight: the backend has it, the reference does not"),
])
def test_deepspeed_planted_bug_fails(tmp_path, plugin, tied, expected):
    verdict = _run(tmp_path, _spec(tmp_path, plugin, tied), "deepspeed", **DS_ARGS)
    assert verdict.status == "failed"
    assert expected in verdict.reason, verdict.reason


@pytest.mark.skipif(needs["deepspeed"], reason="deepspeed not installed")
@pytest.mark.parametrize("plugin, expected", [
    (None, None),  # the correct template: bf16 ZeRO-3 rounds its own way, and passes
    ("loss_summed.py", "first-step gradient of"),
    ("label_shift.py", "loss differs"),
])
def test_deepspeed_zero3_bf16_planted_bug_fails(tmp_path, plugin, expected):
    """ZeRO-3 runs F.linear through DeepSpeed's memory-efficient autograd function (as ROLL's configs leave it:
    the bias added after the matmul, a bf16 rounding of its own): still no false alarm, still every bug found."""
    verdict = _run(tmp_path, _spec(tmp_path, plugin), "deepspeed", dtype="bfloat16", stage=3, world=2)
    if plugin is None:
        assert verdict.status == "passed", verdict.reason
        return
    assert verdict.status == "failed"
    assert expected in verdict.reason, verdict.reason


@pytest.mark.skipif(needs["deepspeed"], reason="deepspeed not installed")
def test_plugin_registered_model_class_trains_like_a_builtin(tmp_path):
    spec = _spec(tmp_path, "custom_model.py", hf_model_type="tinycustom", backends={"train": ["deepspeed"],
                                                                                    "infer": ["hf"]})
    verdict = _run(tmp_path, spec, "deepspeed", **DS_ARGS)
    assert verdict.status == "passed", verdict.reason


@pytest.mark.skipif(needs["megatron"], reason="megatron-core not installed")
def test_reverse_only_gate_up_swap_fails_the_megatron_train_step(tmp_path):
    spec = _spec(tmp_path, "gate_up_swap_back.py")
    verdict = _run(tmp_path, spec, "megatron", tp=1, pp=1, template="qwen2-swap-back")
    assert verdict.status == "failed"
    assert "gate_proj.weight" in verdict.reason and "up_proj.weight" in verdict.reason
    # the forward agrees, so the gradient walk localizes it: the last layer's MLP, first met from the loss
    found = verdict.localization["first_divergence"]["parameter"]
    assert found in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"), found


@pytest.mark.skipif(needs["megatron"], reason="megatron-core not installed")
@pytest.mark.parametrize("plugin, expected, absent", [
    (None, None, None),  # the correct template: the bf16 bounds are not what fails the planted bugs
    # one parameter group (biases, norm weights) skipped in the first step: only the weights show it
    ("mcore_skipped_step.py", "weight after the first update of", ("loss differs", "first-step gradient")),
    # the batch gradient divided by the micro-batch count once too often: only the gradients show it
    ("mcore_loss_scale.py", "first-step gradient of model.embed_tokens.weight",
     ("loss differs", "weight after the first update")),
])
def test_megatron_bf16_planted_bug_fails(tmp_path, plugin, expected, absent):
    """bf16 with fp32 main weights, judged against HF's emulation of that recipe (bounds: 4 x its bf16
    rounding; weights both sides step the same way: 1e-5). The skipped parameter group passed
    the old bf16 bound (vs fp32, 2 x pure-bf16 noise: loss 0.021 < 0.030, weights 4.9e-3 < 9.7e-3); its
    weights now fail, 1.0e-3 > 1e-5. The loss scale failed the old bound too (gradients 0.18 > 0.018)."""
    verdict = _run(tmp_path, _spec(tmp_path, plugin), "megatron", dtype="bfloat16", tp=1, pp=1)
    if plugin is None:
        assert verdict.status == "passed", verdict.reason
        return
    assert verdict.status == "failed"
    assert expected in verdict.reason and not any(a in verdict.reason for a in absent), verdict.reason
    if plugin == "mcore_skipped_step.py":
        assert verdict.metrics["worst_weight"].endswith(("norm.weight", "bias")), verdict.metrics["worst_weight"]
