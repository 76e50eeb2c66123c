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

ROLLOUT_BOUNDS = {
    "max_abs_logprob": ("max_abs_logprob", True),
    "mean_abs_logprob": ("mean_abs_logprob", True),
    "max_mean_exp_abs_logprob": ("mean_exp_abs_logprob", True),
    "max_prob_diff_mean": ("prob_diff_mean", True),
}


def trainer_token_logprobs(full: torch.Tensor, samples: list[dict], temperature: float,
                           scales: bool) -> list[list[float]]:
    """`full`: the trainer's log-softmax [batch, seq, vocab] of prompt+generated, right padded."""
    out = []
    for i, sample in enumerate(samples):
        start, tokens = len(sample["prompt"]) - 1, sample["generated"]
        rows = full[i, start:start + len(tokens)].double()
        if scales:  # log_softmax is shift-invariant, so scaling log-probs equals scaling the logits
            rows = torch.log_softmax(rows / temperature, dim=-1)
        out.append(rows.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist())
    return out


def compare(samples: list[dict], engine: list[list[float]], trainer: list[list[float]]) -> dict[str, dict[str, Any]]:
    cells: dict[str, list[tuple[float, float]]] = {}
    for sample, e, t in zip(samples, engine, trainer):
        cells.setdefault(sample["cell"], []).extend(zip(e, t))
    per_cell = {}
    for cell, pairs in cells.items():
        deltas = [abs(a - b) for a, b in pairs]
        per_cell[cell] = {
            "tokens": len(pairs),
            "max_abs_logprob": max(deltas),
            "mean_abs_logprob": sum(deltas) / len(deltas),
            "mean_exp_abs_logprob": sum(math.exp(d) for d in deltas) / len(deltas),
            "prob_diff_mean": sum(abs(math.exp(a) - math.exp(b)) for a, b in pairs) / len(pairs),
        }
    return per_cell
