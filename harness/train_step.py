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
# Megatron trains the batch as this many micro-batches through megatron-core's schedule (loss unchanged)
MICROBATCHES = 2


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


def _mixed_precision(master, dtype: torch.dtype | None, compute_dtype: torch.dtype | None):
    """The module forward/backward run on: the fp32 master itself, or a copy whose *parameters* are
    in compute_dtype (buffers such as RoPE's inv_freq stay fp32, as Megatron and DeepSpeed keep them).

    dtype (the dtype the trainer is given the weights in) bf16: the fp32 master first takes the
    bf16-rounded values, as in megatron-core (DistributedOptimizer main params = the bf16
    parameters' .float()) and DeepSpeed (BF16_Optimizer, ZeRO 1-3, FP16_UnfusedOptimizer: fp32
    partitions cloned from the bf16 module)."""
    import copy

    if dtype is not None and dtype != torch.float32:
        with torch.no_grad():
            for param in master.parameters():
                param.copy_(param.to(dtype))
    if (dtype is None or dtype == torch.float32) and (compute_dtype is None or compute_dtype == torch.float32):
        return master
    compute = copy.deepcopy(master)
    compute_dtype = compute_dtype or dtype
    for param in compute.parameters():
        param.data = param.data.to(compute_dtype)
    return compute


def reference_step(model, batch: dict[str, torch.Tensor], steps: int = STEPS, warmup_zero_steps: int = 0,
                   dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Plain torch: N AdamW steps on the whole batch. Returns losses, first-step grads and weights after step one.

    `model` (fp32) holds the weights AdamW updates: the master copy. dtype=torch.bfloat16 emulates
    mixed precision as megatron-core (bf16 + DistributedOptimizer) and DeepSpeed (bf16, every ZeRO
    stage) train: the master starts from the bf16-rounded weights; each step casts it to a bf16
    copy, runs forward and backward there, hands the bf16 gradients to AdamW as fp32 and updates
    the fp32 master. The weights returned are the master's, the gradients the fp32 values AdamW
    receives. compute_dtype (default: dtype) changes only the computation: torch.float32 with
    dtype bf16 runs forward and backward in fp32 on the very same bf16 weight copies, i.e. the same
    recipe without the rounding of activations and gradients, the run the bf16 bounds are
    calibrated against.

    warmup_zero_steps emulates optimizers that initialise Adam's state with zero-gradient steps
    before training (DeepSpeed's FP16_UnfusedOptimizer.initialize_optimizer_states does one): each
    applies decoupled weight decay once and advances Adam's step count.
    """
    master = dict(model.named_parameters())
    compute = _mixed_precision(model, dtype, compute_dtype)
    compute_params = dict(compute.named_parameters())
    optimizer = torch.optim.AdamW(master.values(), **OPTIMIZER)
    for _ in range(warmup_zero_steps):
        for param in master.values():
            param.grad = torch.zeros_like(param)
        optimizer.step()
    total = int((batch["labels"] != IGNORE).sum())
    losses, grads = [], {}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if compute is not model:
            compute.zero_grad(set_to_none=True)
            with torch.no_grad():  # this step's bf16 copy of the master weights (in compute_dtype)
                for name, param in compute_params.items():
                    param.copy_(master[name].to(dtype or compute_dtype))
        logits = compute(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, _ = loss_sum_and_count(logits, batch["labels"])
        loss = loss_sum / total
        loss.backward()
        losses.append(float(loss))
        if compute is not model:
            for name, param in compute_params.items():
                master[name].grad = None if param.grad is None else param.grad.detach().float()
        if step == 0:
            grads = {n: p.grad.detach().float().clone() for n, p in master.items() if p.grad is not None}
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
    # parameter_order: the producer's own order (the reference's is named_parameters(), the forward order)
    return {"losses": result["losses"], "grads": str(out / "grads.safetensors"),
            "weights": str(out / "weights.safetensors"), "parameter_order": list(result["grads"])}
