"""The fixed training batch and loss every train-step check uses, and the plain-torch reference step.

Loss = cross-entropy averaged over every unmasked label token of the *global* batch (labels are the
next token; padding and each sequence's first PROMPT_TOKENS positions are masked with -100). A data
-parallel rank holding part of the batch scales its partial sum so that the DP-averaged gradient is the
gradient of that global mean.
"""
from __future__ import annotations

import contextlib
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


def switch_aux_losses(router_logits, topk: int, valid: torch.Tensor | None = None,
                      chosen_ids: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """megatron-core's load-balancing loss per MoE layer, before its coefficient (what its aux-loss tracker logs):
    moe_utils.switch_load_balancing_loss_func on compute_routing_scores_for_aux_loss's scores, i.e.
    E / (k T^2) * sum_i (tokens routed to expert i) * (sum of expert i's softmax probabilities) over the T tokens
    counted (`valid`: a [B, S] mask, megatron's padding_mask inverted; None = every token, as without one).
    `chosen_ids` ([tokens, k] per layer): count these experts instead of the scores' own top-k (a replayed
    trainer's routing: megatron-core counts the choices its own router made)."""
    out = []
    for i, logits in enumerate(router_logits):  # [tokens, experts] per MoE layer, batch-major
        scores = torch.softmax(logits.float(), dim=-1)
        ids = scores.topk(topk, dim=-1).indices if chosen_ids is None else chosen_ids[i].reshape(-1, topk)
        chosen = torch.zeros_like(scores).scatter(1, ids.to(scores.device), 1.0)
        if valid is not None:
            keep = valid.reshape(-1, 1).to(scores.dtype)
            scores, chosen = scores * keep, chosen * keep
        tokens = chosen.sum() / topk
        out.append((chosen.sum(0) * scores.sum(0)).sum() * scores.shape[-1] / (topk * tokens * tokens))
    return out


def megatron_aux_objective(router_logits, topk: int, attention_mask: torch.Tensor, microbatches: int,
                           label_tokens: int, chosen: list[torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, list[float]]:
    """megatron-core's load-balancing term as its schedule differentiates it (before the coefficient) and
    the per-layer values its tracker logs. The batch's rows run as `microbatches` micro-batches; each
    layer's switch loss is taken per micro-batch over its valid tokens (the padding mask the Megatron
    ranks pass). Its gradient reaches the weights as sum over micro-batches of aux_m / (the batch's label
    tokens): measured on megatron-core 0.16.1 with calculate_per_token_loss (first-step gradients equal to
    1e-7 at coefficient 0.01; weighting each micro-batch by its token count, as the router's comment on
    valid_token_count reads, is 20 x off). Logged: the mean over micro-batches, per layer."""
    rows = torch.arange(attention_mask.shape[0]).tensor_split(microbatches)
    b, s = attention_mask.shape
    objective, logged = 0.0, []
    for i, logits in enumerate(router_logits):  # [b * s, E] per MoE layer, batch-major
        per_row = logits.reshape(b, s, -1)
        values = []
        for part in rows:
            valid = attention_mask[part].bool()
            ids = None if chosen is None else [chosen[i][part]]  # [b, s, k] replayed experts
            (value,) = switch_aux_losses([per_row[part].reshape(-1, per_row.shape[-1])], topk, valid, ids)
            objective = objective + value / label_tokens
            values.append(value)
        logged.append(float(torch.stack(values).mean()))
    return objective, logged


def aux_coefficient(model) -> float:
    """The load-balancing coefficient training uses (HF's router_aux_loss_coef; 0 for a dense model)."""
    return float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)


def first_update_weights(named_parameters) -> dict[str, torch.Tensor]:
    """Weights right after the first optimizer step.

    Judged after one step, not N: Adam divides every element by its own gradient RMS, so after a
    few steps tiny (correct) fp32 differences in small gradients grow into ~lr-sized weight
    differences. The loss curve still covers all N steps.
    """
    return {n: p.detach().float().clone() for n, p in named_parameters}


def checkpoint_named(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter tensors renamed (and split) from the module's in-memory names to the checkpoint's, in the
    same parameter order: transformers 5 holds an MoE layer's experts FUSED (mlp.experts.gate_up_proj [E, 2I, H])
    but save_pretrained writes them per expert (mlp.experts.E.gate_proj.weight) through revert_weight_conversion,
    and templates, Megatron's reverse conversion and the judges speak the checkpoint's names. A dense model's
    names come back unchanged."""
    from transformers.core_model_loading import revert_weight_conversion

    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():  # one at a time: each parameter's pieces stay at its place in the order
        out.update((k, v.contiguous()) for k, v in revert_weight_conversion(model, {name: tensor}).items())
    return out


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
                   dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None,
                   routing: dict[int, dict[int, torch.Tensor]] | None = None,
                   aux_microbatches: int = 0, spill=None) -> dict[str, Any]:
    """Plain torch: N AdamW steps on the whole batch. Returns losses, first-step grads and weights after step one
    (`spill(kind, tensors)`: given them as soon as they exist, under checkpoint names, and they are not returned:
    held through the later steps they are two more copies of a real-shape model).

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

    A MoE model's router decisions at every step come back as "routing" (routing_key tensors); `routing`
    ({step: {layer: [B, S, k] expert ids}}, a trainer's own) replays them: each step's forward sends every
    token to the trainer's experts, weighted by the reference's own router (capture.routing_forced).
    aux_microbatches > 0 adds the MoE load-balancing loss (router_aux_loss_coef) as megatron-core's schedule
    does over that many micro-batches, and reports step 0's per-layer values ("aux_losses"); 0: the
    cross-entropy alone (a trainer that adds no such term, as the DeepSpeed ranks).
    """
    from .capture import routing_capture, routing_forced
    master = dict(model.named_parameters())
    compute = _mixed_precision(model, dtype, compute_dtype)
    compute_params = dict(compute.named_parameters())
    optimizer = torch.optim.AdamW(master.values(), **OPTIMIZER)
    for _ in range(warmup_zero_steps):
        for param in master.values():
            param.grad = torch.zeros_like(param)
        optimizer.step()
    total = int((batch["labels"] != IGNORE).sum())
    # the load-balancing term in the objective only where the trainer adds it (aux_microbatches: Megatron's
    # schedule, megatron_aux_objective); losses are reported as the cross-entropy, as the trainers log it
    coefficient = aux_coefficient(model) if aux_microbatches else 0.0
    aux: dict[str, float] = {}
    losses, grads, routed = [], {}, {}
    moe = bool(moe_layer_ids(model))
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if compute is not model:
            compute.zero_grad(set_to_none=True)
            with torch.no_grad():  # this step's bf16 copy of the master weights (in compute_dtype)
                for name, param in compute_params.items():
                    param.copy_(master[name].to(dtype or compute_dtype))
        store: dict[str, torch.Tensor] = {}
        with routing_capture(compute, store) if moe else contextlib.nullcontext(), \
                routing_forced(compute, routing[step]) if routing is not None else contextlib.nullcontext():
            out = compute(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          **({"output_router_logits": True} if coefficient else {}))
        routed.update((routing_key(step, key), tensor) for key, tensor in store.items())
        loss_sum, _ = loss_sum_and_count(out.logits, batch["labels"])
        loss = loss_sum / total
        objective = loss
        if coefficient:  # the trainer's objective: CE + coefficient x each MoE layer's load-balancing loss
            replayed = None if routing is None else [routing[step][i] for i in moe_layer_ids(compute)]
            term, logged = megatron_aux_objective(out.router_logits, compute.config.num_experts_per_tok,
                                                  batch["attention_mask"], aux_microbatches, total, replayed)
            if step == 0:
                aux = {f"layers.{i}": v for i, v in zip(moe_layer_ids(compute), logged)}
            objective = loss + coefficient * term
        objective.backward()
        losses.append(float(loss))
        if compute is not model:
            for name, param in compute_params.items():
                master[name].grad = None if param.grad is None else param.grad.detach().float()
        if step == 0 and spill is not None:  # written before the optimizer steps: no copy needed
            named = checkpoint_named(model, {n: p.grad.detach().float() for n, p in master.items() if p.grad is not None})
            spill("grads", named)
            order, grads, named = list(named), None, None
        elif step == 0:  # order: save_train_result takes the returned grads' own
            grads, order = {n: p.grad.detach().float().clone() for n, p in master.items() if p.grad is not None}, None
        optimizer.step()
        if step == 0 and spill is not None:  # written before the next step changes them: no clone needed
            spill("weights", checkpoint_named(model, {n: p.detach().float() for n, p in model.named_parameters()}))
            weights = None
        elif step == 0:
            weights = first_update_weights(model.named_parameters())
    result = {"losses": losses, "grads": None if grads is None else checkpoint_named(model, grads),
              "weights": None if weights is None else checkpoint_named(model, weights), "parameter_order": order}
    if moe:
        result["routing"] = routed
    return {**result, "aux_losses": aux} if coefficient else result


def routing_key(step: int, key: str) -> str:
    """A train step's routing key: the routing file's (harness/checks/routing.py) with the step as prompt set."""
    return f"step{step}/{key}"


def replay_routing(tensors: dict[str, torch.Tensor]) -> dict[int, dict[int, torch.Tensor]]:
    """{step: {layer: topk}} from a train routing file's tensors (routing_key names)."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        step, layer, kind = key.split("/")
        if kind == "topk":
            out.setdefault(int(step.removeprefix("step")), {})[int(layer.removeprefix("layers."))] = tensor
    return out


def moe_layer_ids(model) -> list[int]:
    """Global ids of the layers whose MLP returns router logits (HF's router_logits order)."""
    layers = model.model.layers
    return [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


def spill_to(out_dir: str):
    """reference_step's `spill`: each kind written at once as out_dir/<kind>.safetensors (save_train_result's)."""
    from pathlib import Path

    from safetensors.torch import save_file

    def spill(kind: str, tensors: dict[str, torch.Tensor]) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(out_dir) / f"{kind}.safetensors"))

    return spill


class StreamSpill:
    """One kind (grads, weights) of a train result written parameter by parameter into out_dir/<kind>.safetensors
    as each value arrives, under checkpoint names and laid out as save_file lays them out (the same bytes): a
    trainer gathering a real-shape model's gradients or weights one parameter at a time (DeepSpeed ZeRO-3's
    rank 0) never holds them all (1.8 GiB more at the 0.5B shape). Planned from `shapes` ({parameter: its full
    shape}); a parameter whose value never arrives (a frozen one has no gradient) is left out on close."""

    def __init__(self, out_dir: str, kind: str, model, shapes: dict[str, tuple[int, ...]]):
        from pathlib import Path

        from .convert.stream import StreamWriter

        self.model, self.path = model, Path(out_dir) / f"{kind}.safetensors"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        planned = checkpoint_named(model, {n: torch.empty(shape, device="meta") for n, shape in shapes.items()})
        self.writer = StreamWriter(self.path, {name: ("F32", tuple(t.shape)) for name, t in planned.items()})

    def write(self, name: str, value: torch.Tensor) -> None:
        for piece, tensor in checkpoint_named(self.model, {name: value.detach().float()}).items():
            self.writer.write(piece, tensor)

    def close(self) -> None:
        self.writer.close()
        missing = self.writer.missing
        if missing:  # rare (frozen parameters): the file again without their planned places
            from safetensors import safe_open

            from .convert.stream import StreamWriter

            rest = {n: e for n, e in self.writer.entries.items() if n not in missing}
            staging = self.path.with_suffix(".partial")
            out = StreamWriter(staging, rest)
            with safe_open(str(self.path), framework="pt") as written:
                for name in rest:
                    out.write(name, written.get_tensor(name))
            out.close()
            staging.replace(self.path)


def save_train_result(result: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """losses inline; grads and weights as safetensors files (they can be large)."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spill = spill_to(out_dir)
    for kind in ("grads", "weights"):  # None: reference_step spilled them there already (spill_to)
        if result[kind] is not None:
            spill(kind, result[kind])
    # parameter_order: the producer's own order (the reference's is named_parameters(), the forward order)
    extra = {"aux_losses": result["aux_losses"]} if "aux_losses" in result else {}
    if result.get("routing"):  # a MoE model's router decisions per step (routing_key names)
        save_file(result["routing"], str(out / "routing.safetensors"))
        extra["routing"] = str(out / "routing.safetensors")
    return {"losses": result["losses"], "grads": str(out / "grads.safetensors"),
            "weights": str(out / "weights.safetensors"),
            "parameter_order": result.get("parameter_order") or list(result["grads"]), **extra}
