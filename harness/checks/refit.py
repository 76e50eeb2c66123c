"""Refit (RL weight sync): the engine's prompt logprobs after a sync against the trainer's own after its step.

Inputs: the engine's record after the sync and in its dummy state (harness/engine_record.py), the
trainer's full-vocabulary log-probs after and before its train step ([batch, seq, vocab] per prompt
set, right padded), and what the sync reported (buckets, what arrived, what the engine loaded).

`coverage` runs first: every prompt set, sequence and prompt position of the trainer's file must be in
the engine's record (the very prompt the trainer scored, at least top-K finite entries plus the
realized token at each position); anything missing is named and no metric is computed. Then, per
prompt set, over every prompt position and every vocabulary entry the engine returned:
  max/mean_abs_logprob   |logprob_engine - logprob_trainer|
  top1_agreement         engine's top-1 == trainer's argmax (decisive positions; see logits.MARGIN_RULE)
  topk_overlap           |top-5 ∩ top-5| / 5 (positions decisive for the top-5)
  greedy_equal           the engine's greedy next token after the prompt == the trainer's argmax there
  mean_exp_abs_logprob   NeMo-RL's mean exp(|Δlogp|) on the realized tokens (next prompt token; after
                         the prompt, the engine's greedy token)
  prob_diff_mean         verl's mean |p_engine - p_trainer| on the same tokens (reported, not judged)
Guards (the check would prove nothing otherwise; an `error`, never a pass): the dummy state must be
visibly wrong against the trainer, and the train step must visibly change the trainer's log-probs.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..metrics import gaps
from ..tolerances import LOGIT_METRICS, resolve
from ..verdict import Verdict
from . import logits

TOP_K = 5
BOUNDS = logits.BOUNDS  # the refit row carries exactly the logit-parity bounds (tolerances.expected_keys)


def _trainer_problems(trainer: dict[str, torch.Tensor], prompts: dict[str, list[list[int]]]) -> list[str]:
    problems = []
    for name, seqs in prompts.items():
        t = trainer.get(name)
        if t is None:
            problems.append(f"prompt set {name!r}: missing from the trainer's log-probs")
        elif t.dim() != 3 or t.shape[0] != len(seqs) or t.shape[1] < max(len(s) for s in seqs):
            problems.append(f"prompt set {name!r}: trainer log-probs of shape {tuple(t.shape)} for "
                            f"{len(seqs)} sequences of up to {max(len(s) for s in seqs)} tokens")
        elif any(not bool(torch.isfinite(t[i, : len(s)]).all()) for i, s in enumerate(seqs)):
            problems.append(f"prompt set {name!r}: non-finite trainer log-probs")
    return problems


def coverage(record: dict[str, Any], trainer: dict[str, torch.Tensor],
             prompts: dict[str, list[list[int]]]) -> list[str]:
    """What the engine's record lacks against the trainer's file (every set, sequence and prompt position)."""
    problems = _trainer_problems(trainer, prompts)
    if problems:
        return problems
    sets = record.get("sets") or {}
    top_k = int(record.get("top_k") or 0)
    if top_k < 1:
        problems.append(f"the engine record's top_k is {record.get('top_k')!r}")
    for name, seqs in prompts.items():
        got = sets.get(name)
        if got is None:
            problems.append(f"prompt set {name!r}: missing from the engine's record")
            continue
        if len(got) != len(seqs):
            problems.append(f"prompt set {name!r}: the engine returned {len(got)} sequences, the trainer scored "
                            f"{len(seqs)}")
        need = min(top_k, trainer[name].shape[-1])
        for i, (seq, prompt) in enumerate(zip(got, seqs)):
            here = f"prompt set {name!r} sequence {i}"
            if list(seq.get("prompt", [])) != list(prompt):
                problems.append(f"{here}: the engine scored a different prompt than the trainer")
                continue
            dists = seq.get("dists") or []
            if len(dists) < len(prompt):
                problems.append(f"{here}: prompt positions {len(dists)}..{len(prompt) - 1} missing from the "
                                f"engine's record ({len(dists)} of {len(prompt)})")
            if not seq.get("generated"):
                problems.append(f"{here}: no greedy token after the prompt")
            full = list(prompt) + list(seq.get("generated") or [])
            for t, dist in enumerate(dists[: len(prompt)]):
                where = f"{here} position {t}"
                if len(dist) < need:
                    problems.append(f"{where}: {len(dist)} log-prob entries, the record promises top-{need}")
                if t + 1 < len(full) and full[t + 1] not in dist:
                    problems.append(f"{where}: the realized token {full[t + 1]} has no log-prob")
                if any(not math.isfinite(v) for v in dist.values()):
                    problems.append(f"{where}: non-finite log-probs from the engine")
    for name in sorted(set(sets) - set(prompts)):
        problems.append(f"prompt set {name!r}: in the engine's record but never scored by the trainer")
    return problems


def _rate(flags: list[bool]) -> float | None:
    return float(sum(flags) / len(flags)) if flags else None


def _top(dist: dict[int, float], k: int) -> list[int]:
    return [t for t, _ in sorted(dist.items(), key=lambda item: -item[1])[:k]]


def compare(record: dict[str, Any], trainer: dict[str, torch.Tensor], prompts: dict[str, list[list[int]]],
            margins: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metrics per prompt set of a record that passed `coverage`; `margins[set]`: a number or [batch, seq]."""
    per_set = {}
    for name, seqs in prompts.items():
        rows_all = trainer[name].double()
        need = torch.as_tensor(margins[name], dtype=torch.float64).expand(rows_all.shape[:2])
        acc: dict[str, list] = {k: [] for k in ("abs", "top1", "near_tie", "overlap", "realized", "prob", "greedy")}
        worst = (0.0, 0, 0)
        for i, (seq, prompt) in enumerate(zip(record["sets"][name], seqs)):
            rows = rows_all[i, : len(prompt)]
            gap1, gapk = gaps(rows, TOP_K)
            full = list(prompt) + list(seq["generated"])
            for t, dist in enumerate(seq["dists"][: len(prompt)]):
                tokens = torch.tensor(list(dist), dtype=torch.long)
                diff = (torch.tensor(list(dist.values()), dtype=torch.float64) - rows[t][tokens]).abs()
                acc["abs"].append(diff)
                if float(diff.max()) > worst[0]:
                    worst = (float(diff.max()), i, t)
                agree = _top(dist, 1)[0] == int(rows[t].argmax())
                acc["top1" if gap1[t] > need[i, t] else "near_tie"].append(agree)
                if gapk[t] > need[i, t]:
                    k = min(TOP_K, len(dist))
                    acc["overlap"].append(len(set(_top(dist, k)) & set(rows[t].topk(k).indices.tolist())) / k)
                realized = full[t + 1]
                delta = dist[realized] - float(rows[t][realized])
                acc["realized"].append(abs(delta))
                acc["prob"].append(abs(math.exp(dist[realized]) - math.exp(float(rows[t][realized]))))
            last = len(prompt) - 1
            if gap1[last] > need[i, last]:
                acc["greedy"].append(seq["generated"][0] == int(rows[last].argmax()))
        diffs = torch.cat(acc["abs"])
        per_set[name] = {
            "positions": len(acc["top1"]) + len(acc["near_tie"]), "sequences": len(seqs),
            "entries": int(diffs.numel()),
            "decisive_positions": len(acc["top1"]), "decisive_topk_positions": len(acc["overlap"]),
            "decisive_sequences": len(acc["greedy"]),
            "near_tie_positions": len(acc["near_tie"]), "near_tie_top1_agreement": _rate(acc["near_tie"]),
            "max_abs_logprob": float(diffs.max()), "mean_abs_logprob": float(diffs.mean()),
            "top1_agreement": _rate(acc["top1"]), "topk_overlap": _rate(acc["overlap"]),
            "greedy_equal": _rate(acc["greedy"]),
            "mean_exp_abs_logprob": sum(math.exp(x) for x in acc["realized"]) / len(acc["realized"]),
            "prob_diff_mean": sum(acc["prob"]) / len(acc["prob"]),
            "worst_entry": {"sequence": worst[1], "position": worst[2]},
        }
    return per_set


def step_visibility(pre: dict[str, torch.Tensor], post: dict[str, torch.Tensor],
                    prompts: dict[str, list[list[int]]]) -> tuple[float, float]:
    """max and mean |logprob after the step - before| over every prompt position and vocabulary entry."""
    diffs = torch.cat([(post[name][i, : len(s)].double() - pre[name][i, : len(s)].double()).abs().flatten()
                       for name, seqs in prompts.items() for i, s in enumerate(seqs)])
    return float(diffs.max()), float(diffs.mean())


def sync_problems(sync: dict[str, Any]) -> list[str]:
    """What the weight sync itself reports as lost: tensors that never arrived, parameters never (fully) loaded."""
    problems = []
    if sync.get("undelivered"):
        names = sync["undelivered"]
        problems.append(f"{len(names)} checkpoint tensors never reached the engine: {', '.join(names[:4])}")
    if sync.get("not_loaded"):
        names = sync["not_loaded"]
        problems.append(f"{len(names)} engine parameters never received a weight: {', '.join(names[:4])}")
    if sync.get("partially_loaded"):
        parts = [f"{layer} ({got} of {total} elements)" for layer, (got, total) in sync["partially_loaded"].items()]
        problems.append(f"{len(parts)} engine layers received only part of their weights: {', '.join(parts[:4])}")
    if sync.get("unexpected"):
        names = sync["unexpected"]
        problems.append(f"{len(names)} tensors sent that the checkpoint does not have: {', '.join(names[:4])}")
    return problems


def tolerance_for(dtype: str, spec_tolerances: dict, truth=None, noisy=None, prompts=None, routing_ties=None):
    """fp32: the default bounds (spec values win). bf16: engine and trainer are both bf16, each may be
    2 x HF's own bf16 rounding away from the truth, so 4 x HF-bf16 vs HF-fp32 on the same prompt
    positions (as the rollout suite calibrates). Returns (tolerance, calibration, margins)."""
    from ..tolerances import BOTH_SIDES_FACTOR

    if dtype == "float32":
        return resolve(dtype, spec_tolerances, LOGIT_METRICS), None, logits.min_margins(prompts, truth, None)
    if truth is None or noisy is None:
        raise ValueError(f"{dtype} refit bounds are calibrated: HF's fp32 and {dtype} prompt log-probs are needed")
    margins = logits.min_margins(prompts, truth, logits.noise_runs(noisy)[0], BOTH_SIDES_FACTOR, routing_ties)
    calibration = logits.noise_calibration(
        truth, noisy, prompts, margins,
        "2 x 2 x HF-bf16 vs HF-fp32 on the prompt positions (trainer and engine both bf16)", BOTH_SIDES_FACTOR)
    return resolve(dtype, spec_tolerances, LOGIT_METRICS, calibration), calibration, margins


def evaluate(record: dict[str, Any], dummy: dict[str, Any], trainer: dict[str, torch.Tensor],
             pre_step: dict[str, torch.Tensor], prompts: dict[str, list[list[int]]], tolerance, margins,
             where: str, sync: dict[str, Any], problems: list[str] | None = None,
             calibration=None) -> Verdict:
    """The whole refit judge: coverage, metrics against the trainer's post-step log-probs, the guards."""
    problems = list(problems or []) + sync_problems(sync)
    cal = calibration.as_dict() if hasattr(calibration, "as_dict") else calibration
    missing = coverage(record, trainer, prompts)
    if missing:
        verdict = logits.judge({}, tolerance, where, problems + [f"{where} {p}" for p in missing], cal, BOUNDS)
    else:
        verdict = logits.judge(compare(record, trainer, prompts, margins), tolerance, where, problems, cal, BOUNDS)
    # Observable = the states a broken sync leaves (the dummy weights; the pre-step weights) would fail this
    # judge: the dummy record is judged as the engine's; the step must move the log-probs past the max or
    # the mean bound (an MoE model's bf16 max bound carries HF's own routing flips, ~1.5 on a tiny mixtral)
    dummy_missing = coverage(dummy, trainer, prompts)
    dummy_verdict = None if dummy_missing else \
        logits.judge(compare(dummy, trainer, prompts, margins), tolerance, where, [], cal, BOUNDS)
    dummy_max = None if dummy_verdict is None else dummy_verdict.metrics["max_abs_logprob"]
    step, step_mean = (None, None) if _trainer_problems(pre_step, prompts) else \
        step_visibility(pre_step, trainer, prompts)
    guards = []
    if dummy_verdict is None:
        guards.append(f"the dummy-state record is incomplete ({dummy_missing[0]}): refit not observable")
    elif dummy_verdict.status != "failed":
        guards.append("dummy weights already matched the trainer: refit not observable")
    if step is None:
        guards.append("the trainer's pre-step log-probs are incomplete: refit not observable")
    elif not (step > tolerance["max_abs_logprob"] or step_mean > tolerance["mean_abs_logprob"]):
        guards.append("the train step did not change the logprobs: refit not observable")
    if guards:  # the check would prove nothing
        verdict.status, verdict.reason = "error", "; ".join(guards)
    verdict.metrics["refit"] = {
        "bucket_bytes": sync.get("bucket_bytes"), "buckets": len(sync.get("buckets", [])),
        "bucket_tensors": [b["tensors"] for b in sync.get("buckets", [])],
        "dropped_buckets": sync.get("dropped_buckets", []),
        "sent_tensors": sync.get("sent_tensors"), "delivered_tensors": sync.get("delivered_tensors"),
        "loaded_parameters": sync.get("loaded"),
        "step_max_abs_logprob": step, "step_mean_abs_logprob": step_mean, "dummy_max_abs_logprob": dummy_max,
    }
    if sync.get("planted_fault"):
        verdict.metrics["refit"]["planted_fault"] = sync["planted_fault"]
    return verdict
