"""Routing agreement: which experts each token is sent to, per MoE layer, against the HF fp32 reference.

A routing file (`routing.safetensors`, written by the HF reference, the Megatron ranks and the vLLM worker)
holds per prompt set and MoE layer `"{set}/layers.{L}/topk"` int64 [B, S, k] (global expert ids as the
router chose them) and `"{set}/layers.{L}/logits"` float32 [B, S, E] (router logits before softmax/top-k),
over the right-padded batch harness.train_step.make_batch builds; padding positions are masked here.

Coverage runs first: every prompt set, every MoE layer of the reference and every valid token must be
there, with finite logits and k distinct in-range expert ids, else the check fails naming what is missing.
Then, per MoE layer (pooled over the prompt sets: a one-token set would move a rate in steps of 1):
  routing_agreement   fraction of tokens whose top-k expert SET equals the reference's
and per (prompt set, layer):
  router_prob_diff_mean  mean |softmax(logits) - softmax(reference logits)| over tokens and experts
  router_prob_diff       the max of the same (shown, not bounded: one token on a steep softmax decides it;
                         HF's eager attention against its sdpa in bf16, both correct, differ by up to 8.6 x
                         in the max and at most 1.6 x in the mean over 3 seeds x 2 init scales)
Near-ties: a token whose reference k-th and (k+1)-th probabilities are within 2 x the noise there (a
within-noise backend can close that gap) is counted, with its flips, beside the rate. fp32 judges every
token (a near-tie excuses nothing there: a correct fp32 backend routes exactly as HF does); bf16 judges
the decisive tokens, both bounds calibrated on HF's own bf16 routing against HF fp32 on the same prompts:
mean |Δp| 2 x HF-bf16's worst, the rate 1 - 2 x HF-bf16's own flip rate over all tokens (worst layer), worst
over HF's sdpa and eager attention (eager rounds attention probabilities to bf16, as megatron-core's
unfused attention does: measured up to 1.6 x sdpa's mean |Δp|, and Megatron TP1 bf16 2.1 x).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ..tolerances import CALIBRATION_FACTOR, ROUTING_METRICS, Calibration, resolve
from ..metrics import valid_mask
from ..verdict import Verdict, from_problems

# a token's max |Δp| a correct fp32 backend stays under (measured <= 7e-7: vLLM and HF eager vs HF sdpa, 3 families)
FP32_PROB_NOISE = 1e-5
KEY = re.compile(r"^(?P<set>.+)/layers\.(?P<layer>\d+)/(?P<kind>topk|logits)$")
NEAR_TIE_RULE = ("near-tie where the reference's k-th minus (k+1)-th router probability is at most 2 x the noise "
                 "at that token (fp32: FP32_PROB_NOISE; bf16: factor x HF-bf16's own max |Δp| "
                 "there, never below the fp32 default); agreement pooled per layer over the prompt sets; fp32 "
                 "judges every token, bf16 the decisive ones")


def parse(tensors: dict[str, torch.Tensor], what: str) -> tuple[dict[str, dict[int, dict[str, torch.Tensor]]],
                                                               list[str]]:
    """{set: {layer: {"topk", "logits"}}} and the keys that are not routing keys."""
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            problems.append(f"{what} key {key!r} is not '<prompt set>/layers.<L>/topk|logits'")
            continue
        out.setdefault(match["set"], {}).setdefault(int(match["layer"]), {})[match["kind"]] = tensor
    return out, problems


def _cell_problems(name: str, layer: int, ref: dict, test: dict, seqs: list[list[int]]) -> list[str]:
    where = f"prompt set {name!r} layers.{layer}"
    problems = []
    for kind in ("topk", "logits"):
        if kind not in test:
            problems.append(f"{where}: the backend returned no {kind}")
        elif tuple(test[kind].shape) != tuple(ref[kind].shape):
            problems.append(f"{where}: backend {kind} has shape {tuple(test[kind].shape)}, "
                            f"the reference {tuple(ref[kind].shape)} [sequences, positions, "
                            f"{'k' if kind == 'topk' else 'experts'}]")
    if problems:
        return problems
    experts = ref["logits"].shape[-1]
    bad_logits = bad_ids = 0
    for i, seq in enumerate(seqs):
        logits, ids = test["logits"][i, : len(seq)], test["topk"][i, : len(seq)].long()
        bad_logits += int((~torch.isfinite(logits)).sum())
        out_of_range = (ids < 0) | (ids >= experts)
        repeated = ids.sort(-1).values.diff(dim=-1).eq(0).any(-1) if ids.shape[-1] > 1 else torch.zeros(0)
        bad_ids += int(out_of_range.any(-1).sum()) + int(repeated.sum())
    if bad_logits:
        problems.append(f"{where}: {bad_logits} non-finite router logits from the backend")
    if bad_ids:
        problems.append(f"{where}: {bad_ids} tokens whose top-k expert ids are out of range or repeated")
    return problems


def coverage(ref: dict, test: dict, prompts: dict[str, list[list[int]]]) -> list[str]:
    """What the backend's routing lacks (or has extra) against the reference's, which must cover the prompts."""
    problems = []
    for name, seqs in prompts.items():
        if name not in ref or not ref[name]:
            problems.append(f"prompt set {name!r}: no MoE layer in the reference's routing")
            continue
        broken = set()
        for layer, cell in sorted(ref[name].items()):
            shape = tuple(cell.get("topk", torch.empty(0)).shape)
            if set(cell) != {"topk", "logits"} or len(shape) != 3 or shape[0] != len(seqs) \
                    or shape[1] < max(map(len, seqs)):
                broken.add(layer)
                problems.append(f"prompt set {name!r} layers.{layer}: the reference's routing is incomplete "
                                f"(topk shape {shape}, {len(seqs)} sequences of up to {max(map(len, seqs))} tokens)")
        if name not in test:
            problems.append(f"prompt set {name!r}: missing from the backend's routing")
            continue
        for layer in sorted(set(ref[name]) - set(test[name])):
            problems.append(f"prompt set {name!r} layers.{layer}: MoE layer missing from the backend's routing")
        for layer in sorted(set(test[name]) - set(ref[name])):
            problems.append(f"prompt set {name!r} layers.{layer}: routed by the backend but not an MoE layer "
                            f"of the reference")
        for layer in sorted(set(ref[name]) & set(test[name]) - broken):
            problems += _cell_problems(name, layer, ref[name][layer], test[name][layer], seqs)
    for name in sorted(set(test) - set(prompts)):
        problems.append(f"prompt set {name!r}: returned by the backend but never asked for")
    return problems


def compare_cell(ref: dict, test: dict, seqs: list[list[int]], tie_gap, judge_all: bool) -> dict[str, Any]:
    """One (prompt set, layer): agreement of top-k sets, max |Δp|, near-ties (coverage already checked).
    `tie_gap`: the reference gap at or below which a token is a near-tie, one value or one per valid token."""
    p_ref, p_test = _probs(ref, seqs), _probs(test, seqs)
    valid = valid_mask(ref["topk"].shape, seqs)
    same = ref["topk"][valid].long().sort(-1).values.eq(test["topk"][valid].long().sort(-1).values).all(-1)
    near = _topk_gap(p_ref, ref["topk"].shape[-1]) <= torch.as_tensor(tie_gap, dtype=torch.float64)
    judged = same if judge_all else same[~near]
    return {
        "tokens": int(valid.sum()),
        "flips": int((~same).sum()),
        "judged_tokens": int(judged.numel()),
        "judged_flips": int((~judged).sum()),
        "near_tie_tokens": int(near.sum()),
        "near_tie_flips": int((near & ~same).sum()),
        "agreement_all_tokens": float(same.double().mean()),
        "routing_agreement": float(judged.double().mean()) if judged.numel() else None,
        "router_prob_diff": float((p_ref - p_test).abs().max()),
        "router_prob_diff_mean": float((p_ref - p_test).abs().mean()),
    }


def _topk_gap(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the k-th minus the (k+1)-th router probability (inf when every expert is chosen: no flip)."""
    top = probs.topk(min(k + 1, probs.shape[-1]), dim=-1).values
    return top[:, k - 1] - top[:, k] if top.shape[-1] > k else torch.full((len(top),), float("inf"))


def _probs(cell: dict, seqs: list[list[int]]) -> torch.Tensor:
    """Router probabilities (softmax of the logits) of the valid tokens, [tokens, experts], float64."""
    return torch.softmax(cell["logits"][valid_mask(cell["logits"].shape, seqs)].double(), dim=-1)


def compare(ref: dict, test: dict, prompts: dict[str, list[list[int]]], tie_gaps, judge_all: bool) -> dict:
    """Every (prompt set, layer) cell; `tie_gaps`: one value, or {set: {layer: per-token gaps}}."""
    def gap(name, layer):
        return tie_gaps[name][layer] if isinstance(tie_gaps, dict) else tie_gaps

    return {name: {f"layers.{layer}": compare_cell(ref[name][layer], test[name][layer], seqs, gap(name, layer),
                                                   judge_all)
                   for layer in sorted(ref[name])} for name, seqs in prompts.items()}


def tie_gaps(truth: dict, noisy: dict, prompts: dict[str, list[list[int]]], factor: float = CALIBRATION_FACTOR):
    """Per token: 2 x max(fp32 |Δp| default, factor x HF-bf16's own max |Δp| there) (see NEAR_TIE_RULE)."""
    floor = FP32_PROB_NOISE
    return {name: {layer: 2 * torch.clamp(factor * (_probs(truth[name][layer], seqs) -
                                                   _probs(noisy[name][layer], seqs)).abs().amax(-1), min=floor)
                   for layer in truth[name]} for name, seqs in prompts.items()}


def near_tie_tokens(truth: dict, noisy: dict, prompts: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    """Per prompt set, [B, S] True on the tokens that are a routing near-tie (NEAR_TIE_RULE) at any MoE layer:
    where a correct bf16 backend may send the token to other experts than HF does."""
    gaps = tie_gaps(truth, noisy, prompts)
    out = {}
    for name, seqs in prompts.items():
        layers = truth[name]
        valid = valid_mask(next(iter(layers.values()))["topk"].shape, seqs)
        near = torch.zeros(valid.shape, dtype=torch.bool)
        for layer, cell in layers.items():
            layer_near = torch.zeros_like(near)
            layer_near[valid] = _topk_gap(_probs(cell, seqs), cell["topk"].shape[-1]) <= gaps[name][layer]
            near |= layer_near
        out[name] = near
    return out


def _cells(per_set: dict) -> list[tuple[str, str, dict[str, Any]]]:
    return [(name, layer, m) for name, layers in per_set.items() for layer, m in layers.items()]


def per_layer(per_set: dict) -> dict[str, dict[str, Any]]:
    """Per MoE layer, pooled over the prompt sets (a one-token set moves a rate in steps of 1): the judged
    agreement, the all-token agreement, the worst |Δp|, near-ties and their flips, the worst set's rate."""
    out: dict[str, dict[str, Any]] = {}
    for name, layer, m in _cells(per_set):
        row = out.setdefault(layer, {"tokens": 0, "flips": 0, "judged_tokens": 0, "judged_flips": 0,
                                     "near_tie_tokens": 0, "near_tie_flips": 0, "router_prob_diff": 0.0,
                                     "router_prob_diff_mean": 0.0, "worst_set": None})
        for key in ("tokens", "flips", "judged_tokens", "judged_flips", "near_tie_tokens", "near_tie_flips"):
            row[key] += m[key]
        for key in ("router_prob_diff", "router_prob_diff_mean"):  # the worst prompt set's
            row[key] = max(row[key], m[key])
        if m["judged_flips"] and (row["worst_set"] is None or m["judged_flips"] > per_set[row["worst_set"]][layer]
                                  ["judged_flips"]):
            row["worst_set"] = name
    for row in out.values():
        row["agreement_all_tokens"] = 1 - row["flips"] / row["tokens"]
        row["routing_agreement"] = 1 - row["judged_flips"] / row["judged_tokens"] if row["judged_tokens"] else None
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split(".")[1])))


def summary(per_set: dict, rate: str = "routing_agreement") -> dict[str, Any]:
    """The worst layer's pooled rate (`rate`: the judged one or all tokens) and the worst |Δp| of any cell."""
    layers = per_layer(per_set).values()
    rates = [row[rate] for row in layers if row[rate] is not None]
    return {"routing_agreement": min(rates) if rates else None,
            "router_prob_diff_mean": max(row["router_prob_diff_mean"] for row in layers),
            "router_prob_diff": max(row["router_prob_diff"] for row in layers)}


def load(paths, what: str) -> tuple[dict, list[str]]:
    """One routing file, or several (a pipeline stage each writes its own layers): merged; a key two files
    hold with different values is a problem."""
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    problems = []
    for path in [paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else paths:
        for key, tensor in load_file(str(path)).items():
            if key in merged and not torch.equal(merged[key], tensor):
                problems.append(f"{what} key {key!r} differs between two routing files")
            merged[key] = tensor
    out, bad = parse(merged, what)
    return out, problems + bad


def tolerance_for(dtype: str, spec_tolerances: dict, truth: dict, noisy: list[dict] | None,
                  prompts: dict[str, list[list[int]]]):
    """(tolerance, calibration, near-tie gaps). fp32: the defaults (spec values win), every token judged.
    bf16: 2 x HF-bf16's own routing against HF fp32 on the same prompts, in the judge's own metrics, worst of
    the HF runs given (its default sdpa attention, and eager, which rounds the attention probabilities to bf16
    as megatron-core's unfused attention does); the near-tie gaps come from the first (HF's default)."""
    if dtype == "float32":
        return resolve(dtype, spec_tolerances, ROUTING_METRICS), None, 2 * FP32_PROB_NOISE
    if not noisy:
        raise ValueError(f"{dtype} routing bounds are calibrated: HF's {dtype} routing is needed")
    missing = [p for run in noisy for p in coverage(truth, run, prompts)]
    if missing:
        raise RuntimeError(f"HF's {dtype} routing is incomplete, so no bound can be calibrated: {missing[0]}")
    gaps = tie_gaps(truth, noisy[0], prompts)
    # worst over HF's bf16 runs; the rate's noise is how often HF's own rounding flips a token's experts at all
    runs = [summary(compare(truth, run, prompts, gaps, True), "agreement_all_tokens") for run in noisy]
    noise = {"routing_agreement": min(r["routing_agreement"] for r in runs),
             "router_prob_diff_mean": max(r["router_prob_diff_mean"] for r in runs)}
    calibration = Calibration(f"2 x HF-bf16 vs HF-fp32 routing, same prompts, worst of {len(noisy)} HF attention "
                              "kernels (agreement: HF-bf16's own flip rate over all tokens, worst layer)", noise,
                              CALIBRATION_FACTOR)
    return resolve(dtype, spec_tolerances, ROUTING_METRICS, calibration), calibration, gaps


def evaluate(truth_path: str, test_path, prompts: dict[str, list[list[int]]], dtype: str,
             spec_tolerances: dict, where: str, problems: list[str] | None = None,
             noise_path=None, judged_sets: list[str] | None = None) -> Verdict:
    """A backend's routing file(s) against HF fp32's (`noise_path`: HF's own routing in `dtype`, one file or
    several, for bf16);
    `test_path` None or empty: the backend produced none, which fails. `judged_sets`: calibrate and judge
    only these prompt sets; every set must still be there, the others' agreement is shown (`shown_sets`)."""
    truth, bad = load(truth_path, "reference")
    noise_paths = [noise_path] if isinstance(noise_path, str) else list(noise_path or [])
    noisy = [load(path, "HF-bf16")[0] for path in noise_paths] if dtype != "float32" else None
    judged = {n: seqs for n, seqs in prompts.items() if judged_sets is None or n in judged_sets}

    def only_judged(runs: dict) -> dict:
        return runs if judged_sets is None else {n: cells for n, cells in runs.items() if n in judged}

    tolerance, calibration, gaps = tolerance_for(dtype, spec_tolerances, only_judged(truth),
                                                 None if noisy is None else [only_judged(r) for r in noisy], judged)
    problems = list(problems or []) + [f"{where} {p}" for p in bad]
    if not test_path:
        return judge({}, tolerance, where, problems + ["the backend produced no routing"], calibration)
    test, bad = load(test_path, "backend")
    missing = coverage(truth, test, prompts) + bad
    if missing or problems:
        return judge({}, tolerance, where, problems + [f"{where} {p}" for p in missing], calibration)
    per_set = compare(truth, test, judged, gaps, dtype == "float32")
    verdict = judge(per_set, tolerance, where, [], calibration)
    shown = {n: seqs for n, seqs in prompts.items() if n not in judged}
    if shown:
        verdict.metrics["shown_sets"] = {name: {layer: {k: m[k] for k in ("agreement_all_tokens", "flips", "tokens")}
                                                for layer, m in layers.items()}
                                         for name, layers in compare(truth, test, shown, 0.0, True).items()}
    return verdict


def judge(per_set: dict, tolerance, where: str, problems: list[str] | None = None,
          calibration: Calibration | None = None) -> Verdict:
    problems = list(problems or [])
    if not per_set and not problems:
        problems.append(f"{where}: no prompt set was measured")
    unjudged = []
    layers = per_layer(per_set)
    for layer, row in layers.items():
        rate, bound = row["routing_agreement"], tolerance["min_routing_agreement"]
        if rate is None:
            unjudged.append(f"{layer}: no decisive token (all {row['tokens']} near-ties)")
        elif not rate >= bound:
            problems.append(f"{where} {layer}: routing_agreement = {rate:.4g} < {bound:.4g} over {row['judged_tokens']} "
                            f"tokens of every prompt set, worst {row['worst_set']!r} ({row['near_tie_tokens']} "
                            f"near-ties, {row['near_tie_flips']} of them flipped)")
    for name, layer, m in _cells(per_set):
        mean, bound = m["router_prob_diff_mean"], tolerance["max_router_prob_diff_mean"]
        if not mean <= bound:  # NaN is never within a bound
            problems.append(f"{where} {layer} prompt set {name!r}: router_prob_diff_mean = {mean:.4g} > {bound:.4g} "
                            f"(max {m['router_prob_diff']:.4g})")
    metrics: dict[str, Any] = {}
    if per_set:
        metrics = {**summary(per_set), "per_layer": layers, "per_set": per_set,
                   "near_tie_tokens": sum(m["near_tie_tokens"] for _, _, m in _cells(per_set)),
                   "near_tie_flips": sum(m["near_tie_flips"] for _, _, m in _cells(per_set)),
                   "near_tie_rule": NEAR_TIE_RULE}
        if metrics["routing_agreement"] is None:
            problems.append(f"{where}: routing_agreement has no decisive token to judge in any layer")
    if unjudged:
        metrics["unjudged"] = unjudged
    if calibration is not None:
        metrics["calibration"] = calibration.as_dict()
    return from_problems(problems, metrics, tolerance, what="routing disagreements")
