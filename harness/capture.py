"""Activation capture on an HF transformers causal LM (the reference, and DeepSpeed, which runs the HF module).

Forward hooks record the points of harness.checks.localize in its canonical layout ([batch, seq, ...],
float32 on the CPU). q/k before and after rope come from wrapping the modeling module's own
`apply_rotary_pos_emb` (llama-family modeling files define it at module level); a family that does not
simply has no q/k points, and the judge compares what both sides captured.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _keep(store: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    store[name] = tensor.detach().float().cpu().contiguous().clone()  # a residual may be added in place later


@contextlib.contextmanager
def hf_capture(model, store: dict[str, torch.Tensor]):
    """While active, each forward of `model` fills `store` with the canonical points (last forward wins)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    handles, current = [], {"layer": None}

    def out_hook(name):
        return lambda _m, _args, output: _keep(store, name, _first(output))

    def in_hook(name):
        return lambda _m, args: _keep(store, name, args[0])

    def add(module, name, pre=False):
        if module is not None:
            handles.append(module.register_forward_pre_hook(in_hook(name)) if pre else
                           module.register_forward_hook(out_hook(name)))

    add(model.get_input_embeddings(), "embedding")
    for index, layer in enumerate(inner.layers):
        prefix = f"layers.{index}."
        handles.append(layer.register_forward_pre_hook(lambda _m, _a, i=index: current.update(layer=i)))
        add(getattr(layer, "input_layernorm", None), prefix + "input_norm")
        attention = getattr(layer, "self_attn", None)
        add(attention, prefix + "attention")
        add(getattr(attention, "o_proj", None), prefix + "attention.context", pre=True)
        add(getattr(layer, "post_attention_layernorm", None), prefix + "mlp_norm")
        mlp = getattr(layer, "mlp", None)
        add(mlp, prefix + "mlp")
        add(getattr(mlp, "down_proj", None), prefix + "mlp.activation", pre=True)
        add(layer, prefix + "output")
    add(getattr(inner, "norm", None), "final_norm")
    add(model.get_output_embeddings(), "logits")

    modeling = sys.modules[type(model).__module__]
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is not None:
        def recording_rope(q, k, *args, **kwargs):
            q_out, k_out = original(q, k, *args, **kwargs)
            prefix = f"layers.{current['layer']}.attention."
            for name, tensor in (("q_pre_rope", q), ("k_pre_rope", k), ("q", q_out), ("k", k_out)):
                _keep(store, prefix + name, tensor.transpose(1, 2))  # [b, heads, s, d] -> [b, s, heads, d]
            return q_out, k_out

        modeling.apply_rotary_pos_emb = recording_rope
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
        if original is not None:
            modeling.apply_rotary_pos_emb = original


def _router(layer):
    """The layer's top-k router (transformers 5: `mlp.gate` returning (logits, scores, indices)); None: dense."""
    gate = getattr(getattr(layer, "mlp", None), "gate", None)
    return gate if gate is not None and hasattr(gate, "top_k") else None


@contextlib.contextmanager
def routing_capture(model, store: dict[str, torch.Tensor]):
    """While active, each forward fills `store` with "layers.L/logits" [b, s, E] (router logits before
    softmax/top-k) and "layers.L/topk" [b, s, k] (the experts the router chose) for every MoE layer."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    handles, shape = [], {}

    def record(index):
        def hook(_m, _args, output):
            logits, _scores, indices = output
            b, s = shape["bs"]
            _keep(store, f"layers.{index}/logits", logits.reshape(b, s, -1))
            store[f"layers.{index}/topk"] = indices.detach().reshape(b, s, -1).long().cpu().contiguous()
        return hook

    def batch_shape(_m, args, kwargs):  # the router sees flattened tokens: [b, s] comes from the layer input
        shape["bs"] = tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])

    for index, layer in enumerate(inner.layers):
        router = _router(layer)
        if router is not None:
            handles.append(layer.register_forward_pre_hook(batch_shape, with_kwargs=True))
            handles.append(router.register_forward_hook(record(index)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def routing_file(model, prompts: dict[str, list[list[int]]], out_path: str, to_device=lambda batch: batch) -> dict:
    """The routing file (harness/checks/routing.py format) of `model` on each prompt set's right-padded batch."""
    from safetensors.torch import save_file

    from .train_step import make_batch

    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, seqs in prompts.items():
            store: dict[str, torch.Tensor] = {}
            batch = to_device(make_batch(seqs))  # the same right padding every backend gets
            with routing_capture(model, store):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tensors.update({f"{name}/{key}": t for key, t in store.items()})
    save_file(tensors, out_path)
    return {"path": out_path, "moe_layers": sorted({k.split("/")[-2] for k in tensors})}


@contextlib.contextmanager
def routing_forced(model, chosen: dict[int, torch.Tensor]):
    """While active, MoE layer L routes each token to the experts chosen[L] names ([b, s, k] global ids, e.g. a
    trainer's own decisions: routing replay) instead of its own top-k. The router still computes its logits,
    probabilities and gate values itself (each family's normalisation and dtype): only the torch.topk call in
    its forward is answered with the given experts and the router's own probabilities of them."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    original, handles, active = torch.topk, [], {}

    def replayed_topk(probs, k, dim=-1, *args, **kwargs):
        ids = active["ids"].reshape(-1, active["ids"].shape[-1]).to(probs.device)
        if dim not in (-1, probs.dim() - 1) or probs.dim() != 2 or tuple(ids.shape) != (probs.shape[0], k):
            raise ValueError(f"routing replay: layer {active['layer']} asks top-{k} of {tuple(probs.shape)}, "
                             f"the replayed routing has {tuple(ids.shape)}")
        return torch.return_types.topk((probs.gather(-1, ids), ids))

    def enter(index):
        def pre_hook(_m, _args):
            active.update(layer=index, ids=chosen[index])
            torch.topk = replayed_topk
        return pre_hook

    def leave(_m, _args, _output):
        torch.topk = original

    for index, layer in enumerate(inner.layers):
        router = _router(layer)
        if router is not None and index in chosen:
            handles += [router.register_forward_pre_hook(enter(index)), router.register_forward_hook(leave)]
    missing = sorted(set(chosen) - {i for i, layer in enumerate(inner.layers) if _router(layer) is not None})
    if missing:
        raise ValueError(f"routing replay: layers {missing} are not MoE layers of this model")
    try:
        yield
    finally:
        torch.topk = original
        for handle in handles:
            handle.remove()
