"""An engine record (harness/engine_record.py) against HF's greedy reference: peers' metrics, one place.

Per prompt set (pooled where counts):
  max/mean_abs_logprob   |Δlogprob| over every entry the engine returned, at every position whose
                         prefix both sides share (the prompt, then the greedy path up to its first divergence)
  top1_agreement, topk_overlap, greedy_equal, mean_exp_abs_logprob   as in harness/metrics.py
  prob_diff_mean         verl's rollout_probs_diff: mean |p_engine - p_ref| on the realized tokens
  greedy_sequence_equal  the whole greedy continuation equals HF's
  closeness              vLLM's check_logprobs_close: equal, or at the first divergent step each side's
                         token is in the other's top-5
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .logits import BOUNDS

TOP_K = 5
ENGINE_BOUNDS = {
    **BOUNDS,
    "min_greedy_sequence_equal": ("greedy_sequence_equal", False),
    "min_closeness": ("closeness", False),
    "max_prob_diff_mean": ("prob_diff_mean", True),
}


def _top(dist: dict[int, float], k: int) -> list[int]:
    return [t for t, _ in sorted(dist.items(), key=lambda item: -item[1])[:k]]


def _compare_sequence(seq: dict[str, Any], ref: torch.Tensor, ref_generated: list[int], acc: dict[str, list]) -> None:
    prompt, generated = seq["prompt"], seq["generated"]
    same = 0
    while same < min(len(generated), len(ref_generated)) and generated[same] == ref_generated[same]:
        same += 1
    # positions with a shared prefix: the prompt's, then the continuation through the first divergent step
    steps = [(t, seq["dists"][t], (prompt + generated)[t + 1] if t + 1 < len(prompt) + len(generated) else None)
             for t in range(len(prompt))]
    steps += [(len(prompt) - 1 + j, seq["gen_dists"][j], generated[j]) for j in range(1, min(same + 1, len(generated)))]
    for row, dist, realized in steps:
        ref_row = ref[row].double()
        diffs = [abs(lp - float(ref_row[t])) for t, lp in dist.items()]
        acc["abs"].extend(diffs)
        acc["top1"].append(_top(dist, 1)[0] == int(ref_row.argmax()))
        k = min(TOP_K, len(dist))
        acc["overlap"].append(len(set(_top(dist, k)) & set(ref_row.topk(k).indices.tolist())) / k)
        if realized is not None and realized in dist:
            delta = dist[realized] - float(ref_row[realized])
            acc["realized"].append(abs(delta))
            acc["prob"].append(abs(math.exp(dist[realized]) - math.exp(float(ref_row[realized]))))
    acc["greedy"].append(bool(generated) and generated[0] == int(ref[len(prompt) - 1].argmax()))
    acc["sequence"].append(generated == ref_generated)
    if generated == ref_generated:
        acc["close"].append(True)
    else:  # both sides saw the same prefix up to step `same`
        engine_top = _top(seq["gen_dists"][same], TOP_K)
        ref_top = ref[len(prompt) - 1 + same].topk(TOP_K).indices.tolist()
        acc["close"].append(ref_generated[same] in engine_top and generated[same] in ref_top)
        acc["divergence"].append(same)


def compare(record: dict[str, Any], reference: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    per_set = {}
    for name, seqs in record["sets"].items():
        acc: dict[str, list] = {k: [] for k in ("abs", "top1", "overlap", "realized", "prob", "greedy", "sequence",
                                                 "close", "divergence")}
        for i, seq in enumerate(seqs):
            _compare_sequence(seq, reference[f"{name}/{i}"], reference[f"{name}/{i}/generated"].tolist(), acc)
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
        per_set[name] = {
            "positions": len(acc["top1"]), "sequences": len(seqs),
            "max_abs_logprob": max(acc["abs"], default=0.0), "mean_abs_logprob": mean(acc["abs"]),
            "top1_agreement": mean(acc["top1"]), "topk_overlap": mean(acc["overlap"]),
            "greedy_equal": mean(acc["greedy"]),
            "mean_exp_abs_logprob": mean([math.exp(x) for x in acc["realized"]]) or 1.0,
            "prob_diff_mean": mean(acc["prob"]),
            "greedy_sequence_equal": mean(acc["sequence"]), "closeness": mean(acc["close"]),
            "first_divergence": acc["divergence"],
        }
    return per_set


def record_from_reference(reference: dict[str, torch.Tensor], prompts: dict[str, list[list[int]]],
                          top_k: int) -> dict[str, Any]:
    """An HF run written as an engine record (for calibrating bf16 bounds on HF's own rounding noise)."""
    from ..engine_record import sequence, top_entries

    sets = {}
    for name, seqs in prompts.items():
        sets[name] = []
        for i, prompt in enumerate(seqs):
            rows, generated = reference[f"{name}/{i}"], reference[f"{name}/{i}/generated"].tolist()
            full = list(prompt) + generated
            dists = [top_entries(rows[t], top_k, full[t + 1]) for t in range(len(prompt))]
            gen_dists = [top_entries(rows[len(prompt) - 1 + j], top_k, generated[j]) for j in range(len(generated))]
            sets[name].append(sequence(prompt, dists, generated, gen_dists))
    return {"top_k": top_k, "sets": sets}
