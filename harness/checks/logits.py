"""Logit parity: a backend's log-probs vs the HF reference, judged per prompt set and metric."""
from __future__ import annotations

from typing import Any

from ..verdict import Verdict, from_problems

# tolerance key -> (metric key, True when the metric is an upper bound)
BOUNDS = {
    "max_abs_logprob": ("max_abs_logprob", True),
    "mean_abs_logprob": ("mean_abs_logprob", True),
    "min_top1_agreement": ("top1_agreement", False),
    "min_topk_overlap": ("topk_overlap", False),
    "min_greedy_equal": ("greedy_equal", False),
    "max_mean_exp_abs_logprob": ("mean_exp_abs_logprob", True),
}


# Agreement rates are counts: a set of 8 positions moves in steps of 0.125, so they are pooled
# over every position (greedy: every sequence) of every set before being judged.
POOLED = {"top1_agreement": "positions", "topk_overlap": "positions", "greedy_equal": "sequences",
          "greedy_sequence_equal": "sequences", "closeness": "sequences"}


def pooled(per_set: dict[str, dict[str, Any]], metric: str) -> float:
    weight = POOLED[metric]
    total = sum(m[weight] for m in per_set.values())
    return sum(m[metric] * m[weight] for m in per_set.values()) / total if total else 1.0


def worst(per_set: dict[str, dict[str, Any]], bounds: dict[str, tuple[str, bool]] = BOUNDS) -> dict[str, float]:
    """Continuous metrics: the worst prompt set; agreement rates: pooled over all sets."""
    out = {}
    for _tol_key, (metric, upper) in bounds.items():
        if metric in POOLED:
            out[metric] = pooled(per_set, metric)
        else:
            values = [m[metric] for m in per_set.values()]
            out[metric] = max(values) if upper else min(values)
    return out


def judge(per_set: dict[str, dict[str, Any]], tolerance: dict[str, float], where: str,
          load_problems: list[str] | None = None, calibration: dict[str, Any] | None = None,
          bounds: dict[str, tuple[str, bool]] = BOUNDS) -> Verdict:
    problems = list(load_problems or [])
    for tol_key, (metric, upper) in bounds.items():
        if metric in POOLED and per_set:
            value, bound = pooled(per_set, metric), tolerance[tol_key]
            if value < bound:
                problems.append(f"{where} all prompt sets: {metric} = {value:.4g} < {bound:.4g}")
    for set_name, m in per_set.items():
        for tol_key, (metric, upper) in bounds.items():
            if metric in POOLED:
                continue
            bound = tolerance[tol_key]
            bad = m[metric] > bound if upper else m[metric] < bound
            if bad:
                problems.append(f"{where} prompt set {set_name!r}: {metric} = {m[metric]:.4g} "
                                f"{'>' if upper else '<'} {bound:.4g}")
    metrics: dict[str, Any] = {**(worst(per_set, bounds) if per_set else {}), "per_set": per_set}  # empty: nothing loaded
    if calibration:
        metrics["calibration"] = calibration
    return from_problems(problems, metrics, tolerance, what="logit parity violations")
