"""Config parsing: every HF config key must reach the backend with the same meaning.

Each HF key ends up in exactly one state:
  mapped    - the template maps it and the backend holds the same semantic value
  derived   - not mapped, but the backend derives the same value by itself (head_dim)
  inactive  - the feature is off in this config (no layer has a sliding window)
  ignored   - on the harness's curated list of keys that never change the math
  waived    - the spec waives it, with a reason
  mismatch  - the backend holds a different value            -> fails
  unmapped  - nothing maps it (even if a default coincides)  -> fails
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..moe_layers import hf_moe_layers, megatron_moe_layers
from ..verdict import Verdict, from_problems
from ..windows import hf_layer_windows, layer_kinds, megatron_layer_windows

# key -> why it never changes a model's forward/backward math
IGNORED_KEYS: dict[str, str] = {
    "transformers_version": "provenance only",
    "architectures": "class selection, checked by the HF suite",
    "model_type": "checked against the template's hf_model_type separately",
    "_name_or_path": "provenance only",
    "name_or_path": "provenance only",
    "dtype": "storage dtype; every check sets its dtype explicitly",
    "torch_dtype": "storage dtype; every check sets its dtype explicitly",
    "output_hidden_states": "output plumbing, not math",
    "output_attentions": "output plumbing, not math",
    "return_dict": "output plumbing, not math",
    "use_return_dict": "output plumbing, not math",
    "chunk_size_feed_forward": "HF memory-saving loop, same math",
    "is_encoder_decoder": "decoder-only models only",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "initializer_range": "only used to initialise new weights",
    "use_cache": "inference KV-cache toggle",
    "pad_token_id": "tokenizer/generation setting, not forward math",
    "bos_token_id": "tokenizer/generation setting, not forward math",
    "eos_token_id": "tokenizer/generation setting, not forward math",
    "tokenizer_class": "tokenizer only",
    "auto_map": "remote-code class lookup, checked by the HF suite",
    "tie_encoder_decoder": "encoder-decoder models only",
    # MoE: HF returns router logits (and adds its own aux loss to .loss) only when asked
    "output_router_logits": "training-only output toggle for HF's own aux loss; the objective is router_aux_loss_coef",
}


def _act_name(value: Any) -> str:
    aliases = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "squared_relu"}
    name = str(getattr(value, "__name__", value))
    return aliases.get(name, name)


def _rope(cfg: dict) -> dict | None:
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        return None
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return {
        "rope_theta": float(theta) if theta is not None else None,
        "rope_type": params.get("rope_type", "default"),
        "partial_rotary_factor": float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
    }


def _scaling(params: Any) -> dict | None:
    """A rope scaling as HF applies it (None = none): its type and every parameter but the base."""
    if not isinstance(params, dict):
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    skip = {"rope_theta", "rope_type", "type", "partial_rotary_factor"}
    return {"rope_type": kind, **{k: params[k] for k in sorted(params) if k not in skip}}


def _hf_rope(cfg: dict) -> dict | None:
    rope = _rope(cfg)
    return None if rope is None else {**rope, "scaling": _scaling(cfg.get("rope_parameters"))}


def _mca_scaling(gpt: dict) -> dict | None:
    """GPTModel's rope_scaling is llama 3.x's, with megatron-core 0.16's fixed constants
    (RotaryEmbedding._apply_scaling: low 1, high 4, original context 8192) and rope_scaling_factor."""
    if not gpt.get("rope_scaling"):
        return None
    return {"rope_type": "llama3", "factor": float(gpt["rope_scaling_factor"]), "high_freq_factor": 4.0,
            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def _mca_rope(b: dict) -> dict:
    gpt = b["gpt"]
    return {
        "rope_theta": float(gpt["rotary_base"]) if gpt["position_embedding_type"] == "rope" else None,
        "rope_type": "llama3" if gpt.get("rope_scaling") else "default",
        "partial_rotary_factor": float(gpt["rotary_percent"]),
        "scaling": _mca_scaling(gpt),
    }


@dataclass(frozen=True)
class Rule:
    mapped_by: frozenset[str]
    hf: Callable[[dict], Any]
    backend: Callable[[dict], Any]
    derivable: bool = False
    inactive: Callable[[dict], bool] = lambda cfg: False


def _field(name: str) -> Callable[[dict], Any]:
    return lambda cfg: cfg.get(name)


def _tc(name: str) -> Callable[[dict], Any]:
    return lambda b: b["tc"].get(name)


def _gpt(name: str) -> Callable[[dict], Any]:
    return lambda b: b["gpt"].get(name)


def _heads(cfg: dict) -> int:
    return cfg["num_attention_heads"]


def _no_window(cfg: dict) -> bool:
    """No layer of HF's model applies a sliding window (Mistral has no use_sliding_window: its sliding_window is
    on whenever set; Qwen2/3 window only the layer_types marked sliding, and only with use_sliding_window)."""
    return all(w is None for w in hf_layer_windows(cfg))


_SLIDING_OFF = _no_window  # the engines' config rules share it


def _mca_windows(b: dict) -> list:
    tc = b["tc"]
    return megatron_layer_windows(tc.get("window_size"), tc.get("window_attn_skip_freq"), int(tc["num_layers"]))


_WINDOW_KEYS = frozenset({"window_size", "window_attn_skip_freq"})


# ---- MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) ----
# built["hf_config"] is HF's config, so a backend side can be shown in the same per-layer shape as HF's.
def _experts(cfg: dict) -> int:
    return int(cfg.get("num_experts", cfg.get("num_local_experts")) or 0)


def _mca_sparse(b: dict) -> list[bool]:
    tc = b["tc"]
    if not tc.get("num_moe_experts"):
        return [False] * int(tc["num_layers"])
    return megatron_moe_layers(tc.get("moe_layer_freq", 1), int(tc["num_layers"]))


def _flags(pattern: list[bool]) -> list[int]:
    return [int(flag) for flag in pattern]


def _hf_widths(cfg: dict) -> Any:
    """intermediate_size as HF uses it: a dense model's MLP; per layer, the dense layers' MLP of a Qwen-MoE
    (its experts read moe_intermediate_size), or Mixtral's experts (it has no other MLP)."""
    width = cfg.get("intermediate_size")
    if not _experts(cfg):
        return width
    if "moe_intermediate_size" in cfg:
        return [width if not sparse else "sparse" for sparse in hf_moe_layers(cfg)]
    return [width if not sparse else {"experts": width} for sparse in hf_moe_layers(cfg)]


def _mca_widths(b: dict) -> Any:
    cfg, tc = b["hf_config"], b["tc"]
    if not _experts(cfg):
        return tc.get("ffn_hidden_size")
    if "moe_intermediate_size" in cfg:
        return [tc.get("ffn_hidden_size") if not sparse else "sparse" for sparse in _mca_sparse(b)]
    return [tc.get("ffn_hidden_size") if not sparse else {"experts": tc.get("moe_ffn_hidden_size")}
            for sparse in _mca_sparse(b)]


def _all_sparse_with_own_width(cfg: dict) -> bool:
    return bool(_experts(cfg)) and "moe_intermediate_size" in cfg and all(hf_moe_layers(cfg))


_RENORMALISED = "softmax over the top-k (probabilities renormalised to sum 1)"
_FULL_SOFTMAX = "softmax over all experts, top-k values kept"


def _hf_weighting(cfg: dict) -> str:
    """HF's routing weights: Qwen-MoE's TopKRouter renormalises iff norm_topk_prob; Mixtral's always does."""
    return _RENORMALISED if cfg.get("norm_topk_prob", True) else _FULL_SOFTMAX


def _mca_weighting(b: dict) -> str:
    """megatron-core's (moe_utils.topk_routing_with_score_function): pre_softmax = softmax over all experts,
    then top-k; otherwise top-k of the logits, then softmax over those k -- HF's renormalised weights."""
    tc = b["tc"]
    if tc.get("moe_router_score_function", "softmax") == "softmax":
        text = _FULL_SOFTMAX if tc.get("moe_router_pre_softmax") else _RENORMALISED
    else:
        text = f"{tc.get('moe_router_score_function')} scores"
    if tc.get("moe_router_group_topk"):
        text += f", group-limited (top {tc['moe_router_group_topk']} of {tc.get('moe_router_num_groups')} groups)"
    if tc.get("moe_router_enable_expert_bias"):
        text += ", expert bias"
    if tc.get("moe_router_topk_scaling_factor"):
        text += f", scaled by {tc['moe_router_topk_scaling_factor']}"
    return text


def _hf_topk(cfg: dict) -> Any:
    # a family without norm_topk_prob (Mixtral) has its weighting judged here
    k = cfg.get("num_experts_per_tok")
    return k if "norm_topk_prob" in cfg else {"top_k": k, "weights": _hf_weighting(cfg)}


def _mca_topk(b: dict) -> Any:
    k = b["tc"].get("moe_router_topk")
    return k if "norm_topk_prob" in b["hf_config"] else {"top_k": k, "weights": _mca_weighting(b)}


def _places_sparse(cfg: dict) -> bool:
    return "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg


def _hf_experts(cfg: dict) -> Any:
    # a family with no placement key (Mixtral: every layer sparse) has its placement judged here
    if _places_sparse(cfg):
        return _experts(cfg)
    return {"experts": _experts(cfg), "sparse_layers": _flags(hf_moe_layers(cfg))}


def _mca_experts(b: dict) -> Any:
    experts = b["tc"].get("num_moe_experts")
    if _places_sparse(b["hf_config"]):
        return experts
    return {"experts": experts, "sparse_layers": _flags(_mca_sparse(b))}


def _hf_aux(cfg: dict) -> Any:
    """HF's load-balancing loss (load_balancing_loss_func) is the Switch-Transformer one: megatron's aux_loss."""
    coef = float(cfg.get("router_aux_loss_coef") or 0.0)
    return ["aux_loss", coef] if coef else 0.0


def _mca_aux(b: dict) -> Any:
    tc = b["tc"]
    kind, coef = tc.get("moe_router_load_balancing_type", "aux_loss"), tc.get("moe_aux_loss_coeff") or 0.0
    if kind == "none" or not coef:
        return 0.0
    return [kind, coef] if isinstance(coef, list) else [kind, float(coef)]


def _hf_shared(cfg: dict) -> dict:
    # Qwen2MoeSparseMoeBlock: the shared expert's output is always scaled by sigmoid(shared_expert_gate(x))
    return {"size": cfg.get("shared_expert_intermediate_size"), "gate": "sigmoid"}


def _mca_shared(b: dict) -> dict:
    tc = b["tc"]  # SharedExpertMLP: a gate_weight and its sigmoid only with moe_shared_expert_gate
    return {"size": tc.get("moe_shared_expert_intermediate_size"),
            "gate": "sigmoid" if tc.get("moe_shared_expert_gate") else None}


def _hf_jitter(cfg: dict) -> Any:
    return {"scales": "router and expert input", "eps": cfg.get("router_jitter_noise")}


def _mca_jitter(b: dict) -> Any:
    # megatron-core's moe_input_jitter_eps jitters the router's input only: never the same as Mixtral's
    eps = b["tc"].get("moe_input_jitter_eps")
    return {"scales": "router input only", "eps": eps} if eps else None


def _sparse_flags_hf(cfg: dict) -> list[int]:
    return _flags(hf_moe_layers(cfg))


def _sparse_flags_mca(b: dict) -> list[int]:
    return _flags(_mca_sparse(b))


_MOE_RULES: dict[str, Rule] = {
    "num_experts": Rule(frozenset({"num_moe_experts"}), _hf_experts, _mca_experts),
    "num_local_experts": Rule(frozenset({"num_moe_experts"}), _hf_experts, _mca_experts),
    "num_experts_per_tok": Rule(frozenset({"moe_router_topk"}), _hf_topk, _mca_topk),
    "norm_topk_prob": Rule(frozenset({"moe_router_pre_softmax"}), _hf_weighting, _mca_weighting),
    "moe_intermediate_size": Rule(frozenset({"moe_ffn_hidden_size", "ffn_hidden_size"}),
                                  _field("moe_intermediate_size"), _tc("moe_ffn_hidden_size")),
    # HF: layer i sparse iff (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers; megatron-core's
    # moe_layer_freq N: i % N == 0 (a decoder_sparse_step > 1 renamed to it moves every sparse layer by one)
    "decoder_sparse_step": Rule(frozenset({"moe_layer_freq"}), _sparse_flags_hf, _sparse_flags_mca,
                                derivable=True),
    "mlp_only_layers": Rule(frozenset({"moe_layer_freq"}), _sparse_flags_hf, _sparse_flags_mca,
                            inactive=lambda cfg: not cfg.get("mlp_only_layers")),
    "shared_expert_intermediate_size": Rule(frozenset({"moe_shared_expert_intermediate_size"}), _hf_shared,
                                            _mca_shared),
    "router_aux_loss_coef": Rule(frozenset({"moe_aux_loss_coeff"}), _hf_aux, _mca_aux),
    # training-time noise (HF applies it only in train mode), but a train step is certified: never silently off
    "router_jitter_noise": Rule(frozenset({"moe_input_jitter_eps"}), _hf_jitter, _mca_jitter,
                                inactive=lambda cfg: not cfg.get("router_jitter_noise")),
    "qkv_bias": Rule(frozenset({"add_qkv_bias"}), _field("qkv_bias"), _tc("add_qkv_bias")),  # Qwen2-MoE's name
}

# Megatron-core semantics of HF keys. `built` = {"tc": TransformerConfig values, "gpt": GPTModel kwargs}.
MEGATRON_RULES: dict[str, Rule] = {
    "vocab_size": Rule(frozenset({"padded_vocab_size"}), _field("vocab_size"), _gpt("vocab_size")),
    "hidden_size": Rule(frozenset({"hidden_size"}), _field("hidden_size"), _tc("hidden_size")),
    "intermediate_size": Rule(frozenset({"ffn_hidden_size", "moe_ffn_hidden_size"}), _hf_widths, _mca_widths,
                              inactive=_all_sparse_with_own_width),
    "num_hidden_layers": Rule(frozenset({"num_layers"}), _field("num_hidden_layers"), _tc("num_layers")),
    "num_attention_heads": Rule(frozenset({"num_attention_heads"}), _field("num_attention_heads"),
                                _tc("num_attention_heads")),
    "num_key_value_heads": Rule(frozenset({"num_query_groups"}),
                                lambda cfg: cfg.get("num_key_value_heads") or _heads(cfg), _tc("num_query_groups")),
    "head_dim": Rule(frozenset({"kv_channels"}),
                     lambda cfg: cfg.get("head_dim") or cfg["hidden_size"] // _heads(cfg), _tc("kv_channels"),
                     derivable=True),
    "max_position_embeddings": Rule(frozenset({"max_sequence_length"}), _field("max_position_embeddings"),
                                    _gpt("max_sequence_length")),
    "rms_norm_eps": Rule(frozenset({"layernorm_epsilon", "norm_epsilon"}),
                         lambda cfg: ["RMSNorm", float(cfg["rms_norm_eps"])],
                         lambda b: [b["tc"]["normalization"], float(b["tc"]["layernorm_epsilon"])]),
    "layer_norm_eps": Rule(frozenset({"layernorm_epsilon", "norm_epsilon"}),
                           lambda cfg: ["LayerNorm", float(cfg["layer_norm_eps"])],
                           lambda b: [b["tc"]["normalization"], float(b["tc"]["layernorm_epsilon"])]),
    "hidden_act": Rule(frozenset({"swiglu", "squared_relu", "activation_func"}),
                       lambda cfg: _act_name(cfg["hidden_act"]), lambda b: _act_name(b["tc"]["activation_func"])),
    "attention_dropout": Rule(frozenset({"attention_dropout"}), lambda cfg: float(cfg["attention_dropout"]),
                              lambda b: float(b["tc"]["attention_dropout"])),
    "attention_bias": Rule(frozenset({"add_qkv_bias"}), _field("attention_bias"), _tc("add_qkv_bias")),
    "mlp_bias": Rule(frozenset({"add_bias_linear"}), _field("mlp_bias"), _tc("add_bias_linear")),
    "tie_word_embeddings": Rule(frozenset({"tie_embeddings_and_output_weights", "untie_embeddings_and_output_weights"}),
                                lambda cfg: bool(cfg["tie_word_embeddings"]),
                                _gpt("share_embeddings_and_output_weights")),
    "rope_parameters": Rule(frozenset({"rotary_base", "rope_parameters", "rotary_percent", "rotary_scaling"}),
                            _hf_rope, _mca_rope),
    "rope_theta": Rule(frozenset({"rotary_base", "rope_parameters"}),
                       lambda cfg: float(cfg["rope_theta"]), lambda b: float(b["gpt"]["rotary_base"])),
    # a config.json from transformers 4 (5 folds it into rope_parameters); ROLL's llama maps it to rope_scaling
    "rope_scaling": Rule(frozenset({"rotary_scaling", "rope_scaling"}), lambda cfg: _scaling(cfg["rope_scaling"]),
                         lambda b: _mca_scaling(b["gpt"]),
                         inactive=lambda cfg: _scaling(cfg.get("rope_scaling")) is None),
    # windows are compared per layer, in HF's terms (W keys, harness/windows.py): size and pattern at once
    "use_sliding_window": Rule(frozenset({"window_size"}), lambda cfg: not _no_window(cfg),
                               lambda b: any(w is not None for w in _mca_windows(b)), inactive=_no_window),
    "sliding_window": Rule(frozenset({"window_size"}), hf_layer_windows, _mca_windows, inactive=_no_window),
    # HF's model reads only layer_types; max_window_layers took effect through it (Qwen2/3 config __post_init__)
    "max_window_layers": Rule(_WINDOW_KEYS, lambda cfg: layer_kinds(hf_layer_windows(cfg)),
                              lambda b: layer_kinds(_mca_windows(b)), inactive=_no_window),
    "layer_types": Rule(_WINDOW_KEYS, _field("layer_types"), lambda b: layer_kinds(_mca_windows(b)),
                        inactive=lambda cfg: _no_window(cfg) and set(cfg.get("layer_types") or [])
                        <= {"full_attention", "sliding_attention"}),
    "pretraining_tp": Rule(frozenset(), _field("pretraining_tp"), lambda b: 1,
                           inactive=lambda cfg: cfg.get("pretraining_tp", 1) == 1),
    **_MOE_RULES,
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def measure(hf_config: dict, template_kwargs: dict, absent_hf_keys: list[str], config_hf_to_mca: dict[str, str],
            built: dict, rules: dict[str, Rule] = MEGATRON_RULES) -> dict[str, Any]:
    """Per-key table of how each HF config key reaches the backend (before waivers)."""
    table: dict[str, dict[str, Any]] = {}
    built = {**built, "hf_config": hf_config}  # the MoE rules show Megatron's values in HF's per-layer shape
    for key in sorted(hf_config):
        row: dict[str, Any] = {"hf": _jsonable(hf_config[key])}
        if key in IGNORED_KEYS:
            row.update(state="ignored", why=IGNORED_KEYS[key])
        elif key in rules:
            rule = rules[key]
            if rule.inactive(hf_config):
                row.update(state="inactive")
            else:
                hf_value, backend_value = rule.hf(hf_config), rule.backend(built)
                mapped = any(m in template_kwargs for m in rule.mapped_by)
                row.update(hf=_jsonable(hf_value), backend=_jsonable(backend_value))
                if not _same(hf_value, backend_value):
                    row["state"] = "mismatch"
                elif mapped:
                    row["state"] = "mapped"
                else:
                    row["state"] = "derived" if rule.derivable else "unmapped"
        elif key in config_hf_to_mca:
            target = config_hf_to_mca[key]
            backend_value = built["tc"].get(target, built["gpt"].get(target, template_kwargs.get(target)))
            row.update(backend=_jsonable(backend_value),
                       state="mapped" if _same(hf_config[key], backend_value) else "mismatch")
        else:
            row["state"] = "unmapped"
        table[key] = row
    return {
        "keys": table,
        "template_reads_absent_keys": sorted(absent_hf_keys),
        "unknown_backend_keys": sorted(built.get("unknown_keys", [])),
        "model_type": hf_config.get("model_type"),
    }


def judge(measurement: dict, waivers: dict[str, str], template_model_type: str) -> Verdict:
    problems: list[str] = []
    counts: dict[str, int] = {}
    for key, row in measurement["keys"].items():
        state = row["state"]
        if key in waivers and state in ("unmapped", "mismatch"):
            row.update(state="waived", why=waivers[key])
            state = "waived"
        counts[state] = counts.get(state, 0) + 1
        if state == "unmapped":
            problems.append(f"{key} is not mapped (hf={row['hf']!r}" +
                            (f", backend={row['backend']!r})" if "backend" in row else ")"))
        elif state == "mismatch":
            problems.append(f"{key}: hf={row['hf']!r} but backend={row['backend']!r}")
    for key in measurement["unknown_backend_keys"]:
        problems.append(f"template sets {key!r}, which the backend does not read")
    model_type = measurement.get("model_type")
    if model_type and model_type != template_model_type:
        problems.append(f"config model_type {model_type!r} != template hf_model_type {template_model_type!r}")
    metrics = {"counts": counts, **measurement}
    return from_problems(problems, metrics, {"unmapped": 0, "mismatch": 0}, what="config keys wrong")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(getattr(value, "__name__", value))
