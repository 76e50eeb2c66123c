"""Trainer <-> engine parity: the RL mismatch between the logprobs the engine reported for the tokens it
sampled and the logprobs the trainer computes for the same tokens.

The trainer side follows the spec's rollout settings: with trainer_scales_by_temperature it scores
log_softmax(logits / T) (ROLL, verl and NeMo-RL do); the engine side is whatever its logprob mode
returns (vLLM raw_logprobs ignore T, processed_logprobs include it). A disagreement between the two
conventions is exactly the bug this check exists for: it shows at T != 1 and vanishes at T = 1.
Metrics per grid cell (generated length x batch): max/mean |Δlogp|, NeMo-RL's mean exp(|Δlogp|),
verl's mean |Δp|.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..tolerances import BOTH_SIDES_FACTOR, BOUND_METRICS, ROLLOUT_METRICS, Calibration, resolve

ROLLOUT_BOUNDS = {key: BOUND_METRICS[key] for key in ROLLOUT_METRICS}


def realized_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                      scales: bool) -> torch.Tensor:
    """The trainer's log-prob of each realized next token, [batch, seq] float64 (position t scores input_ids[t + 1];
    the last position is NaN): what a trainer backend's worker returns for rollout scoring instead of the
    [batch, seq, vocab] log-softmax, which at a real vocabulary (151,936) is hundreds of MB per batch.
    `logits` [batch, seq, vocab]; with `scales`, log_softmax(logits / T) as ROLL, verl and NeMo-RL score."""
    out = torch.full(input_ids.shape, math.nan, dtype=torch.float64)
    for i in range(input_ids.shape[0]):  # one sequence's float64 vocabulary rows at a time
        rows = torch.log_softmax(logits[i, :-1].float(), dim=-1).double()
        if scales:  # log_softmax is shift-invariant, so scaling log-probs equals scaling the logits
            rows = torch.log_softmax(rows / temperature, dim=-1)
        out[i, :-1] = rows.gather(-1, input_ids[i, 1:].long().cpu()[:, None]).squeeze(-1)
    return out


def trainer_token_logprobs(realized: torch.Tensor, samples: list[dict]) -> list[list[float]]:
    """`realized` ([batch, seq], realized_logprobs of prompt+generated): each sample's generated tokens' scores."""
    out = []
    for i, sample in enumerate(samples):
        if i >= realized.shape[0]:  # the trainer scored fewer sequences: `coverage` names the gap
            out.append([])
            continue
        start = len(sample["prompt"]) - 1
        out.append(realized[i, start:start + len(sample["generated"])].tolist())
    return out


def coverage(cells: list[dict], samples: list[dict], engine: list[list[float]],
             trainer: list[list[float]] | None = None) -> list[str]:
    """What the engine (or the trainer) returned short of the grid asked for: samples per cell, tokens per sample."""
    problems = []
    asked = {cell["cell"]: cell for cell in cells}
    got: dict[str, int] = {}
    if len(engine) != len(samples):
        problems.append(f"{len(engine)} engine log-prob lists for {len(samples)} samples")
    if trainer is not None and len(trainer) != len(samples):
        problems.append(f"{len(trainer)} trainer scores for {len(samples)} samples")
    for i, sample in enumerate(samples):
        cell = asked.get(sample["cell"])
        if cell is None:
            problems.append(f"sample {i}: from cell {sample['cell']!r}, which was never asked for")
            continue
        got[sample["cell"]] = got.get(sample["cell"], 0) + 1
        where = f"cell {sample['cell']} sample {got[sample['cell']] - 1}"
        if list(sample["prompt"]) != list(cell["prompt"]):
            problems.append(f"{where}: continues a different prompt than the one sent")
        if len(sample["generated"]) != cell["max_new_tokens"]:
            problems.append(f"{where}: {len(sample['generated'])} generated tokens of {cell['max_new_tokens']}")
        for side, lists in (("engine", engine), ("trainer", trainer)):
            if lists is None or i >= len(lists):
                continue
            if len(lists[i]) != len(sample["generated"]):
                problems.append(f"{where}: {len(lists[i])} {side} log-probs for {len(sample['generated'])} tokens")
            elif any(not math.isfinite(x) for x in lists[i]):
                problems.append(f"{where}: non-finite {side} log-probs")
    for name, cell in asked.items():
        if got.get(name, 0) != cell["n"]:
            problems.append(f"cell {name}: {got.get(name, 0)} samples returned of {cell['n']} asked for")
    return problems


def compare(samples: list[dict], engine: list[list[float]], trainer: list[list[float]]) -> dict[str, dict[str, Any]]:
    """Metrics per grid cell of samples that passed `coverage`."""
    cells: dict[str, list[tuple[float, float]]] = {}
    for sample, e, t in zip(samples, engine, trainer, strict=True):
        cells.setdefault(sample["cell"], []).extend(zip(e, t, strict=True))
    per_cell = {}
    for cell, pairs in cells.items():
        if not pairs:
            raise ValueError(f"cell {cell}: no tokens to compare")
        deltas = [abs(a - b) for a, b in pairs]
        per_cell[cell] = {
            "tokens": len(pairs),
            "max_abs_logprob": max(deltas),
            "mean_abs_logprob": sum(deltas) / len(deltas),
            "mean_exp_abs_logprob": sum(math.exp(d) for d in deltas) / len(deltas),
            "prob_diff_mean": sum(abs(math.exp(a) - math.exp(b)) for a, b in pairs) / len(pairs),
        }
    return per_cell


def evaluate(cells: list[dict], samples: list[dict], engine: list[list[float]], trainer: list[list[float]],
             dtype: str, spec_tolerances: dict, where: str, problems: list[str] | None = None,
             hf_truth: list[list[float]] | None = None, hf_noisy: list[list[list[float]]] | None = None):
    """Engine vs trainer on the sampled tokens; bf16 bounds from HF-bf16 vs HF-fp32 on these very tokens
    (`hf_noisy`: HF's bf16 scoring runs, one or an MoE model's several: logits.NOISE_RUNS_RULE)."""
    from .logits import judge, runs_method, worst, worst_of_runs

    calibration = None
    if dtype != "float32":
        if hf_truth is None or not hf_noisy:
            raise ValueError("a bf16 rollout check needs HF's fp32 and bf16 scores of the same tokens")
        runs = list(hf_noisy)
        noise = worst_of_runs([worst(compare(samples, hf_truth, run), ROLLOUT_BOUNDS) for run in runs], ROLLOUT_BOUNDS)
        calibration = Calibration(runs_method(f"{BOTH_SIDES_FACTOR:g} x HF-bf16 vs HF-fp32 on the sampled tokens "
                                              "(both sides bf16)", runs), noise, BOTH_SIDES_FACTOR)
    tolerance = resolve(dtype, spec_tolerances, ROLLOUT_METRICS, calibration)
    missing = coverage(cells, samples, engine, trainer)
    problems = list(problems or []) + [f"{where}: {p}" for p in missing]
    per_cell = {} if missing else compare(samples, engine, trainer)
    verdict = judge(per_cell, tolerance, where, problems, bounds=ROLLOUT_BOUNDS)
    verdict.metrics["samples"] = len(samples)
    return verdict
