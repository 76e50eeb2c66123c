"""Parity metrics between a backend's log-probabilities and the HF reference's (plain numbers out).

Inputs are full-vocabulary log-probs [batch, seq, vocab] per prompt set, right
padded; only positions inside each sequence count.
  max_abs_logprob / mean_abs_logprob  |Δlogprob| over every vocabulary entry
  top1_agreement                       fraction of positions whose argmax agrees
  topk_overlap                         mean |top-k ∩ top-k| / k (k = 5)
  greedy_equal                         the next token after each full prompt agrees
  mean_exp_abs_logprob                 NeMo-RL's mean exp(|Δlogp|) on the prompt's own next tokens
"""
from __future__ import annotations

from typing import Any

import torch

TOP_K = 5


def compare_set(ref: torch.Tensor, test: torch.Tensor, seqs: list[list[int]]) -> dict[str, Any]:
    if ref.shape != test.shape:
        raise ValueError(f"log-prob shapes differ: reference {tuple(ref.shape)} vs backend {tuple(test.shape)}")
    valid = torch.zeros(ref.shape[:2], dtype=torch.bool)
    for i, seq in enumerate(seqs):
        valid[i, : len(seq)] = True
    r, t = ref[valid].double(), test[valid].double()  # [positions, vocab]
    diff = (r - t).abs()
    k = min(TOP_K, r.shape[-1])
    top_r, top_t = r.topk(k, dim=-1).indices, t.topk(k, dim=-1).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_r, top_t)])
    realized = []  # |Δ| of log p(actual next token)
    greedy = []
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n > 1:
            nxt = torch.tensor(seq[1:])
            realized.append((ref[i, : n - 1].double().gather(-1, nxt[:, None]) -
                             test[i, : n - 1].double().gather(-1, nxt[:, None])).abs().squeeze(-1))
        greedy.append(int(ref[i, n - 1].argmax()) == int(test[i, n - 1].argmax()))
    realized_all = torch.cat(realized) if realized else torch.zeros(1, dtype=torch.float64)
    per_position = diff.max(dim=-1).values
    return {
        "positions": int(valid.sum()),
        "sequences": len(seqs),
        "max_abs_logprob": float(diff.max()),
        "mean_abs_logprob": float(diff.mean()),
        "top1_agreement": float((r.argmax(-1) == t.argmax(-1)).double().mean()),
        "topk_overlap": float(overlap.mean()),
        "greedy_equal": float(sum(greedy) / len(greedy)),
        "mean_exp_abs_logprob": float(realized_all.exp().mean()),
        "worst_position": int(per_position.argmax()),
        "per_position_max_abs": [round(float(x), 8) for x in per_position[:256]],
    }


def compare_files(ref_path: str, test_path: str, prompts: dict[str, list[list[int]]]) -> dict[str, dict[str, Any]]:
    from safetensors.torch import load_file

    ref, test = load_file(ref_path), load_file(test_path)
    return {name: compare_set(ref[name], test[name], seqs) for name, seqs in prompts.items()}
