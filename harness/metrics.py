"""Parity metrics between a backend's log-probabilities and the HF reference's (plain numbers out).

Inputs are full-vocabulary log-probs [batch, seq, vocab] per prompt set, right padded; only
positions inside each sequence count. `coverage` runs first: a backend that returned less than the
reference (a set, a sequence, a position, a vocabulary entry) or non-finite values is named there,
and no metric is computed from it.
  max_abs_logprob / mean_abs_logprob  |Δlogprob| over every vocabulary entry
  top1_agreement                       fraction of *decisive* positions whose argmax agrees
  topk_overlap                         mean |top-k ∩ top-k| / k (k = 5) at positions decisive for the top-k
  greedy_equal                         the next token after each full prompt agrees (decisive prompts)
  mean_exp_abs_logprob                 NeMo-RL's mean exp(|Δlogp|) on the prompt's own next tokens
A position is decisive when the reference's top-1/top-2 margin (top-k/top-k+1 for the overlap) is
larger than `min_margin` there: bf16 rounding flips near-ties in any correct backend, so agreement
is judged where the reference is decisive and near-ties are counted beside it, not judged.
"""
from __future__ import annotations

from typing import Any

import torch

TOP_K = 5


def coverage(ref: dict[str, torch.Tensor], test: dict[str, torch.Tensor],
             prompts: dict[str, list[list[int]]]) -> list[str]:
    """What the backend's log-prob file lacks (or has extra) against the prompt sets asked for."""
    problems = []
    for name, seqs in prompts.items():
        if name not in ref:
            problems.append(f"prompt set {name!r}: missing from the reference")
            continue
        if name not in test:
            problems.append(f"prompt set {name!r}: missing from the backend's output")
            continue
        r, t = ref[name], test[name]
        if t.dim() != 3:
            problems.append(f"prompt set {name!r}: backend log-probs have shape {tuple(t.shape)}, "
                            f"expected [sequences, positions, vocabulary] {tuple(r.shape)}")
            continue
        for axis, what in ((0, "sequences"), (1, "positions"), (2, "vocabulary entries")):
            if t.shape[axis] != r.shape[axis]:
                problems.append(f"prompt set {name!r}: the backend returned {t.shape[axis]} {what}, "
                                f"the reference has {r.shape[axis]}")
        if t.shape == r.shape:
            bad = sum(int((~torch.isfinite(t[i, : len(seq)])).sum()) for i, seq in enumerate(seqs))
            if bad:
                problems.append(f"prompt set {name!r}: {bad} non-finite log-probs from the backend")
    for name in sorted(set(test) - set(prompts)):
        problems.append(f"prompt set {name!r}: returned by the backend but never asked for")
    return problems


def non_finite_sets(test: dict[str, torch.Tensor], prompts: dict[str, list[list[int]]]) -> list[str]:
    """Prompt sets whose log-probs hold a NaN/inf inside a sequence: numeric evidence a localization can use."""
    return [name for name, seqs in prompts.items() if name in test and test[name].dim() == 3
            and any(not bool(torch.isfinite(row[: len(seq)]).all()) for row, seq in zip(test[name], seqs))]


def valid_mask(shape, seqs: list[list[int]]) -> torch.Tensor:
    valid = torch.zeros(shape[:2], dtype=torch.bool)
    for i, seq in enumerate(seqs):
        valid[i, : len(seq)] = True
    return valid


def gaps(rows: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the top-1/top-2 margin and the top-k/top-(k+1) margin (what a rounding error must overcome)."""
    k = min(k, rows.shape[-1] - 1)
    top = rows.double().topk(k + 1, dim=-1).values
    return top[..., 0] - top[..., 1], top[..., k - 1] - top[..., k]


def position_noise(ref: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """max over the vocabulary of |noisy - ref| per position (HF-bf16 vs HF-fp32: the rounding scale)."""
    return (ref.double() - noisy.double()).abs().amax(dim=-1)


def _rate(flags: torch.Tensor) -> float | None:
    return float(flags.double().mean()) if flags.numel() else None


def compare_set(ref: torch.Tensor, test: torch.Tensor, seqs: list[list[int]],
                min_margin: torch.Tensor | float) -> dict[str, Any]:
    """Metrics of one prompt set (shapes already checked by `coverage`); `min_margin` per position or one value."""
    valid = valid_mask(ref.shape, seqs)
    margin = torch.as_tensor(min_margin, dtype=torch.float64).expand(ref.shape[:2])
    r, t = ref[valid].double(), test[valid].double()  # [positions, vocab]
    diff = (r - t).abs()
    k = min(TOP_K, r.shape[-1])
    gap1, gapk = gaps(r, k)
    need = margin[valid]
    decisive, decisive_k = gap1 > need, gapk > need
    agree = r.argmax(-1) == t.argmax(-1)
    top_r, top_t = r.topk(k, dim=-1).indices, t.topk(k, dim=-1).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_r, top_t)],
                           dtype=torch.float64)
    realized, greedy, greedy_decisive = [], [], []  # |Δ| of log p(actual next token); next token after the prompt
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n > 1:
            nxt = torch.tensor(seq[1:])
            realized.append((ref[i, : n - 1].double().gather(-1, nxt[:, None]) -
                             test[i, : n - 1].double().gather(-1, nxt[:, None])).abs().squeeze(-1))
        g1, _ = gaps(ref[i, n - 1][None], k)
        greedy.append(int(ref[i, n - 1].argmax()) == int(test[i, n - 1].argmax()))
        greedy_decisive.append(bool(g1[0] > margin[i, n - 1]))
    # a set of one-token prompts has no next token inside it: NeMo-RL's metric has nothing to average there
    realized_all = torch.cat(realized) if realized else None
    greedy_t, greedy_d = torch.tensor(greedy), torch.tensor(greedy_decisive)
    per_position = diff.max(dim=-1).values
    return {
        "positions": int(valid.sum()),
        "sequences": len(seqs),
        "decisive_positions": int(decisive.sum()),
        "decisive_topk_positions": int(decisive_k.sum()),
        "decisive_sequences": int(greedy_d.sum()),
        "max_abs_logprob": float(diff.max()),
        "mean_abs_logprob": float(diff.mean()),
        "top1_agreement": _rate(agree[decisive]),
        "topk_overlap": _rate(overlap[decisive_k]),
        "greedy_equal": _rate(greedy_t[greedy_d]),
        "near_tie_positions": int((~decisive).sum()),
        "near_tie_top1_agreement": _rate(agree[~decisive]),
        "mean_exp_abs_logprob": float(realized_all.exp().mean()) if realized_all is not None else None,
        "worst_position": int(per_position.argmax()),
        "per_position_max_abs": [round(float(x), 8) for x in per_position[:256]],
    }


def load(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)
