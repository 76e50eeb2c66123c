"""Config parsing for inference engines: the same per-key table config_parsing builds for Megatron.

An engine has no converter template: it reads HF config keys itself, partly through its own
config object (lmdeploy's ModelConfig, vLLM's ModelConfig) and partly inside the model class.
So "mapped" means "the engine's config path reads this key", and `reads` (the template_kwargs
of config_parsing.measure) names what was read, e.g. {"model_config.vocab_size", "hf_config.rms_norm_eps"}.

Per engine: a rules dict (HF key -> Rule comparing the HF value with what the engine holds) and
an ignore list of keys the engine legitimately never needs, each with its reason.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from . import config_parsing
from .config_parsing import _SLIDING_OFF, Rule, _act_name, _field

# key -> why an inference engine never needs it (training-only knobs)
ENGINE_IGNORED: dict[str, str] = {
    "attention_dropout": "dropout is off at inference (engines run the model in eval mode)",
    "hidden_dropout": "dropout is off at inference (engines run the model in eval mode)",
}


def _hf_rope(cfg: dict) -> dict | None:
    """The rope an HF config asks for (transformers 5 keeps rope_theta under rope_parameters)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        return None
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return {
        "rope_theta": float(theta) if theta is not None else None,
        "rope_type": params.get("rope_type", params.get("type", "default")),
        "factor": float(params.get("factor", 1.0)),
        "partial_rotary_factor": float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
    }


# ---- lmdeploy ----
# `built` (harness.backends.lmdeploy): {"model_config": ModelConfig fields, "model": the HF attributes as the
# model class sees them (after the ConfigBuilder ran), "reads": HF attributes the class reads,
# "rope": lmdeploy's own rope view, "act": the activation the class applies}.

def _lmd(mc_field: str | None, attr: str) -> Callable[[dict], Any]:
    """What lmdeploy holds for one key: ModelConfig's field and/or the class's read; both shown if they differ."""
    def value(b: dict) -> Any:
        seen = {}
        if mc_field is not None:
            seen["model_config"] = b["model_config"].get(mc_field)
        if attr in b["reads"] or mc_field is None:
            seen["model_class"] = b["model"].get(attr)
        values = list(seen.values())
        return values[0] if all(config_parsing._same(v, values[0]) for v in values) else seen
    return value


def _reads(*attrs: str, model_config: str | None = None) -> frozenset[str]:
    return frozenset({f"hf_config.{a}" for a in attrs} | ({f"model_config.{model_config}"} if model_config else set()))


_ROPE_READS = _reads("rope_parameters", "rope_scaling", "rope_theta")

LMDEPLOY_RULES: dict[str, Rule] = {
    "vocab_size": Rule(_reads("vocab_size", model_config="vocab_size"), _field("vocab_size"),
                       _lmd("vocab_size", "vocab_size")),
    "hidden_size": Rule(_reads("hidden_size", model_config="hidden_size"), _field("hidden_size"),
                        _lmd("hidden_size", "hidden_size")),
    "num_hidden_layers": Rule(_reads("num_hidden_layers", model_config="num_layers"), _field("num_hidden_layers"),
                              _lmd("num_layers", "num_hidden_layers")),
    "num_attention_heads": Rule(_reads("num_attention_heads", model_config="num_attention_heads"),
                                _field("num_attention_heads"), _lmd("num_attention_heads", "num_attention_heads")),
    "num_key_value_heads": Rule(_reads("num_key_value_heads", model_config="num_key_value_heads"),
                                lambda cfg: cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                                _lmd("num_key_value_heads", "num_key_value_heads")),
    "head_dim": Rule(_reads("head_dim", model_config="head_dim"),
                     lambda cfg: cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                     _lmd("head_dim", "head_dim"), derivable=True),
    "intermediate_size": Rule(_reads("intermediate_size"), _field("intermediate_size"),
                              _lmd(None, "intermediate_size")),
    "rms_norm_eps": Rule(_reads("rms_norm_eps"), lambda cfg: float(cfg["rms_norm_eps"]),
                         lambda b: float(b["model"]["rms_norm_eps"])),
    # lmdeploy's qwen2/llama classes hard-code SiluAndMul: "derived" when HF asks for silu, mismatch otherwise
    "hidden_act": Rule(_reads("hidden_act"), lambda cfg: _act_name(cfg["hidden_act"]), lambda b: b["act"],
                       derivable=True),
    "tie_word_embeddings": Rule(_reads("tie_word_embeddings"), lambda cfg: bool(cfg["tie_word_embeddings"]),
                                lambda b: bool(b["model"].get("tie_word_embeddings"))),
    "max_position_embeddings": Rule(_reads("max_position_embeddings"), _field("max_position_embeddings"),
                                    _lmd(None, "max_position_embeddings")),
    "attention_bias": Rule(_reads("attention_bias"), _field("attention_bias"), _lmd(None, "attention_bias")),
    "mlp_bias": Rule(_reads("mlp_bias"), _field("mlp_bias"), _lmd(None, "mlp_bias")),
    "rope_parameters": Rule(_ROPE_READS, _hf_rope, lambda b: b["rope"]),
    "rope_theta": Rule(_ROPE_READS, lambda cfg: float(cfg["rope_theta"]), lambda b: b["rope"]["rope_theta"]),
    "rope_scaling": Rule(_ROPE_READS, _hf_rope, lambda b: b["rope"], inactive=lambda cfg: not cfg.get("rope_scaling")),
    "use_sliding_window": Rule(_reads("use_sliding_window"), _field("use_sliding_window"),
                               _lmd(None, "use_sliding_window"), inactive=_SLIDING_OFF),
    "sliding_window": Rule(_reads("sliding_window", model_config="sliding_window"), _field("sliding_window"),
                           _lmd("sliding_window", "sliding_window"), inactive=_SLIDING_OFF),
    "max_window_layers": Rule(_reads("max_window_layers"), _field("max_window_layers"),
                              _lmd(None, "max_window_layers"), inactive=_SLIDING_OFF),
    "layer_types": Rule(_reads("layer_types"), _field("layer_types"), _lmd(None, "layer_types"),
                        inactive=lambda cfg: all(t == "full_attention" for t in cfg.get("layer_types") or [])),
    "pretraining_tp": Rule(_reads("pretraining_tp"), _field("pretraining_tp"), _lmd(None, "pretraining_tp"),
                           inactive=lambda cfg: cfg.get("pretraining_tp", 1) == 1),
}

# engine name -> (rules, keys it legitimately never needs); harness/checks/vllm_config.py adds vLLM's entry
ENGINES: dict[str, tuple[dict[str, Rule], dict[str, str]]] = {
    "lmdeploy": (LMDEPLOY_RULES, ENGINE_IGNORED),
}


def measure(engine: str, hf_config: dict, reads: Iterable[str], built: dict,
            absent_reads: Iterable[str] = ()) -> dict[str, Any]:
    """config_parsing.measure's table for an engine; judge it with config_parsing.judge.

    reads: what the engine's config path reads ("model_config.<field>", "hf_config.<attr>").
    absent_reads: HF attributes the engine reads that the config does not carry (it then uses defaults).
    """
    rules, ignored = ENGINES[engine]
    table = config_parsing.measure(hf_config, dict.fromkeys(reads, True), list(absent_reads), {}, built, rules)
    for key, row in table["keys"].items():
        if key in ignored and key not in rules:
            row.update(state="ignored", why=ignored[key])
    table["engine"] = engine
    table["engine_reads"] = sorted(reads)
    return table
