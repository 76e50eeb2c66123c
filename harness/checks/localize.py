"""Divergence localization: where in the network a failing backend first leaves the HF reference.

Both backends capture the same points on the same prompts (harness/capture.py for HF modules,
harness/backends/megatron_capture.py for megatron-core), already in one canonical layout:
[batch, seq, ...] float32, TP shards joined, pipeline stages renumbered to global layers. This module
compares them point by point in forward order on the valid (unpadded) positions, finds the first point
whose relative L2 difference exceeds the dtype's noise, and names what feeds it: the Megatron weights
entering there, the HF tensors and converter op they were produced from, and the HF config keys that
shape it (marking those the template does not map).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ..tolerances import BOTH_SIDES_FACTOR

# Per layer, in forward order: point -> (sub-module, what it is)
LAYER_POINTS: dict[str, tuple[str, str]] = {
    "input_norm": ("input norm", "the input norm's output"),
    "attention.q_pre_rope": ("attention", "q before rope"),
    "attention.k_pre_rope": ("attention", "k before rope"),
    "attention.q": ("attention", "q after rope"),
    "attention.k": ("attention", "k after rope"),
    "attention.context": ("attention", "the attention context (before the output projection)"),
    "attention": ("attention", "the attention output (after the output projection)"),
    "mlp_norm": ("MLP norm", "the pre-MLP norm's output"),
    "mlp.activation": ("MLP", "the activated gate * up (the down projection's input)"),
    "mlp": ("MLP", "the MLP output"),
    "output": ("residual", "the layer's output (residual stream)"),
}
MODEL_POINTS = {"embedding": ("embedding", "the token embeddings"), "final_norm": ("final norm", "the final norm's output"),
                "logits": ("output head", "the logits")}

# Points TP splits across ranks, by canonical dim: heads for q/k, features for the inputs of row-parallel linears
TP_SPLIT_DIM = {"attention.q_pre_rope": 2, "attention.k_pre_rope": 2, "attention.q": 2, "attention.k": 2,
                "attention.context": -1, "mlp.activation": -1}

# The Megatron (local spec) parameters that enter the network at each point; "{}" is the layer prefix
POINT_WEIGHTS: dict[str, tuple[str, ...]] = {
    "embedding": ("embedding.word_embeddings.weight",),
    "input_norm": ("{}input_layernorm.weight", "{}input_layernorm.bias"),
    "attention.q_pre_rope": ("{}self_attention.linear_qkv.weight", "{}self_attention.linear_qkv.bias",
                             "{}self_attention.q_layernorm.weight"),
    "attention.k_pre_rope": ("{}self_attention.linear_qkv.weight", "{}self_attention.linear_qkv.bias",
                             "{}self_attention.k_layernorm.weight"),
    "attention.q": ("{}self_attention.linear_qkv.weight", "{}self_attention.linear_qkv.bias"),
    "attention.k": ("{}self_attention.linear_qkv.weight", "{}self_attention.linear_qkv.bias"),
    "attention.context": ("{}self_attention.linear_qkv.weight", "{}self_attention.linear_qkv.bias"),
    "attention": ("{}self_attention.linear_proj.weight", "{}self_attention.linear_proj.bias"),
    "mlp_norm": ("{}pre_mlp_layernorm.weight", "{}pre_mlp_layernorm.bias"),
    "mlp.activation": ("{}mlp.linear_fc1.weight", "{}mlp.linear_fc1.bias"),
    "mlp": ("{}mlp.linear_fc2.weight", "{}mlp.linear_fc2.bias"),
    "output": (),
    "final_norm": ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias"),
    "logits": ("output_layer.weight",),
}

# The same for a backend running the HF module itself (DeepSpeed): HF names, "{}" the HF layer prefix
HF_POINT_WEIGHTS: dict[str, tuple[str, ...]] = {
    "embedding": ("model.embed_tokens.weight",),
    "input_norm": ("{}input_layernorm.weight",),
    "attention.q_pre_rope": ("{}self_attn.q_proj.weight", "{}self_attn.q_proj.bias", "{}self_attn.q_norm.weight"),
    "attention.k_pre_rope": ("{}self_attn.k_proj.weight", "{}self_attn.k_proj.bias", "{}self_attn.k_norm.weight"),
    "attention.q": ("{}self_attn.q_proj.weight", "{}self_attn.q_proj.bias"),
    "attention.k": ("{}self_attn.k_proj.weight", "{}self_attn.k_proj.bias"),
    "attention.context": ("{}self_attn.v_proj.weight", "{}self_attn.v_proj.bias"),
    "attention": ("{}self_attn.o_proj.weight", "{}self_attn.o_proj.bias"),
    "mlp_norm": ("{}post_attention_layernorm.weight",),
    "mlp.activation": ("{}mlp.gate_proj.weight", "{}mlp.up_proj.weight"),
    "mlp": ("{}mlp.down_proj.weight",),
    "output": (),
    "final_norm": ("model.norm.weight",),
    "logits": ("lm_head.weight",),
}

# HF config keys that shape each point (the converter maps them, or Megatron uses its own default)
POINT_CONFIG: dict[str, tuple[str, ...]] = {
    "input_norm": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
    "mlp_norm": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
    "final_norm": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
    "attention.q_pre_rope": ("num_attention_heads", "num_key_value_heads", "head_dim"),
    "attention.k_pre_rope": ("num_attention_heads", "num_key_value_heads", "head_dim"),
    "attention.q": ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor"),
    "attention.k": ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor"),
    "attention.context": ("num_key_value_heads", "sliding_window", "attention_dropout"),
    "mlp.activation": ("hidden_act", "intermediate_size"),
    "logits": ("tie_word_embeddings",),
}

FP32_REL_BOUND = 1e-4  # relative L2 floor: fp32 kernels of two libraries agree to ~1e-6 here (measured)
NOISE_FACTOR = BOTH_SIDES_FACTOR  # bf16: the backend rounds as much as HF's own bf16 run does, both ways
BOUND_RULE = (f"a point diverges when ||backend - HF fp32|| / ||HF fp32|| over the valid positions exceeds "
              f"{FP32_REL_BOUND:g} (fp32), or max({FP32_REL_BOUND:g}, {NOISE_FACTOR:g} x HF-bf16's own relative "
              "difference at that point) in bf16")


def point_order(num_layers: int) -> list[str]:
    return ["embedding", *(f"layers.{i}.{p}" for i in range(num_layers) for p in LAYER_POINTS),
            "final_norm", "logits"]


def describe(point: str) -> dict[str, Any]:
    m = re.match(r"layers\.(\d+)\.(.+)$", point)
    if m:
        submodule, detail = LAYER_POINTS[m.group(2)]
        return {"point": point, "layer": int(m.group(1)), "submodule": submodule, "detail": detail,
                "kind": m.group(2)}
    submodule, detail = MODEL_POINTS[point]
    return {"point": point, "layer": None, "submodule": submodule, "detail": detail, "kind": point}


def valid_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    """[batch, seq] True on each right-padded sequence's own tokens."""
    return torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]


def _difference(ref: torch.Tensor, test: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    a, b = ref[mask].double().flatten(), test[mask].double().flatten()
    delta = (a - b)
    norm = float(a.norm())
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else float("nan")
    return {"max_abs": float(delta.abs().max()), "rel_l2": float(delta.norm()) / max(norm, 1e-30),
            "cosine": cosine}


def compare(ref: dict[str, torch.Tensor], test: dict[str, torch.Tensor], lengths: list[int], num_layers: int,
            noise: dict[str, torch.Tensor] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Per point in forward order: the difference and its bound; plus what either side did not capture.

    A point HF has and the backend lacks is named (never skipped silently); points neither captured
    (q/k before rope where a backend has no rope hook) are not judged."""
    rows, missing = [], []
    for point in point_order(num_layers):
        if point not in ref:
            continue
        if point not in test:
            missing.append(f"{point}: captured by HF, not by the backend")
            continue
        r, t = ref[point], test[point]
        if r.shape != t.shape:
            missing.append(f"{point}: shape {tuple(t.shape)} != HF's {tuple(r.shape)}")
            continue
        mask = valid_mask(lengths, r.shape[1])
        row = {"point": point, **_difference(r, t, mask)}
        bound = FP32_REL_BOUND
        if noise is not None and point in noise:
            row["noise_rel_l2"] = _difference(r, noise[point], mask)["rel_l2"]
            bound = max(bound, NOISE_FACTOR * row["noise_rel_l2"])
        row["bound"] = bound
        row["diverged"] = not row["rel_l2"] <= bound  # NaN diverges
        rows.append(row)
    return rows, missing


def _layer_prefix(point: str) -> str:
    m = re.match(r"(layers\.\d+)\.", point)
    return f"decoder.{m.group(1)}." if m else ""


def feeding_weights(point: str, megatron_names: set[str], tied: bool) -> list[str]:
    """The Megatron parameters entering the network at `point` that this model has."""
    kind = describe(point)["kind"]
    names = [n.replace("{}", _layer_prefix(point)) for n in POINT_WEIGHTS[kind]]
    if kind == "logits" and tied:
        names = ["embedding.word_embeddings.weight"]
    return [n for n in names if n in megatron_names]


def _hf_weights(point: str, hf_names: set[str]) -> list[str]:
    kind, m = describe(point)["kind"], re.match(r"layers\.(\d+)\.", point)
    prefix = f"model.layers.{m.group(1)}." if m else ""
    names = [n.replace("{}", prefix) for n in HF_POINT_WEIGHTS[kind]]
    if kind == "logits" and "lm_head.weight" not in hf_names:
        names = ["model.embed_tokens.weight"]  # tied
    return [n for n in names if n in hf_names]


def explain(point: str, produced_from: dict[str, dict[str, Any]], megatron_names: set[str], tied: bool,
            config_states: dict[str, str], config_hf_to_mca: dict[str, str]) -> dict[str, Any]:
    """What feeds `point`: Megatron weights, the HF tensors and converter ops behind them, config keys."""
    weights = feeding_weights(point, megatron_names, tied)
    hf, ops = [], []
    for name in weights:
        origin = produced_from.get(name) or {}
        hf += [n for n in origin.get("sources", []) if n not in hf]
        if origin.get("op") and origin["op"] not in ops:
            ops.append(origin["op"])
    config = [{"hf_key": key, "mca_key": config_hf_to_mca.get(key), "state": config_states[key]}
              for key in POINT_CONFIG.get(describe(point)["kind"], ()) if key in config_states]
    return {"megatron_weights": weights, "hf_weights": hf, "ops": ops, "config": config}


def summary_text(found: dict[str, Any]) -> str:
    """One line: '<layer N sub-module> (<what>) — <weights> <- <op>; <config keys> not mapped'."""
    where = f"layer {found['layer']} {found['submodule']}" if found["layer"] is not None else found["submodule"]
    text = f"first divergence at {where} ({found['detail']}, rel. L2 {found['rel_l2']:.3g} > {found['bound']:.3g})"
    if found.get("megatron_weights"):
        text += f" fed by {', '.join(found['megatron_weights'])}"
        op_types = list(dict.fromkeys(op.split("(")[0] for op in found.get("ops", [])))
        if op_types:
            text += f" (converter op {', '.join(op_types)} from {', '.join(found.get('hf_weights', []))})"
    elif found.get("hf_weights"):
        text += f" fed by {', '.join(found['hf_weights'])}"
    for state, says in (("unmapped", "the template does not map"), ("mismatch", "Megatron builds a different")):
        keys = [c["hf_key"] for c in found.get("config", []) if c["state"] == state]
        if keys:
            text += f"; {says} {', '.join(keys)}"
    return text


def localize(ref: dict[str, torch.Tensor], test: dict[str, torch.Tensor], lengths: list[int], num_layers: int,
             origin: dict[str, Any], noise: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The localization record: every point's difference and the first that diverges, explained.

    `origin`: {"produced_from", "megatron_names", "tied", "config_states", "config_hf_to_mca"} from the backend."""
    skipped = origin.get("not_captured") or {}  # points a backend cannot expose by design, with the reason
    rows, missing = compare({k: v for k, v in ref.items() if k not in skipped}, test, lengths, num_layers, noise)
    out: dict[str, Any] = {"points": rows, "bound_rule": BOUND_RULE}
    if skipped:
        out["not_captured"] = dict(skipped)
    if missing:
        out["missing"] = missing
    if not rows:
        return {**out, "status": "not_localized", "reason": "no point was captured on both sides"}
    first = next((row for row in rows if row["diverged"]), None)
    if first is None:
        return {**out, "status": "not_localized",
                "reason": "no captured activation diverges beyond this dtype's noise, logits included: the failing "
                          "metric arises after the output head (log-softmax, gathering, what is compared), or the "
                          "bug stays below the noise at every point"}
    found = {**describe(first["point"]), **{k: first[k] for k in ("rel_l2", "max_abs", "cosine", "bound")}}
    if "hf_names" in origin:  # the backend runs the HF module: no converter between them
        found["hf_weights"] = _hf_weights(first["point"], set(origin["hf_names"]))
    else:
        found.update(explain(first["point"], origin.get("produced_from", {}), set(origin.get("megatron_names", ())),
                             bool(origin.get("tied")), origin.get("config_states", {}),
                             origin.get("config_hf_to_mca", {})))
    return {**out, "status": "localized", "first_divergence": found, "summary": summary_text(found)}


def evaluate(hf_truth: str, backend_capture: str | None, sequences: list[list[int]], num_layers: int,
             origin: dict[str, Any], hf_noise: str | None = None) -> dict[str, Any]:
    """The localization from capture files: HF fp32, the backend in the check's dtype, HF in that dtype (bf16)."""
    from safetensors.torch import load_file

    if backend_capture is None:
        return {"status": "not_localized", "reason": "the backend captured nothing"}
    noise = load_file(hf_noise) if hf_noise else None
    return localize(load_file(hf_truth), load_file(backend_capture), [len(s) for s in sequences], num_layers,
                    origin, noise)


def worst_prompt_set(per_set: dict[str, dict[str, Any]]) -> str | None:
    """The prompt set a failed logit check is worst on (by max |Δlogprob|): the one localized."""
    scored = {name: m.get("max_abs_logprob") for name, m in per_set.items()}
    scored = {name: v for name, v in scored.items() if isinstance(v, (int, float))}
    return max(scored, key=lambda n: (scored[n] != scored[n], scored[n])) if scored else None  # NaN first


# ---- train step: the first parameter whose gradient diverges, in backward order ----
def backward_order(names: list[str]) -> list[str]:
    """HF parameter names from the output back to the embeddings (forward order given, reversed)."""
    return list(reversed(names))


def first_diverging_gradient(grad_diffs: dict[str, float], bound: float, forward_order: list[str]) -> dict | None:
    """The first parameter, walking backward from the loss, whose first-step gradient exceeds `bound`."""
    order = [n for n in backward_order(forward_order) if n in grad_diffs]
    order += sorted(set(grad_diffs) - set(order))  # anything the order did not list, last
    for index, name in enumerate(order):
        if not grad_diffs[name] <= bound:
            return {"parameter": name, "grad_diff": grad_diffs[name], "bound": bound, "position_in_backward": index,
                    "summary": f"first diverging gradient in backward order: {name} "
                               f"(|Δgrad| {grad_diffs[name]:.3g} > {bound:.3g}; "
                               f"{index} parameter(s) after the loss agree)"}
    return None
