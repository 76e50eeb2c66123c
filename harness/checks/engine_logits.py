"""An engine record (harness/engine_record.py) against HF's greedy reference: peers' metrics, one place.

`coverage` runs first: every prompt set and sequence asked for, the prompt the engine really scored,
every prompt position, every generated token, and at least top-K entries plus the realized token in
every distribution; anything missing is named and no metric is computed.
Per prompt set (pooled where counts):
  max/mean_abs_logprob   |Δlogprob| over every entry the engine returned, at every position whose
                         prefix both sides share (the prompt, then the greedy path up to its first divergence)
  top1_agreement, topk_overlap, greedy_equal, mean_exp_abs_logprob   as in harness/metrics.py (decisive
                         positions only; near-ties are counted, not judged)
  prob_diff_mean         verl's rollout_probs_diff: mean |p_engine - p_ref| on the realized tokens
  greedy_sequence_equal  the whole greedy continuation equals HF's (continuations decisive at every step)
  closeness              vLLM's check_logprobs_close: equal, or at the first divergent step each side's
                         token is in the other's top-5
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..metrics import gaps
from ..tolerances import BOUND_METRICS, DEFAULTS, ENGINE_LOGIT_METRICS

TOP_K = 5
ENGINE_BOUNDS = {key: BOUND_METRICS[key] for key in ENGINE_LOGIT_METRICS}


def _top(dist: dict[int, float], k: int) -> list[int]:
    return [t for t, _ in sorted(dist.items(), key=lambda item: -item[1])[:k]]


def _dist_problems(where: str, dist: dict[int, float], need: int, realized: int | None) -> list[str]:
    problems = []
    if len(dist) < need:
        problems.append(f"{where}: {len(dist)} log-prob entries, the record promises top-{need}")
    if realized is not None and realized not in dist:
        problems.append(f"{where}: the realized token {realized} has no log-prob")
    if any(not math.isfinite(v) for v in dist.values()):
        problems.append(f"{where}: non-finite log-probs")
    return problems


def coverage(record: dict[str, Any], reference: dict[str, torch.Tensor],
             prompts: dict[str, list[list[int]]]) -> list[str]:
    """What the engine's record lacks against the prompts asked for and HF's greedy reference."""
    problems = []
    sets = record.get("sets") or {}
    top_k = int(record.get("top_k") or 0)
    if top_k < 1:
        problems.append(f"the record's top_k is {record.get('top_k')!r}")
    for name, asked in prompts.items():
        if name not in sets:
            problems.append(f"prompt set {name!r}: missing from the engine's record")
            continue
        got = sets[name]
        if len(got) != len(asked):
            problems.append(f"prompt set {name!r}: {len(got)} sequences returned for {len(asked)} sent")
        for i, (seq, prompt) in enumerate(zip(got, asked)):
            here = f"prompt set {name!r} sequence {i}"
            vocab = reference[f"{name}/{i}"].shape[-1]
            expected = reference[f"{name}/{i}/generated"].tolist()
            need = min(top_k, vocab)
            if list(seq["prompt"]) != list(prompt):
                problems.append(f"{here}: the engine scored a different prompt than the one sent")
                continue
            if len(seq["dists"]) != len(prompt):
                problems.append(f"{here}: {len(seq['dists'])} prompt positions scored of {len(prompt)}")
            if len(seq["generated"]) != len(expected):
                problems.append(f"{here}: {len(seq['generated'])} generated tokens of {len(expected)} asked for")
            if len(seq["gen_dists"]) != len(seq["generated"]):
                problems.append(f"{here}: {len(seq['gen_dists'])} distributions for "
                                f"{len(seq['generated'])} generated tokens")
            full = list(prompt) + list(seq["generated"])
            for t, dist in enumerate(seq["dists"][: len(prompt)]):
                realized = full[t + 1] if t + 1 < len(full) else None
                problems += _dist_problems(f"{here} position {t}", dist, need, realized)
            for j, dist in enumerate(seq["gen_dists"][: len(seq["generated"])]):
                problems += _dist_problems(f"{here} generated step {j}", dist, need, seq["generated"][j])
    for name in sorted(set(sets) - set(prompts)):
        problems.append(f"prompt set {name!r}: in the engine's record but never sent")
    return problems


def non_finite_sets(record: dict[str, Any], prompts: dict[str, list[list[int]]]) -> list[str]:
    """Prompt sets where the engine returned a NaN/inf log-prob: numeric evidence a localization can use."""
    sets = record.get("sets") or {}
    return [name for name in prompts if any(
        not math.isfinite(v) for seq in sets.get(name, []) for dist in seq.get("dists", []) + seq.get("gen_dists", [])
        for v in dist.values())]


def row_margins(prompts: dict[str, list[list[int]]], truth: dict[str, torch.Tensor],
                noisy: dict[str, torch.Tensor] | None, factor: float,
                routing_ties: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per sequence and reference row, the margin a position needs to be decisive (see logits.MARGIN_RULE).

    HF-bf16's rows are comparable with HF-fp32's over the prompt and the greedy path up to where the two
    greedy paths part; later rows take the sequence's largest comparable noise. The prompt rows of an MoE model's
    routing near-tie tokens (`routing_ties`, [B, S] per set over the prompts) take the largest of any sequence."""
    floor = DEFAULTS["max_abs_logprob"][0]
    out = {}
    if noisy is None:
        return {f"{name}/{i}": torch.full((truth[f"{name}/{i}"].shape[0],), 2 * floor, dtype=torch.float64)
                for name, seqs in prompts.items() for i in range(len(seqs))}
    for name, seqs in prompts.items():
        for i, prompt in enumerate(seqs):
            key = f"{name}/{i}"
            rows = truth[key].shape[0]
            a, b = truth[f"{key}/generated"].tolist(), noisy[f"{key}/generated"].tolist()
            same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            comparable = min(rows, len(prompt) + same)
            noise = (truth[key][:comparable].double() - noisy[key][:comparable].double()).abs().amax(-1)
            out[key] = torch.full((rows,), float(noise.max()), dtype=torch.float64)
            out[key][:comparable] = noise
    if routing_ties is not None:  # a near-tie prompt token: HF-bf16's largest comparable noise anywhere
        largest = max(float(n.max()) for n in out.values())
        for name, seqs in prompts.items():
            for i, prompt in enumerate(seqs):
                out[f"{name}/{i}"][: len(prompt)][routing_ties[name][i][: len(prompt)]] = largest
    return {key: 2 * torch.clamp(factor * full, min=floor) for key, full in out.items()}


def _compare_sequence(seq: dict[str, Any], ref: torch.Tensor, ref_generated: list[int], need: torch.Tensor,
                      acc: dict[str, list]) -> None:
    prompt, generated = seq["prompt"], seq["generated"]
    same = 0
    while same < min(len(generated), len(ref_generated)) and generated[same] == ref_generated[same]:
        same += 1
    gap1, gapk = gaps(ref)
    decisive = gap1 > need
    # positions with a shared prefix: the prompt's, then the continuation through the first divergent step
    steps = [(t, seq["dists"][t], (prompt + generated)[t + 1] if t + 1 < len(prompt) + len(generated) else None)
             for t in range(len(prompt))]
    steps += [(len(prompt) - 1 + j, seq["gen_dists"][j], generated[j]) for j in range(1, min(same + 1, len(generated)))]
    for row, dist, realized in steps:
        ref_row = ref[row].double()
        acc["abs"].extend(abs(lp - float(ref_row[t])) for t, lp in dist.items())
        if decisive[row]:
            acc["top1"].append(_top(dist, 1)[0] == int(ref_row.argmax()))
        else:
            acc["near_tie"].append(_top(dist, 1)[0] == int(ref_row.argmax()))
        if gapk[row] > need[row]:
            k = min(TOP_K, len(dist))
            acc["overlap"].append(len(set(_top(dist, k)) & set(ref_row.topk(k).indices.tolist())) / k)
        if realized is not None:
            acc["realized"].append(abs(dist[realized] - float(ref_row[realized])))
            acc["prob"].append(abs(math.exp(dist[realized]) - math.exp(float(ref_row[realized]))))
    first = len(prompt) - 1
    if decisive[first]:
        acc["greedy"].append(generated[0] == int(ref[first].argmax()))
    if bool(decisive[first:first + len(ref_generated)].all()):
        acc["sequence"].append(generated == ref_generated)
    if generated == ref_generated:
        acc["close"].append(True)
    else:  # both sides saw the same prefix up to step `same`
        engine_top = _top(seq["gen_dists"][same], TOP_K)
        ref_top = ref[first + same].topk(TOP_K).indices.tolist()
        acc["close"].append(ref_generated[same] in engine_top and generated[same] in ref_top)
        acc["divergence"].append(same)


def _rate(flags: list) -> float | None:
    return float(sum(flags) / len(flags)) if flags else None


def compare(record: dict[str, Any], reference: dict[str, torch.Tensor],
            margins: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Metrics per prompt set of a record that passed `coverage`."""
    per_set = {}
    for name, seqs in record["sets"].items():
        acc: dict[str, list] = {k: [] for k in ("abs", "top1", "near_tie", "overlap", "realized", "prob", "greedy",
                                                 "sequence", "close", "divergence")}
        for i, seq in enumerate(seqs):
            _compare_sequence(seq, reference[f"{name}/{i}"], reference[f"{name}/{i}/generated"].tolist(),
                              margins[f"{name}/{i}"], acc)
        if not acc["abs"] or not acc["realized"]:
            raise ValueError(f"prompt set {name!r}: nothing to compare (no positions or realized tokens)")
        per_set[name] = {
            "positions": len(acc["top1"]) + len(acc["near_tie"]), "sequences": len(seqs),
            "decisive_positions": len(acc["top1"]), "decisive_topk_positions": len(acc["overlap"]),
            "decisive_sequences": len(acc["greedy"]), "decisive_continuations": len(acc["sequence"]),
            "near_tie_positions": len(acc["near_tie"]), "near_tie_top1_agreement": _rate(acc["near_tie"]),
            "max_abs_logprob": max(acc["abs"]), "mean_abs_logprob": sum(acc["abs"]) / len(acc["abs"]),
            "top1_agreement": _rate(acc["top1"]), "topk_overlap": _rate(acc["overlap"]),
            "greedy_equal": _rate(acc["greedy"]),
            "mean_exp_abs_logprob": sum(math.exp(x) for x in acc["realized"]) / len(acc["realized"]),
            "prob_diff_mean": sum(acc["prob"]) / len(acc["prob"]),
            "greedy_sequence_equal": _rate(acc["sequence"]), "closeness": _rate(acc["close"]),
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


def noise_calibration(truth: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor],
                      prompts: dict[str, list[list[int]]], top_k: int, factor: float, routing_ties=None):
    """HF's own greedy run in bf16 judged against HF fp32 the way an engine's record is (HF-bf16's path is its own)."""
    from ..tolerances import Calibration
    from .logits import noise_runs, runs_method, worst, worst_of_runs

    runs = noise_runs(noisy)
    margins = row_margins(prompts, truth, runs[0], factor, routing_ties)
    noise = worst_of_runs([worst(compare(record_from_reference(run, prompts, top_k), truth, margins), ENGINE_BOUNDS)
                           for run in runs], ENGINE_BOUNDS)
    return Calibration(runs_method(f"{factor:g} x HF-bf16 vs HF-fp32 noise in the same metrics", runs), noise, factor)


def evaluate(truth: dict[str, torch.Tensor], noisy: dict[str, torch.Tensor] | None, record: dict[str, Any],
             prompts: dict[str, list[list[int]]], dtype: str, spec_tolerances: dict, where: str,
             problems: list[str] | None = None, factor: float | None = None, routing_ties=None):
    """An engine record against HF fp32's greedy reference; `noisy` (HF's own greedy run in `dtype`) calibrates bf16
    (`routing_ties`: an MoE model's routing near-tie tokens, see logits.MARGIN_RULE)."""
    from ..tolerances import CALIBRATION_FACTOR, resolve
    from .logits import judge, noise_runs

    factor = factor or CALIBRATION_FACTOR
    calibration = None
    if noisy is not None:
        calibration = noise_calibration(truth, noisy, prompts, int(record.get("top_k") or 1), factor, routing_ties)
    tolerance = resolve(dtype, spec_tolerances, ENGINE_LOGIT_METRICS, calibration)
    problems = list(problems or [])
    missing = coverage(record, truth, prompts)
    if missing or problems:
        verdict = judge({}, tolerance, where, problems + [f"{where} {p}" for p in missing], bounds=ENGINE_BOUNDS)
        verdict.metrics["non_finite_sets"] = non_finite_sets(record, prompts)
        return verdict
    first = noise_runs(noisy)[0] if noisy is not None else None
    return judge(compare(record, truth, row_margins(prompts, truth, first, factor, routing_ties)), tolerance, where,
                 bounds=ENGINE_BOUNDS)
