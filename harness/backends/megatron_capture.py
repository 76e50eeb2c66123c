"""Activation capture on a megatron-core GPTModel stage (local layer spec), for divergence localization.

Rank side (`capture`): forward hooks record the points of harness.checks.localize, transposed from
Megatron's [seq, batch, ...] to [batch, seq, ...], keyed by the GLOBAL layer index (TransformerLayer.
layer_number is 1-based across pipeline stages). q/k before and after rope come from wrapping
`apply_rotary_pos_emb` as megatron-core's attention module calls it (query, then key, per layer).
Each rank keeps its own TP shard of the split points. Parent side (`join`): the stages' points
together, TP shards concatenated along TP_SPLIT_DIM, replicated points from TP rank 0.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..checks.localize import TP_SPLIT_DIM


def _first_plus_bias(output: Any) -> torch.Tensor:
    """(output, bias) of a Megatron linear/attention/MLP: the bias is added where HF's module adds it."""
    if isinstance(output, (tuple, list)):
        out, bias = output[0], output[1] if len(output) > 1 else None
        return out + bias if isinstance(bias, torch.Tensor) else out
    return output


def _keep(store: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    store[name] = tensor.detach().float().transpose(0, 1).cpu().contiguous().clone()  # later ops add in place


@contextlib.contextmanager
def capture(model, store: dict[str, torch.Tensor]):
    from megatron.core.transformer import attention as attention_module

    handles, current = [], {"layer": None, "rope_calls": 0}

    def out_hook(name, with_bias=True):
        return lambda _m, _a, output: _keep(store, name, _first_plus_bias(output) if with_bias else output[0])

    def in_hook(name):
        return lambda _m, args: _keep(store, name, args[0])

    def add(module, name, pre=False, with_bias=True):
        if module is not None:
            handles.append(module.register_forward_pre_hook(in_hook(name)) if pre else
                           module.register_forward_hook(out_hook(name, with_bias)))

    if getattr(model, "embedding", None) is not None:
        add(model.embedding, "embedding")
    for layer in model.decoder.layers:
        index = layer.layer_number - 1
        prefix = f"layers.{index}."

        def enter(_m, _a, i=index):
            current.update(layer=i, rope_calls=0)

        handles.append(layer.register_forward_pre_hook(enter))
        add(layer.input_layernorm, prefix + "input_norm")
        add(layer.self_attention, prefix + "attention")
        add(getattr(layer.self_attention, "linear_proj", None), prefix + "attention.context", pre=True)
        add(layer.pre_mlp_layernorm, prefix + "mlp_norm")
        add(layer.mlp, prefix + "mlp")
        add(getattr(layer.mlp, "linear_fc2", None), prefix + "mlp.activation", pre=True)
        add(layer, prefix + "output", with_bias=False)  # (hidden states, context)
    if getattr(model.decoder, "final_layernorm", None) is not None:
        add(model.decoder.final_layernorm, "final_norm")
    if getattr(model, "output_layer", None) is not None:
        add(model.output_layer, "logits", with_bias=False)

    original = attention_module.apply_rotary_pos_emb

    def recording_rope(t, *args, **kwargs):
        out = original(t, *args, **kwargs)
        which = "q" if current["rope_calls"] == 0 else "k"  # Attention.forward rotates query, then key
        current["rope_calls"] += 1
        prefix = f"layers.{current['layer']}.attention."
        _keep(store, prefix + which + "_pre_rope", t)
        _keep(store, prefix + which, out)
        return out

    attention_module.apply_rotary_pos_emb = recording_rope
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
        attention_module.apply_rotary_pos_emb = original


def _kind(point: str) -> str:
    parts = point.split(".", 2)
    return parts[2] if parts[0] == "layers" else point


def join(per_rank: dict[tuple[int, int], dict[str, torch.Tensor]], tp: int) -> dict[str, torch.Tensor]:
    """{(pp, tp): points} -> whole-model points (each point lives on one stage)."""
    out: dict[str, torch.Tensor] = {}
    for (stage, tp_rank), points in sorted(per_rank.items()):
        if tp_rank != 0:
            continue
        for point, tensor in points.items():
            dim = TP_SPLIT_DIM.get(_kind(point))
            if dim is None or tp == 1:
                out[point] = tensor
            else:
                out[point] = torch.cat([per_rank[(stage, t)][point] for t in range(tp)], dim=dim)
    return out


@contextlib.contextmanager
def record_routing(model, history: bool = False):
    """Every MoE layer's router decisions in this stage's forwards: yields {global layer: {"logits": [T, E]
    float32, the gating linear's output before any score function, "topk": [T, k] int64, the global expert
    ids the router chose (its routing map), highest routing probability first}}, T = Megatron's tokens in
    [seq, batch] order (the rank's own sequence chunk when sequence-parallel); each forward overwrites it
    (routing_points reorders it batch-major). history=True keeps every forward: {layer: [record, ...]}."""
    records: dict = {}
    restore = []
    for layer in model.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if router is None:  # a dense layer (moe_layer_freq)
            continue
        index, gating = layer.layer_number - 1, router.gating

        def recording_gating(inp, *args, i=index, gating=gating, **kwargs):
            logits = gating(inp, *args, **kwargs)
            record = {"logits": logits.detach().float().reshape(-1, logits.shape[-1]).cpu().clone()}
            if history:
                records.setdefault(i, []).append(record)
            else:
                records[i] = record
            return logits

        def chosen(_m, _a, output, i=index, k=router.topk):
            probs, routing_map = output
            ids = probs.detach().float().masked_fill(~routing_map, float("-inf")).topk(k, dim=-1).indices
            (records[i][-1] if history else records[i])["topk"] = ids.cpu().to(torch.int64)

        router.gating = recording_gating  # the instance attribute shadows the method Router.forward calls
        restore.append((router, router.register_forward_hook(chosen)))
    try:
        yield records
    finally:
        for router, handle in restore:
            handle.remove()
            del router.gating


def routing_points(records: dict, set_name: str, batch: int, length: int) -> dict[str, torch.Tensor]:
    """The contract's routing keys for one prompt set: "{set}/layers.{L}/topk" int64 [B, S, k] and
    "{set}/layers.{L}/logits" float32 [B, S, E], batch-major (Megatron's tokens are [S, B] flattened),
    padding positions included, cut to the batch's `length`."""
    out = {}
    for layer, rec in sorted(records.items()):
        for kind in ("topk", "logits"):
            tensor = rec[kind]
            out[f"{set_name}/layers.{layer}/{kind}"] = (
                tensor.view(-1, batch, tensor.shape[-1]).transpose(0, 1)[:, :length].contiguous())
    return out


def train_routing_points(records: dict, step: int, micro_batch: int) -> dict[str, torch.Tensor]:
    """One train step's router decisions on one rank (records from record_routing(history=True), one entry per
    micro-batch in forward order): "step{s}/mb{m}/layers.{L}/topk|logits" as [S_local, b, *] (Megatron's
    [seq, batch] order; S_local: the rank's sequence chunk when sequence-parallel), joined by join_train_routing."""
    out = {}
    for layer, forwards in sorted(records.items()):
        for m, rec in enumerate(forwards):
            for kind in ("topk", "logits"):
                out[f"step{step}/mb{m}/layers.{layer}/{kind}"] = rec[kind].view(-1, micro_batch, rec[kind].shape[-1])
    return out


def join_train_routing(parts: dict[int, dict[str, torch.Tensor]], length: int) -> dict[str, torch.Tensor]:
    """The ranks' train routing ({TP rank: train_routing_points of every step, every stage's layers}) as one
    train routing file (harness.train_step.routing_key names, [B, S, *] batch-major cut to `length`): TP ranks'
    sequence chunks joined in rank order (one rank when not sequence-parallel), micro-batches in order."""
    joined: dict[str, list] = {}
    for key in sorted(parts[min(parts)], key=lambda k: int(k.split("/")[1].removeprefix("mb"))):
        step, _mb, layer, kind = key.split("/")
        whole = torch.cat([parts[t][key] for t in sorted(parts)], dim=0)  # [S, b, *]
        joined.setdefault(f"{step}/{layer}/{kind}", []).append(whole.transpose(0, 1))
    return {key: torch.cat(chunks, dim=0)[:, :length].contiguous() for key, chunks in joined.items()}
