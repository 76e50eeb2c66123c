"""Train-step parity: loss per step, first-step gradients and updated weights vs the torch reference."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..tolerances import TRAIN_METRICS, Calibration, Tolerance, calibration_factor, loss_scale, resolve
from ..verdict import Verdict, from_problems
from .localize import first_diverging_gradient


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


# Adam divides each gradient element by its own running RMS: its first step is lr * g / (|g| + eps),
# +-lr by the sign of the element's gradient. An element whose first-step gradient is near zero on
# either side (|grad| at most NOISE_GRADIENT, where eps matters: k_proj's bias, whose true gradient is
# 0, has bf16 noise there) or has opposite signs on the two sides (rounding noise, whose size the
# gradient bound limits: bf16 flips a few thousand elements) moves in a direction set by noise: two
# correct implementations can disagree there by up to 2 x lr (one steps +lr, the other -lr). Those
# elements are held to that bound; every other element, stepped the same way by both, to the tolerance.
NOISE_GRADIENT = 1e-5


def _weight_table(ref_w, test_w, ref_grads, test_grads):
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
        grad, other = ref_grads.get(name), test_grads.get(name)
        noisy = grad.abs() <= NOISE_GRADIENT if grad is not None and grad.shape == diff.shape else \
            torch.zeros_like(diff, dtype=torch.bool)
        if grad is not None and other is not None and grad.shape == other.shape == diff.shape:
            noisy |= (other.abs() <= NOISE_GRADIENT) | (torch.sign(grad) != torch.sign(other))
        masked += int(noisy.sum())
        strict[name] = float(diff[~noisy].max()) if (~noisy).any() else 0.0
        loose[name] = float(diff[noisy].max()) if noisy.any() else 0.0
    return strict, loose, problems, masked


class TensorFile(Mapping):
    """A safetensors file read one tensor at a time (the last one kept): the judge compares whole models tensor by
    tensor, and four whole real-shape models at once (both sides' gradients and weights) would be 8 GB at 0.5B."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._file = safe_open(path, framework="pt")
        self._names = list(self._file.keys())
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        if self._last is None or self._last[0] != name:
            self._last = (name, self._file.get_tensor(name))
        return self._last[1]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def measure(ref: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    ref_grads, ref_weights = TensorFile(ref["grads"]), TensorFile(ref["weights"])
    structural = []
    if not ref_grads or not ref_weights or not ref["losses"]:
        structural.append("the reference step produced no gradients, weights or losses: nothing to compare")
    test_grads = TensorFile(test["grads"])
    grad_diffs, grad_problems = _tensor_table(ref_grads, test_grads)
    weight_diffs, noisy_diffs, weight_problems, masked = _weight_table(ref_weights, TensorFile(test["weights"]),
                                                                       ref_grads, test_grads)
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


# Both sides compute in bf16 (the backend and HF's emulation of its recipe): each may be
# CALIBRATION_FACTOR x HF's own rounding away from the recipe computed exactly.
FACTOR = calibration_factor("train")
CALIBRATION_METHOD = (f"{FACTOR:g} x (HF's bf16 emulation of the mixed-precision recipe vs the same recipe computed "
                      "in fp32: fp32 master weights, the same bf16 weight copies), worst of HF's sdpa and eager "
                      "attention (eager rounds attention probabilities to bf16, as megatron-core's unfused "
                      "attention does)")


def worst_noise(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, float]:
    """Per metric, the largest difference any (bf16 run, fp32-computed run) pair shows."""
    if not pairs:
        raise ValueError("a bf16 train check needs the reference computed in bf16 and in fp32 to calibrate on")
    runs = [summary(measure(*pair)) for pair in pairs]
    return {key: max(run[key] for run in runs) for key in runs[0]}


def evaluate(reference: dict[str, Any], result: dict[str, Any], dtype: str, spec_tolerances: dict, where: str,
             noise: list[tuple[dict[str, Any], dict[str, Any]]] | None = None,
             own_routing: tuple[str, list[str] | None] | None = None, sequences: list[list[int]] | None = None) -> Verdict:
    """A backend's train step against the torch reference of its recipe (bf16: HF's emulation, fp32 master
    weights and bf16 compute); bf16: `noise` = [(that reference, the same recipe computed in fp32), (the
    recipe with HF's eager attention, the same fp32 run)], what bf16 rounding does to the recipe (both the
    backend and the reference round: see FACTOR).

    A MoE model (REPLAY_RULE): `own_routing` = the routing files of the reference's own steps (truth; bf16:
    the recipe computed in fp32, and the bf16 runs beside it for the noise), `sequences` the batch; the
    backend's routing at every step is judged against them like the routing suite's, and in bf16 `reference`
    and `noise` are the runs that replayed the backend's routing."""
    calibration = None
    if dtype != "float32":
        calibration = Calibration(CALIBRATION_METHOD, worst_noise(noise or []), FACTOR)
    # fp32: the loss bound's relative part scales with the reference's loss (tolerances.RELATIVE)
    tolerance = resolve(dtype, spec_tolerances, TRAIN_METRICS, calibration, loss_scale(reference["losses"]))
    extra, extra_metrics = [], {}
    if own_routing is not None:
        routed = _routing_verdict(own_routing, result.get("routing"), sequences, dtype, spec_tolerances, where)
        tolerance = Tolerance({**tolerance.records, **routed.tolerance.records})
        extra = [routed.reason] if routed.status != "passed" else []
        extra_metrics = {**{k: routed.metrics.get(k) for k in ("routing_agreement", "router_prob_diff_mean")},
                         "routing": {**{k: v for k, v in routed.metrics.items() if k != "per_set"},
                                     "replayed": dtype != "float32" and bool(result.get("routing")),
                                     "rule": REPLAY_RULE}}
    if reference.get("aux_losses"):  # a trainer that adds the load-balancing loss (the reference emulates it)
        aux_tolerance, aux_problems, aux_metrics = _aux_judgement(reference, result, dtype, spec_tolerances, where,
                                                                  noise)
        tolerance = Tolerance({**tolerance.records, **aux_tolerance.records})
        extra, extra_metrics = extra + aux_problems, {**extra_metrics, **aux_metrics}
    verdict = judge(measure(reference, result), tolerance, where, forward_order=reference.get("parameter_order"),
                    extra_problems=extra)
    verdict.metrics.update(extra_metrics)
    return verdict


AUX_METHOD = (f"{FACTOR:g} x (the per-layer load-balancing loss of HF's bf16 emulation vs the same recipe computed "
              "in fp32), worst of HF's sdpa and eager attention")


def _aux_difference(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[layer] - b[layer]) for layer in a)


def _aux_judgement(reference, result, dtype, spec_tolerances, where, noise):
    """Step 0's load-balancing loss per MoE layer (before the coefficient) against the reference's."""
    from ..tolerances import AUX_METRICS

    ref, got = reference["aux_losses"], result.get("aux_losses") or {}
    calibration = None if dtype == "float32" else Calibration(
        AUX_METHOD, {"max_aux_loss_diff": max(_aux_difference(a["aux_losses"], b["aux_losses"]) for a, b in noise)},
        FACTOR)
    tolerance = resolve(dtype, spec_tolerances, AUX_METRICS, calibration)
    problems = [f"{where} {layer}: the backend logged no load-balancing loss" for layer in sorted(set(ref) - set(got))]
    problems += [f"{where} {layer}: a load-balancing loss for a layer the reference does not route"
                 for layer in sorted(set(got) - set(ref))]
    metrics = {"aux_losses": {"reference": ref, "backend": got, "coefficient": result.get("aux_loss_coeff")}}
    if not problems:
        metrics["max_aux_loss_diff"] = diff = _aux_difference(ref, got)
        if not diff <= tolerance["max_aux_loss_diff"]:
            problems.append(f"{where} step 0: load-balancing loss differs by {diff:.3g} > "
                            f"{tolerance['max_aux_loss_diff']:.3g} (reference {ref}, backend {got})")
    return tolerance, problems, metrics


# Which experts a near-tie token goes to is each bf16 implementation's own (routing suite); one flipped
# token moves a tiny batch's mean loss by ~1e-2 (one of 53 label tokens here), more than bf16's rounding
# does. So, as RL trainers replay the rollout engine's routing (R3), the bf16 reference replays the
# backend's: same experts, the reference's own router probabilities and gate values.
REPLAY_RULE = ("the backend's expert choices at every step are judged against the reference's own "
               "(routing suite rules: fp32 every token exact, bf16 the decisive tokens); in bf16 the reference "
               "steps (and their fp32-computed noise run) then replay the backend's choices, so loss, gradients "
               "and weights are compared under the same routing")


def _routing_verdict(own: tuple[str, list[str] | None], backend_routing: str | None, sequences, dtype: str,
                     spec_tolerances: dict, where: str) -> Verdict:
    from ..train_step import STEPS
    from . import routing

    truth, noisy = own
    steps = {f"step{s}": sequences for s in range(STEPS)}  # the routing file's prompt sets are the steps
    # judged at step 0, the forward from the same weights; later steps route on weights each side updated
    # itself (Adam moves near-zero-gradient elements +-lr by the sign of rounding noise): shown, and replayed
    return routing.evaluate(truth, backend_routing, steps, dtype, spec_tolerances, f"{where} routing",
                            noise_path=noisy, judged_sets=["step0"])


def localize(m: dict[str, Any], tolerance: dict[str, float], forward_order: list[str] | None) -> dict[str, Any]:
    """A failed step: the first parameter, backward from the loss, whose first-step gradient diverges."""
    if not m["grad_diffs"]:
        return {"status": "not_localized", "reason": "no first-step gradient was compared"}
    if m["loss_diffs"] and not m["loss_diffs"][0] <= tolerance["max_loss_diff"]:
        # every gradient then differs from the output backwards, naming the head: say where to look instead
        return {"status": "not_localized",
                "reason": f"the first step's loss already differs ({m['loss_diffs'][0]:.3g}): the forward pass "
                          "diverges, which this layout's logits row localizes; gradients are compared when it agrees"}
    found = first_diverging_gradient(m["grad_diffs"], tolerance["max_grad_diff"], forward_order or [])
    if found is None:
        return {"status": "not_localized",
                "reason": "every first-step gradient agrees: the divergence is in the optimizer update or a later "
                          "step (loss curve, weights after the update)"}
    return {"status": "localized", "summary": found["summary"], "first_divergence": found,
            "order": "backward (the reference's named_parameters reversed)" if forward_order else "by name"}


def judge(m: dict[str, Any], tolerance: dict[str, float], where: str, calibration: dict | None = None,
          forward_order: list[str] | None = None, extra_problems: list[str] = ()) -> Verdict:
    problems = [f"{where} {p}" for p in m["structural"]] + list(extra_problems)
    for step, diff in enumerate(m["loss_diffs"]):
        if not diff <= tolerance["max_loss_diff"]:
            problems.append(f"{where} step {step}: loss differs by {diff:.3g} > {tolerance['max_loss_diff']:.3g} "
                            f"(reference {m['loss_curve']['reference'][step]:.6g}, "
                            f"backend {m['loss_curve']['backend'][step]:.6g})")
    from ..train_step import OPTIMIZER

    adam_bound = 2 * OPTIMIZER["lr"] * 1.01  # weights are compared after one step: opposite signs, 2 x lr
    for name, diff in sorted(m["noise_gradient_weight_diffs"].items()):
        if not diff <= max(adam_bound, tolerance["max_weight_diff"]):
            problems.append(f"{where} updated weight of {name} (near-zero or sign-flipped gradient elements) "
                            f"moved {diff:.3g} "
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
    verdict = from_problems(problems, metrics, tolerance, what="train-step divergences")
    if verdict.status == "failed" and not m["structural"]:
        verdict.localization = localize(m, tolerance, forward_order)
        if verdict.localization.get("summary"):
            verdict.reason = f"{verdict.reason} | {verdict.localization['summary']}"
    return verdict
