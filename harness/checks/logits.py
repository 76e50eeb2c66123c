"""Logit parity: a backend's log-probs vs the HF reference, judged per prompt set and metric.

`evaluate` is the whole judge for a trainer backend's full-vocabulary log-probs: coverage first,
then the bf16 calibration (HF's own bf16 rounding on the same prompts), the decisive positions,
the metrics and the verdict. Suites hand it file paths and nothing else.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import metrics as M
from ..tolerances import (BOUND_METRICS, CALIBRATION_FACTOR, DEFAULTS, LOGIT_METRICS, Calibration, Tolerance,
                          resolve)
from ..verdict import Verdict, from_problems

# tolerance key -> (metric key, True when the metric is an upper bound)
BOUNDS = {key: BOUND_METRICS[key] for key in LOGIT_METRICS}

# Agreement rates are counts: a set of 8 positions moves in steps of 0.125, so they are pooled over
# every judged position (greedy: every judged sequence) of every set, weighted by how many were judged.
POOLED = {"top1_agreement": "decisive_positions", "topk_overlap": "decisive_topk_positions",
          "greedy_equal": "decisive_sequences", "greedy_sequence_equal": "decisive_continuations",
          "closeness": "sequences"}
MARGIN_RULE = ("decisive where the fp32 reference's top-1/top-2 margin (top-5/top-6 for the overlap) exceeds "
               "2 x max(fp32 max_abs_logprob default, factor x HF-bf16's own max |Δlogprob| at that position; "
               "MoE: at a token that is a routing near-tie, HF-bf16's largest at any position of any prompt set)")
# Why MoE tokens differ: dense bf16 noise is rounding, of one scale everywhere, so HF's noise at a position
# predicts a correct backend's there. A router's top-k flips only at its near-tie tokens (routing.NEAR_TIE_RULE),
# and *which* near-ties flip depends on each implementation's rounding: HF's own flips are one sample. A near-tie
# token's log-probs may move as much as HF's did where it flipped (a flip's size is the model's, not the
# sequence's); every other token keeps its own noise. Measured, qwen2_moe bf16: Megatron TP1's one top-1 flip and
# one top-5 miss, both at medium[0] token 16, a near-tie HF-bf16 routes as fp32 does in a sequence where HF's
# noise peaks at 0.076 while the flip moves 0.53 (HF's largest, elsewhere: 0.76); 32 of 202 tokens are near-ties.


NOISE_RUNS_RULE = ("MoE: the worst of HF's bf16 runs with its default (sdpa) and its eager attention; margins from "
                   "the first")
# Why two runs for an MoE model: which near-tie tokens a bf16 run routes differently from fp32 is each run's own
# rounding, and one flip moves a sequence's log-probs far more than rounding does, so one HF run is one sample of
# how many flips a correct backend has. Measured, tiny mixtral medium set: mean |Δlogprob| HF sdpa 0.023, eager
# 0.063, vLLM 0.054; with all three replaying vLLM's routing 0.015 / 0.015 / 0.014 (the rest is rounding).


def noise_runs(noisy) -> list:
    """HF's bf16 noise run(s) as a list (one, or an MoE model's several: NOISE_RUNS_RULE)."""
    return list(noisy) if isinstance(noisy, (list, tuple)) else [noisy]


def runs_method(method: str, runs: list) -> str:
    """A calibration's method, naming NOISE_RUNS_RULE when several runs were taken."""
    return f"{method}; {NOISE_RUNS_RULE}" if len(runs) > 1 else method


def worst_of_runs(runs: list[dict[str, Any]], bounds: dict[str, tuple[str, bool]] = BOUNDS) -> dict[str, Any]:
    """Per metric, the worst value any noise run shows (a run with nothing to measure does not count)."""
    if not runs:
        raise ValueError("no noise run was measured: there is no worst value")
    out = {}
    for _key, (metric, upper) in bounds.items():
        values = [run[metric] for run in runs if run.get(metric) is not None]
        out[metric] = (max(values) if upper else min(values)) if values else None
    return out


def pooled(per_set: dict[str, dict[str, Any]], metric: str) -> float | None:
    """The rate over every judged item of every set; None when nothing was judged (never a default)."""
    weight = POOLED[metric]
    total = sum(m[weight] for m in per_set.values())
    if not total:
        return None
    return sum(m[metric] * m[weight] for m in per_set.values() if m[weight]) / total


def worst(per_set: dict[str, dict[str, Any]], bounds: dict[str, tuple[str, bool]] = BOUNDS) -> dict[str, Any]:
    """Continuous metrics: the worst prompt set; agreement rates: pooled over all sets."""
    if not per_set:
        raise ValueError("no prompt set was measured: there is no worst value")
    out = {}
    for _key, (metric, upper) in bounds.items():
        if metric in POOLED:
            out[metric] = pooled(per_set, metric)
        else:  # a set where a metric has nothing to measure (None) does not count towards its worst value
            values = [m[metric] for m in per_set.values() if m[metric] is not None]
            out[metric] = (max(values) if upper else min(values)) if values else None
    return out


def min_margins(prompts: dict[str, list[list[int]]], truth: dict[str, torch.Tensor],
                noisy: dict[str, torch.Tensor] | None, factor: float = CALIBRATION_FACTOR,
                routing_ties: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Per prompt set, the margin a position needs to be decisive (see MARGIN_RULE); fp32: no noise.
    `routing_ties`: an MoE model's routing near-tie tokens per set ([B, S], routing.near_tie_tokens)."""
    floor = DEFAULTS["max_abs_logprob"][0]
    if noisy is None:
        return {name: 2 * floor for name in prompts}
    noise = {name: M.position_noise(truth[name], noisy[name]) for name in prompts}
    if routing_ties is not None:
        largest = max(float(noise[name][M.valid_mask(noise[name].shape + (1,), seqs)].max())
                      for name, seqs in prompts.items())
        noise = {name: torch.where(routing_ties[name], largest, n) for name, n in noise.items()}
    return {name: 2 * torch.clamp(factor * noise[name], min=floor) for name in prompts}


def compare(truth: dict[str, torch.Tensor], test: dict[str, torch.Tensor], prompts: dict[str, list[list[int]]],
            margins: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: M.compare_set(truth[name], test[name], seqs, margins[name]) for name, seqs in prompts.items()}


def noise_calibration(truth, noisy, prompts, margins, method: str,
                      factor: float = CALIBRATION_FACTOR, bounds=BOUNDS) -> Calibration:
    """HF run(s) in bf16 against HF fp32 on the same inputs, in the judge's own metrics (several: the worst)."""
    runs = noise_runs(noisy)
    for run in runs:
        problems = M.coverage(truth, run, prompts)
        if problems:
            raise RuntimeError(f"HF's bf16 run is incomplete, so no bound can be calibrated: {problems[0]}")
    noise = worst_of_runs([worst(compare(truth, run, prompts, margins), bounds) for run in runs], bounds)
    return Calibration(runs_method(method, runs), noise, factor)


def evaluate(truth_path: str, test_path: str | None, prompts: dict[str, list[list[int]]], dtype: str,
             spec_tolerances: dict, where: str, problems: list[str] | None = None,
             noise_path: str | list[str] | None = None, routing_ties: dict[str, torch.Tensor] | None = None) -> Verdict:
    """A trainer backend's log-prob file against HF fp32 (`noise_path`: HF's own run(s) in `dtype`, for bf16,
    NOISE_RUNS_RULE; `routing_ties`: an MoE model's routing near-tie tokens, see MARGIN_RULE)."""
    truth = M.load(truth_path)
    noisy = [M.load(path) for path in noise_runs(noise_path)] if dtype != "float32" else None
    margins = min_margins(prompts, truth, noisy[0] if noisy else None, routing_ties=routing_ties)
    calibration = None
    if noisy is not None:
        calibration = noise_calibration(truth, noisy, prompts, margins, "2 x HF-bf16 vs HF-fp32 noise, same prompts")
    tolerance = resolve(dtype, spec_tolerances, LOGIT_METRICS, calibration)
    problems = list(problems or [])
    if test_path is None or problems:
        return judge({}, tolerance, where, problems or ["the backend produced no log-probs"])
    test = M.load(test_path)
    missing = M.coverage(truth, test, prompts)
    if missing:
        verdict = judge({}, tolerance, where, [f"{where} {p}" for p in missing])
        verdict.metrics["non_finite_sets"] = M.non_finite_sets(test, prompts)
        return verdict
    return judge(compare(truth, test, prompts, margins), tolerance, where)


def judge(per_set: dict[str, dict[str, Any]], tolerance: Tolerance | dict[str, float], where: str,
          load_problems: list[str] | None = None, calibration: dict[str, Any] | None = None,
          bounds: dict[str, tuple[str, bool]] = BOUNDS) -> Verdict:
    problems = list(load_problems or [])
    if not per_set and not problems:
        problems.append(f"{where}: no prompt set was measured")
    unjudged = []
    for tol_key, (metric, _upper) in bounds.items():
        if metric not in POOLED or not per_set:
            continue
        value, bound = pooled(per_set, metric), tolerance[tol_key]
        if value is None:
            unjudged.append(f"{metric}: no decisive {POOLED[metric].removeprefix('decisive_')} (all near-ties)")
        elif value < bound:
            problems.append(f"{where} all prompt sets: {metric} = {value:.4g} < {bound:.4g} "
                            f"over {sum(m[POOLED[metric]] for m in per_set.values())} judged")
    for set_name, m in per_set.items():
        for tol_key, (metric, upper) in bounds.items():
            if metric in POOLED or m[metric] is None:
                continue
            bound = tolerance[tol_key]
            if not (m[metric] <= bound if upper else m[metric] >= bound):  # NaN is never within a bound
                problems.append(f"{where} prompt set {set_name!r}: {metric} = {m[metric]:.4g} "
                                f"{'>' if upper else '<'} {bound:.4g}")
    summary = worst(per_set, bounds) if per_set else {}
    for tol_key, (metric, _upper) in bounds.items():
        if metric not in POOLED and summary and summary[metric] is None:
            problems.append(f"{where}: {metric} has nothing to measure in any prompt set")
    metrics: dict[str, Any] = {**summary, "per_set": per_set}
    if per_set:
        metrics["near_tie_positions"] = sum(m.get("near_tie_positions", 0) for m in per_set.values())
        metrics["decisive_rule"] = MARGIN_RULE
    if unjudged:
        metrics["unjudged"] = unjudged
    if calibration:
        metrics["calibration"] = calibration
    return from_problems(problems, metrics, tolerance, what="logit parity violations")
