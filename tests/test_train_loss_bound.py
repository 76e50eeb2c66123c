"""The fp32 train loss bound scales with the loss (torch.testing's float32 closeness, tolerances.RELATIVE): a real
vocabulary's loss after an Adam update differs between correct implementations by a few of its ulps, which the
old fixed 1e-5 nearly caught as a bug (Qwen2.5-0.5B shape: Megatron TP2 9.5e-6 at a loss of 9.97)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness import certificate, verify
from harness.checks import train
from harness.spec import load_spec
from harness.tolerances import DEFAULTS, RELATIVE

from .conftest import QWEN2_SPEC

NAMES = ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight")
# measured at the Qwen2.5-0.5B shape (reports/examples/qwen2_5_0_5b_shape-cpu): the reference's three losses
REAL_SHAPE_LOSSES = [12.07563304901123, 9.968966484069824, 7.665045261383057]
TINY_LOSSES = [7.141417503356934, 5.000657558441162, 3.5565805435180664]  # tiny qwen2, seed 0


def _step(folder, losses, grad_shift=0.0) -> dict:
    """A saved train step (save_train_result's layout) with seeded tensors, its gradients moved by grad_shift."""
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(8, 4, generator=gen) * 1e-2 + grad_shift for n in NAMES}
    weights = {n: torch.randn(8, 4, generator=gen) * 2e-2 for n in NAMES}
    folder.mkdir(parents=True)
    save_file(grads, str(folder / "grads.safetensors"))
    save_file(weights, str(folder / "weights.safetensors"))
    return {"losses": list(losses), "grads": str(folder / "grads.safetensors"),
            "weights": str(folder / "weights.safetensors"), "parameter_order": list(NAMES)}


def _moved(losses, step, by):
    return [loss + (by if i == step else 0.0) for i, loss in enumerate(losses)]


def _judge(tmp_path, reference_losses, backend_losses, grad_shift=0.0):
    reference = _step(tmp_path / "ref", reference_losses)
    backend = _step(tmp_path / "backend", backend_losses, grad_shift)
    return train.evaluate(reference, backend, "float32", {}, "tp2pp1 float32")


def test_a_real_vocabularys_correct_step_passes_and_the_bound_says_where_it_came_from(tmp_path):
    verdict = _judge(tmp_path, REAL_SHAPE_LOSSES, _moved(REAL_SHAPE_LOSSES, 1, 9.5e-6))  # Megatron TP2, measured
    assert verdict.status == "passed", verdict.reason
    bound = verdict.tolerance.records["max_loss_diff"]
    assert bound["source"] == "default" and bound["relative"]["scale"] == REAL_SHAPE_LOSSES[0]
    assert bound["value"] == pytest.approx(DEFAULTS["max_loss_diff"][0] + RELATIVE["max_loss_diff"] * 12.0756, rel=1e-4)
    assert "1e-05 + 1.3e-06 × 12.1" in certificate.bound_text("max_loss_diff", bound)
    # gradients and weights keep their absolute defaults
    assert verdict.tolerance["max_grad_diff"] == DEFAULTS["max_grad_diff"][0]
    assert "relative" not in verdict.tolerance.records["max_grad_diff"]


@pytest.mark.parametrize("losses", [REAL_SHAPE_LOSSES, TINY_LOSSES])
@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_loss_off_by_a_few_thousandths_of_a_percent_still_fails(tmp_path, losses, step):
    """A planted bug that moves one step's loss by 1e-4 (a wrong Adam eps or bias correction does more):
    fails at every step, real vocabulary or tiny, naming the step."""
    verdict = _judge(tmp_path, losses, _moved(losses, step, 1e-4))
    assert verdict.status == "failed" and f"step {step}: loss differs" in verdict.reason, verdict.reason


def test_the_relative_part_is_fp32s_alone(tmp_path):
    """bf16 bounds stay calibrated on measured noise; a plain resolve without a scale is the absolute default."""
    from harness.tolerances import resolve

    assert "relative" not in resolve("bfloat16", {}, ["max_loss_diff"]).records["max_loss_diff"]
    assert resolve("float32", {}, ["max_loss_diff"])["max_loss_diff"] == DEFAULTS["max_loss_diff"][0]
    spec_value = resolve("float32", {"float32": {"max_loss_diff": 1e-6}}, ["max_loss_diff"], scale=12.0)
    record = spec_value.records["max_loss_diff"]
    assert record["source"] == "spec" and record["value"] == 1e-6 and not record["loosened_by_spec"]
    assert record["harness_value"] == pytest.approx(1e-5 + 1.3e-6 * 12.0)


def _row(verdict) -> dict:
    return {"id": "qwen2/train/megatron/float32/tp2pp1", "suite": "train", "backend": "megatron", "variant": "",
            "dtype": "float32", "status": verdict.status, "metrics": verdict.metrics,
            "tolerance": verdict.tolerance.records}


def test_verify_rederives_the_relative_bound_from_the_rows_own_reference_losses(tmp_path):
    verdict = _judge(tmp_path, REAL_SHAPE_LOSSES, _moved(REAL_SHAPE_LOSSES, 1, 9.5e-6))
    spec = load_spec(QWEN2_SPEC)
    verify.check_bounds(_row(verdict), spec)  # as written: consistent
    row = _row(verdict)
    row["metrics"] = {**row["metrics"], "loss_curve": {**row["metrics"]["loss_curve"],
                                                      "reference": [100.0, 90.0, 80.0]}}
    with pytest.raises(verify.Invalid, match="max_loss_diff value"):  # a scale the reference never had
        verify.check_bounds(row, spec)
    row = _row(verdict)
    row["tolerance"] = {**row["tolerance"], "max_loss_diff": {k: v for k, v in row["tolerance"]["max_loss_diff"].items()
                                                               if k != "relative"}}
    with pytest.raises(verify.Invalid, match="max_loss_diff relative"):  # the pre-2026-12-07 fixed bound's form
        verify.check_bounds(row, spec)
