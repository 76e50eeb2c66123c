"""Train-step parity: loss per step, first-step gradients and updated weights vs the torch reference."""
from __future__ import annotations

from typing import Any

import torch

from ..tolerances import CALIBRATION_FACTOR, TRAIN_METRICS, Calibration, resolve
from ..verdict import Verdict, from_problems


def _tensor_table(ref: dict[str, torch.Tensor], test: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[str]]:
    diffs, problems = {}, []
    for name in sorted(set(ref) - set(test)):
        problems.append(f"{name}: no value from the backend (frozen or not trained?)")
    for name in sorted(set(test) - set(ref)):
        problems.append(f"{name}: the backend has it, the reference does not")
    for name in sorted(set(ref) & set(test)):
        if ref[name].shape != test[name].shape:
            problems.append(f"{name}: shape {tuple(test[name].shape)} != reference {tuple(ref[name].shape)}")
            continue
        diffs[name] = float((ref[name].double() - test[name].double()).abs().max())
    return diffs, problems


# Adam divides each gradient element by its own running RMS, so an element whose gradient is
# near zero moves by up to lr per step in a direction set by rounding noise: two correct
# implementations can disagree there by up to 2 x lr (one steps +lr, the other -lr). Those elements (first-step reference
# |grad| below NOISE_GRADIENT) are held to that bound; every other element to the tolerance.
NOISE_GRADIENT = 1e-5


def _weight_table(ref_w, test_w, ref_grads):
    strict, loose, problems, masked = {}, {}, [], 0
    for name in sorted(set(ref_w) - set(test_w)):
        problems.append(f"{name}: no value from the backend")
    for name in sorted(set(test_w) - set(ref_w)):
        problems.append(f"{name}: the backend has it, the reference does not")
    for name in sorted(set(ref_w) & set(test_w)):
        a, b = ref_w[name].double(), test_w[name].double()
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(b.shape)} != reference {tuple(a.shape)}")
            continue
        diff = (a - b).abs()
        grad = ref_grads.get(name)
        noisy = grad.abs() <= NOISE_GRADIENT if grad is not None and grad.shape == diff.shape else \
            torch.zeros_like(diff, dtype=torch.bool)
        masked += int(noisy.sum())
        strict[name] = float(diff[~noisy].max()) if (~noisy).any() else 0.0
        loose[name] = float(diff[noisy].max()) if noisy.any() else 0.0
    return strict, loose, problems, masked


def measure(ref: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    ref_grads, ref_weights = load_file(ref["grads"]), load_file(ref["weights"])
    structural = []
    if not ref_grads or not ref_weights or not ref["losses"]:
        structural.append("the reference step produced no gradients, weights or losses: nothing to compare")
    grad_diffs, grad_problems = _tensor_table(ref_grads, load_file(test["grads"]))
    weight_diffs, noisy_diffs, weight_problems, masked = _weight_table(ref_weights, load_file(test["weights"]),
                                                                       ref_grads)
    losses = list(test["losses"])
    structural += [f"step {i}: the backend's loss is missing" for i in range(len(losses), len(ref["losses"]))]
    structural += [f"step {i}: the backend reports a loss for a step the reference never took"
                   for i in range(len(ref["losses"]), len(losses))]
    loss_diffs = [abs(a - b) for a, b in zip(ref["losses"], losses)]
    return {
        "loss_curve": {"reference": ref["losses"], "backend": losses},
        "loss_diffs": loss_diffs,
        "grad_diffs": grad_diffs,
        "weight_diffs": weight_diffs,
        "noise_gradient_weight_diffs": noisy_diffs,
        "noise_gradient_elements": masked,
        "structural": structural + [f"grad {p}" for p in grad_problems] + [f"weight {p}" for p in weight_problems],
        "steps_compared": len(loss_diffs),
        "steps_expected": len(ref["losses"]),
    }


def summary(m: dict[str, Any]) -> dict[str, float]:
    """Worst loss, gradient and weight difference (only called on a measurement with all three)."""
    if not (m["loss_diffs"] and m["grad_diffs"] and m["weight_diffs"]):
        raise ValueError("no loss, gradient or weight was compared: there is no worst difference")
    return {
        "max_loss_diff": max(m["loss_diffs"]),
        "max_grad_diff": max(m["grad_diffs"].values()),
        "max_weight_diff": max(m["weight_diffs"].values()),
    }


def evaluate(reference: dict[str, Any], result: dict[str, Any], dtype: str, spec_tolerances: dict, where: str,
             noise: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Verdict:
    """A backend's train step against the torch reference; bf16: `noise` = (fp32, bf16) reference runs."""
    calibration = None
    if dtype != "float32":
        if noise is None:
            raise ValueError("a bf16 train check needs the fp32 and bf16 reference runs to calibrate on")
        calibration = Calibration(f"{CALIBRATION_FACTOR:g} x (plain-torch bf16 vs fp32 reference)",
                                  summary(measure(*noise)))
    return judge(measure(reference, result), resolve(dtype, spec_tolerances, TRAIN_METRICS, calibration), where)


def judge(m: dict[str, Any], tolerance: dict[str, float], where: str, calibration: dict | None = None) -> Verdict:
    problems = [f"{where} {p}" for p in m["structural"]]
    for step, diff in enumerate(m["loss_diffs"]):
        if not diff <= tolerance["max_loss_diff"]:
            problems.append(f"{where} step {step}: loss differs by {diff:.3g} > {tolerance['max_loss_diff']:.3g} "
                            f"(reference {m['loss_curve']['reference'][step]:.6g}, "
                            f"backend {m['loss_curve']['backend'][step]:.6g})")
    from ..train_step import OPTIMIZER

    adam_bound = 2 * OPTIMIZER["lr"] * 1.01  # weights are compared after one step: opposite signs, 2 x lr
    for name, diff in sorted(m["noise_gradient_weight_diffs"].items()):
        if not diff <= max(adam_bound, tolerance["max_weight_diff"]):
            problems.append(f"{where} updated weight of {name} (near-zero-gradient elements) moved {diff:.3g} "
                            f"more than two opposite Adam steps can ({adam_bound:.3g})")
    for kind, key in (("grad_diffs", "max_grad_diff"), ("weight_diffs", "max_weight_diff")):
        bad = sorted(((d, n) for n, d in m[kind].items() if not d <= tolerance[key]), reverse=True)
        label = "first-step gradient" if kind == "grad_diffs" else "weight after the first update"
        problems += [f"{where} {label} of {n} differs by {d:.3g} > {tolerance[key]:.3g}" for d, n in bad]
    complete = m["loss_diffs"] and m["grad_diffs"] and m["weight_diffs"]
    metrics = {**(summary(m) if complete else {}), "noise_gradient_elements": m["noise_gradient_elements"],
               "max_noise_gradient_weight_diff": max(m["noise_gradient_weight_diffs"].values(), default=None),
               "loss_curve": m["loss_curve"],
               "worst_grad": max(m["grad_diffs"], key=m["grad_diffs"].get, default=""),
               "worst_weight": max(m["weight_diffs"], key=m["weight_diffs"].get, default="")}
    if calibration:
        metrics["calibration"] = calibration
    return from_problems(problems, metrics, tolerance, what="train-step divergences")
