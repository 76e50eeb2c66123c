"""Activation capture inside an in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), for localization.

`LLM.apply_model` hands us the loaded model; forward hooks on its llama-family modules record the points of
harness.checks.localize while each sequence is prefilled alone (max_tokens=1: one forward). vLLM works on
flattened tokens [T, ...] and defers the residual add (a decoder layer returns (hidden, residual)), so
the layer output is their sum, q/k come flat as [T, heads * head_dim], and the logits are not captured
(vLLM computes them outside the module tree, only where it samples). Sequences are right-padded into
[batch, seq, ...] as HF's capture is.
"""
from __future__ import annotations

from typing import Any

import torch


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _hooks(model, store: dict[str, list[torch.Tensor]], heads: dict[str, int]) -> list:
    inner = model.model
    handles = []

    def keep(name, tensor):
        store.setdefault(name, []).append(tensor.detach().float().cpu().clone())

    def out_hook(name, combine=_first):
        return lambda _m, _a, output: keep(name, combine(output))

    def in_hook(name, index=0):
        return lambda _m, args: keep(name, args[index])

    # get_rope caches one rotary module for every layer: hook it once, file calls under the running layer
    current = {"layer": None}

    def rope_in(_m, args):
        prefix = f"layers.{current['layer']}.attention."
        keep(prefix + "q_pre_rope", args[1].reshape(args[1].shape[0], heads["q"], -1))
        keep(prefix + "k_pre_rope", args[2].reshape(args[2].shape[0], heads["kv"], -1))

    def rope_out(_m, _args, output):
        prefix = f"layers.{current['layer']}.attention."
        q, k = output[0], output[1]
        keep(prefix + "q", q.reshape(q.shape[0], heads["q"], -1))
        keep(prefix + "k", k.reshape(k.shape[0], heads["kv"], -1))

    def add(module, hook, pre=False):
        if module is not None:
            handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))

    add(getattr(inner, "embed_tokens", None), out_hook("embedding"))
    ropes = set()
    for index, layer in enumerate(inner.layers):
        prefix = f"layers.{index}."
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        add(layer, lambda _m, _a, i=index: current.update(layer=i), pre=True)
        add(getattr(layer, "input_layernorm", None), out_hook(prefix + "input_norm"))
        rope = getattr(attention, "rotary_emb", None)
        if rope is not None and id(rope) not in ropes:
            ropes.add(id(rope))
            add(rope, rope_in, pre=True)
            add(rope, rope_out)
        add(getattr(attention, "o_proj", None), in_hook(prefix + "attention.context"), pre=True)
        add(attention, out_hook(prefix + "attention"))
        add(getattr(layer, "post_attention_layernorm", None), out_hook(prefix + "mlp_norm"))
        add(getattr(mlp, "down_proj", None), in_hook(prefix + "mlp.activation"), pre=True)
        add(mlp, out_hook(prefix + "mlp"))
        # (hidden, residual): the residual stream after the layer is their sum
        add(layer, out_hook(prefix + "output", lambda out: out[0] + out[1] if isinstance(out, tuple) else out))
    add(getattr(inner, "norm", None), out_hook("final_norm"))
    return handles


def _padded(per_sequence: list[torch.Tensor]) -> torch.Tensor:
    longest = max(t.shape[0] for t in per_sequence)
    out = torch.zeros(len(per_sequence), longest, *per_sequence[0].shape[1:])
    for i, t in enumerate(per_sequence):
        out[i, : t.shape[0]] = t
    return out


def capture(llm, sequences: list[list[int]], num_heads: int, num_kv_heads: int) -> tuple[dict[str, torch.Tensor],
                                                                                        list[str]]:
    """The canonical points of `sequences` (and problems: a point whose token count is not the prompt's)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    store: dict[str, list[torch.Tensor]] = {}
    handles: list = []
    llm.apply_model(lambda model: handles.extend(_hooks(model, store, {"q": num_heads, "kv": num_kv_heads})))
    per_point: dict[str, list[torch.Tensor]] = {}
    problems = []
    try:
        for i, seq in enumerate(sequences):
            store.clear()
            llm.generate([TokensPrompt(prompt_token_ids=list(seq))], SamplingParams(max_tokens=1, temperature=0.0),
                         use_tqdm=False)
            for point, chunks in store.items():  # a chunked prefill calls a module more than once
                tokens = torch.cat(chunks, dim=0)
                if tokens.shape[0] != len(seq):
                    problems.append(f"{point}: sequence {i} captured {tokens.shape[0]} tokens, prompt has {len(seq)}")
                    continue
                per_point.setdefault(point, []).append(tokens)
    finally:
        for handle in handles:
            handle.remove()
    complete = {p: _padded(ts) for p, ts in per_point.items() if len(ts) == len(sequences)}
    return complete, problems


def _routers(model) -> dict[int, Any]:
    """layer index -> the router of its fused-MoE runner (vllm 0.32: MoERunner.router.select_experts)."""
    out = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if hasattr(router, "select_experts") and ".layers." in f".{name}":
            out[int(name.split("layers.")[1].split(".")[0])] = router
    return out


def capture_routing(llm, prompts: dict[str, list[list[int]]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The engine's own routing, in the routing file's format (harness/checks/routing.py): each sequence is
    prefilled alone and every MoE layer's router_logits and the expert ids its router selected are recorded
    from `select_experts` (what the fused kernel then runs on). Problems: a layer whose router was not
    called (a monolithic kernel routes inside its fused op) or saw another token count than the prompt's."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def install(model):
        undo = []
        for layer, router in _routers(model).items():
            original = router.select_experts

            def recording(*args, _original=original, _layer=layer, **kwargs):
                weights, ids = _original(*args, **kwargs)
                logits = kwargs["router_logits"] if "router_logits" in kwargs else args[1]
                calls.setdefault(_layer, []).append((logits.detach().float().cpu().clone(),
                                                     ids.detach().long().cpu().clone()))
                return weights, ids

            router.select_experts = recording
            undo.append(lambda r=router: delattr(r, "select_experts"))  # back to the class's method
        return undo

    undo = llm.apply_model(install)[0]
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    if not undo:
        return out, ["the engine's model has no fused-MoE router to read"]
    try:
        for name, seqs in prompts.items():
            per_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for i, seq in enumerate(seqs):
                calls.clear()
                llm.generate([TokensPrompt(prompt_token_ids=list(seq))], SamplingParams(max_tokens=1, temperature=0.0),
                             use_tqdm=False)
                for layer, chunks in calls.items():  # the prefill only: a chunked prefill calls the router per chunk
                    logits, ids = torch.cat([c[0] for c in chunks])[: len(seq)], torch.cat([c[1] for c in chunks])
                    if logits.shape[0] != len(seq):
                        problems.append(f"prompt set {name!r} layers.{layer}: sequence {i} routed "
                                        f"{logits.shape[0]} tokens, the prompt has {len(seq)}")
                        continue
                    per_layer.setdefault(layer, []).append((logits, ids[: len(seq)]))
            for layer, rows in per_layer.items():
                if len(rows) == len(seqs):
                    out[f"{name}/layers.{layer}/logits"] = _padded([r[0] for r in rows])
                    out[f"{name}/layers.{layer}/topk"] = _padded([r[1] for r in rows]).long()
    finally:
        for restore in undo:
            restore()
    return out, problems
