"""vLLM's view of an HF config: the values its ModelConfig and the loaded model class really use.

vLLM reads the HF config itself (no template), so every rule counts as "mapped" when the engine
holds the HF value and "mismatch" when it holds another. Values the model class does not expose
(an out-of-tree class may name its modules differently) are "unverified" - reported, not judged;
the logits suite still covers them.
"""
from __future__ import annotations

from typing import Any

from . import engine_config
from ..moe_layers import hf_moe_layers
from ..windows import hf_layer_windows, layer_kinds
from .config_parsing import _SLIDING_OFF, Rule, _act_name, _field, _rope
from .engine_config import ENGINE_IGNORED

NOT_EXPOSED = "<not exposed by the engine>"
_ROPE_TYPES = {"RotaryEmbedding": "default", "Llama3RotaryEmbedding": "llama3",
               "LinearScalingRotaryEmbedding": "linear", "DynamicNTKScalingRotaryEmbedding": "dynamic",
               "YaRNScalingRotaryEmbedding": "yarn"}


def engine_view(model_config, facts: dict[str, Any]) -> dict[str, Any]:
    """`model_config`: vllm.config.ModelConfig of the running engine; `facts`: read off the loaded model."""
    mc = {
        "vocab_size": model_config.get_vocab_size(),
        "hidden_size": model_config.get_hidden_size(),
        "num_attention_heads": getattr(model_config.hf_text_config, "num_attention_heads", None),
        "num_key_value_heads": model_config.get_total_num_kv_heads(),
        "head_dim": model_config.get_head_size(),
        "sliding_window": model_config.get_sliding_window(),
        "model_type": getattr(model_config.hf_config, "model_type", None),
    }
    return {"mc": mc, "model": facts}


def _mc(name: str):
    return lambda v: v["mc"].get(name)


def _model(name: str):
    return lambda v: v["model"].get(name)


def _engine_rope(v: dict) -> dict | None:
    m = v["model"]
    if m.get("rope_base") is None:
        return None
    return {"rope_theta": float(m["rope_base"]), "rope_type": _ROPE_TYPES.get(m.get("rope_class"), m.get("rope_class")),
            "partial_rotary_factor": float(m["rotary_dim"]) / float(m["head_size"])}


def _windows(v: dict) -> list | None:
    return v["model"].get("layer_windows")


def _kinds(v: dict) -> list | None:
    return None if _windows(v) is None else layer_kinds(_windows(v))


def _rule(key: str, hf, engine, **kw) -> Rule:
    return Rule(frozenset({key}), hf, engine, **kw)


def _moe(name: str):
    """A fact of the engine's fused-MoE layers (None: the model class has none, or does not expose it)."""
    return lambda v: (v["model"].get("moe") or {}).get(name)


def _dense(cfg: dict) -> bool:
    return not any(hf_moe_layers(cfg))


def _intermediate(v: dict):
    """HF's intermediate_size: Mixtral's is the expert width, the other families' the dense MLP's."""
    if v["mc"].get("model_type") == "mixtral":
        return _moe("expert_intermediate_size")(v)
    return v["model"].get("dense_intermediate_size") or v["model"].get("intermediate_size")


def _dense_mlp_unused(cfg: dict) -> bool:
    """Qwen-MoE's dense MLP width matters only where some layer is dense."""
    return "moe_intermediate_size" in cfg and all(hf_moe_layers(cfg)) and bool(hf_moe_layers(cfg))


VLLM_RULES: dict[str, Rule] = {
    "vocab_size": _rule("vocab_size", _field("vocab_size"), _mc("vocab_size")),
    "hidden_size": _rule("hidden_size", _field("hidden_size"), _mc("hidden_size")),
    "intermediate_size": _rule("intermediate_size", _field("intermediate_size"), _intermediate,
                               inactive=_dense_mlp_unused),
    "num_hidden_layers": _rule("num_hidden_layers", _field("num_hidden_layers"), _model("num_layers")),
    "num_attention_heads": _rule("num_attention_heads", _field("num_attention_heads"), _mc("num_attention_heads")),
    "num_key_value_heads": _rule("num_key_value_heads",
                                 lambda cfg: cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                                 _mc("num_key_value_heads")),
    "head_dim": _rule("head_dim", lambda cfg: cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                      _mc("head_dim")),
    "max_position_embeddings": _rule("max_position_embeddings", _field("max_position_embeddings"),
                                     _model("rope_max_position")),
    "rms_norm_eps": _rule("rms_norm_eps", lambda cfg: float(cfg["rms_norm_eps"]), _model("rms_eps")),
    "hidden_act": _rule("hidden_act", lambda cfg: _act_name(cfg["hidden_act"]),
                        lambda v: None if v["model"].get("activation") is None
                        else _act_name(v["model"]["activation"].removesuffix("AndMul").lower())),
    "attention_bias": _rule("attention_bias", _field("attention_bias"), _model("qkv_bias")),
    "mlp_bias": _rule("mlp_bias", _field("mlp_bias"), _model("mlp_bias")),
    "tie_word_embeddings": _rule("tie_word_embeddings", lambda cfg: bool(cfg["tie_word_embeddings"]),
                                 _model("tied")),
    "rope_parameters": _rule("rope_parameters", _rope, _engine_rope),
    "rope_theta": _rule("rope_theta", lambda cfg: float(cfg["rope_theta"]), _model("rope_base")),
    "rope_scaling": _rule("rope_scaling", _field("rope_scaling"), lambda v: None,
                          inactive=lambda cfg: not cfg.get("rope_scaling")),
    # per layer, as config_parsing judges Megatron: the window each attention layer of the engine was built with
    "use_sliding_window": _rule("use_sliding_window", lambda cfg: not _SLIDING_OFF(cfg),
                                lambda v: None if _windows(v) is None else any(w is not None for w in _windows(v)),
                                inactive=_SLIDING_OFF),
    "sliding_window": _rule("sliding_window", hf_layer_windows, _windows, inactive=_SLIDING_OFF),
    "max_window_layers": _rule("max_window_layers", lambda cfg: layer_kinds(hf_layer_windows(cfg)), _kinds,
                               inactive=_SLIDING_OFF),
    "layer_types": _rule("layer_types", _field("layer_types"), _kinds,
                         inactive=lambda cfg: _SLIDING_OFF(cfg) and set(cfg.get("layer_types") or [])
                         <= {"full_attention", "sliding_attention"}),
    "qkv_bias": _rule("qkv_bias", _field("qkv_bias"), _model("qkv_bias")),
    # MoE: read off the engine's fused-MoE runners (router and routed experts) of every sparse layer
    "num_experts": _rule("num_experts", _field("num_experts"), _moe("experts"), inactive=_dense),
    "num_local_experts": _rule("num_local_experts", _field("num_local_experts"), _moe("experts"), inactive=_dense),
    "num_experts_per_tok": _rule("num_experts_per_tok", _field("num_experts_per_tok"), _moe("top_k"),
                                 inactive=_dense),
    "norm_topk_prob": _rule("norm_topk_prob", lambda cfg: bool(cfg["norm_topk_prob"]), _moe("renormalize"),
                            inactive=_dense),
    "moe_intermediate_size": _rule("moe_intermediate_size", _field("moe_intermediate_size"),
                                   _moe("expert_intermediate_size"), inactive=_dense),
    "shared_expert_intermediate_size": _rule("shared_expert_intermediate_size",
                                             _field("shared_expert_intermediate_size"),
                                             _moe("shared_intermediate_size"), inactive=_dense),
    # which layers are sparse (HF: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers)
    "decoder_sparse_step": _rule("decoder_sparse_step", hf_moe_layers, _moe("layers"), inactive=_dense),
    "mlp_only_layers": _rule("mlp_only_layers", hf_moe_layers, _moe("layers"), inactive=_dense),
    "pretraining_tp": _rule("pretraining_tp", _field("pretraining_tp"), lambda v: 1,
                            inactive=lambda cfg: cfg.get("pretraining_tp", 1) == 1),
}


# training-only MoE keys: inference never computes the load-balancing loss or jitters the router
VLLM_IGNORED = {**ENGINE_IGNORED,
                "router_aux_loss_coef": "the load-balancing aux loss is a training term; inference never computes it",
                "output_router_logits": "returns router logits for the aux loss (training); no effect on the math",
                "router_jitter_noise": "router jitter applies in training only (HF: `if self.training`)"}
engine_config.ENGINES["vllm"] = (VLLM_RULES, VLLM_IGNORED)


def measure(hf_config: dict, view: dict[str, Any]) -> dict[str, Any]:
    """engine_config's per-key table for vLLM; values the model class does not expose become "unverified"."""
    exposed = [k for k, rule in VLLM_RULES.items() if rule.backend(view) is not None or rule.inactive(hf_config)]
    table = engine_config.measure("vllm", hf_config, exposed, view)
    for key, row in table["keys"].items():
        if key in VLLM_RULES and key not in exposed:
            row.update(state="unverified", backend=NOT_EXPOSED,
                       why="the engine's model class does not expose it; the logits suite covers it")
    return table
