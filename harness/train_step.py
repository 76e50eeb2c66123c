"""The fixed training batch and loss every train-step check uses, and the plain-torch reference step.

Loss = cross-entropy averaged over every unmasked label token of the *global* batch (labels are the
next token; padding and each sequence's first PROMPT_TOKENS positions are masked with -100). A data
-parallel rank holding part of the batch scales its partial sum so that the DP-averaged gradient is the
gradient of that global mean.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
PROMPT_TOKENS = 2  # label masking: the first tokens of each sequence are "prompt", not trained on
OPTIMIZER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
STEPS = 3


def make_batch(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and next-token labels with masking."""
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        ids[i, :n], mask[i, :n] = torch.tensor(seq), 1
        labels[i, : n - 1] = torch.tensor(seq[1:])
        labels[i, : min(PROMPT_TOKENS, n - 1)] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_sum_and_count(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies (fp32) over unmasked labels, and how many there are."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    target = labels.reshape(-1)
    return F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum"), int((target != IGNORE).sum())


def first_update_weights(named_parameters) -> dict[str, torch.Tensor]:
    """Weights right after the first optimizer step.

    Judged after one step, not N: Adam divides every element by its own gradient RMS, so after a
    few steps tiny (correct) fp32 differences in small gradients grow into ~lr-sized weight
    differences. The loss curve still covers all N steps.
    """
    return {n: p.detach().float().clone() for n, p in named_parameters}


def reference_step(model, batch: dict[str, torch.Tensor], steps: int = STEPS,
                   warmup_zero_steps: int = 0) -> dict[str, Any]:
    """Plain torch: N AdamW steps on the whole batch. Returns losses, first-step grads and weights after step one.

    warmup_zero_steps emulates optimizers that initialise Adam's state with zero-gradient steps
    before training (DeepSpeed's FP16_UnfusedOptimizer.initialize_optimizer_states does one): each
    applies decoupled weight decay once and advances Adam's step count.
    """
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER)
    for _ in range(warmup_zero_steps):
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
    total = int((batch["labels"] != IGNORE).sum())
    losses, grads = [], {}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, _ = loss_sum_and_count(logits, batch["labels"])
        loss = loss_sum / total
        loss.backward()
        losses.append(float(loss))
        if step == 0:
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        if step == 0:
            weights = first_update_weights(model.named_parameters())
    return {"losses": losses, "grads": grads, "weights": weights}


def save_train_result(result: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """losses inline; grads and weights as safetensors files (they can be large)."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result["grads"].items()}, str(out / "grads.safetensors"))
    save_file({k: v.contiguous() for k, v in result["weights"].items()}, str(out / "weights.safetensors"))
    return {"losses": result["losses"], "grads": str(out / "grads.safetensors"),
            "weights": str(out / "weights.safetensors")}
