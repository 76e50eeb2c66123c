"""The Megatron-side config a template produces, read the way ROLL's McaModelConfig reads it.

Templates speak ROLL's McaModelConfig vocabulary: Megatron-LM argument names
(padded_vocab_size, swiglu, rotary_base, tie_embeddings_and_output_weights, ...)
mixed with TransformerConfig fields. This module turns that vocabulary into the
two things megatron-core really takes: TransformerConfig kwargs and GPTModel
kwargs. It does not import megatron, so conversion works without it.
"""
from __future__ import annotations

from typing import Any

# Megatron-LM argument name -> GPTModel.__init__ keyword
GPT_MODEL_ARGS = {
    "padded_vocab_size": "vocab_size",
    "max_sequence_length": "max_sequence_length",
    "position_embedding_type": "position_embedding_type",
    "rotary_percent": "rotary_percent",
    "rotary_base": "rotary_base",
    "rotary_scaling": "rope_scaling",
    "rotary_scaling_factor": "rope_scaling_factor",
    "tie_embeddings_and_output_weights": "share_embeddings_and_output_weights",
}
# McaModelConfig/PretrainedConfig fields that are bookkeeping or folded into other fields below.
# rope_scaling: ROLL's LlamaConfig field holding HF's rope dict; megatron-core never reads it (GPTModel takes
# rotary_scaling / rotary_scaling_factor), so the config suite judges the rope megatron really applies.
ROLL_ONLY_KEYS = {
    "swiglu", "squared_relu", "rope_parameters", "rope_scaling", "transformer_impl", "hf_model_type",
    "name_or_path", "hf_config_json", "untie_embeddings_and_output_weights", "norm_epsilon", "moe_parallel_folding",
}
# GPTModel defaults (megatron-core 0.16) used when a template leaves a key out
GPT_MODEL_DEFAULTS = {
    "max_sequence_length": 0,
    "position_embedding_type": "learned_absolute",
    "rotary_percent": 1.0,
    "rotary_base": 10000,
    "rope_scaling": False,
    "rope_scaling_factor": 8.0,
    "share_embeddings_and_output_weights": False,
}


class McaConfigView:
    """Attribute access over the template's Megatron-side kwargs, with McaModelConfig's derivations.

    ConverOps read `num_attention_heads`, `num_query_groups`, `kv_channels` and
    `hidden_size` from it, as they read them from ROLL's McaModelConfig.
    """

    def __init__(self, kwargs: dict[str, Any]):
        kw = dict(kwargs)
        if "untie_embeddings_and_output_weights" in kw:
            kw.setdefault("tie_embeddings_and_output_weights", not kw["untie_embeddings_and_output_weights"])
        if "norm_epsilon" in kw:
            kw.setdefault("layernorm_epsilon", kw["norm_epsilon"])
        rope = kw.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            # McaModelConfig.__post_init__: rope_parameters wins over rotary_base
            kw["rotary_base"] = rope["rope_theta"]
        heads = kw.get("num_attention_heads")
        if kw.get("num_query_groups") is None and heads is not None:
            kw["num_query_groups"] = heads
        if kw.get("kv_channels") is None and heads and kw.get("hidden_size"):
            kw["kv_channels"] = kw["hidden_size"] // heads
        self._kwargs = kw

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_kwargs"][name]
        except KeyError:
            raise AttributeError(f"Megatron config has no {name!r} (the template did not set it)") from None

    def get(self, name: str, default: Any = None) -> Any:
        return self._kwargs.get(name, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._kwargs)

    def activation(self) -> tuple[str, bool]:
        """(activation name, gated) as McaModelConfig derives them."""
        if self._kwargs.get("swiglu"):
            return "silu", True
        if self._kwargs.get("squared_relu"):
            return "squared_relu", bool(self._kwargs.get("gated_linear_unit", False))
        act = self._kwargs.get("activation_func")
        name = getattr(act, "__name__", act) if act is not None else "gelu"
        return str(name), bool(self._kwargs.get("gated_linear_unit", False))

    def gpt_model_kwargs(self) -> dict[str, Any]:
        out = dict(GPT_MODEL_DEFAULTS)
        for key, arg in GPT_MODEL_ARGS.items():
            if key in self._kwargs:
                out[arg] = self._kwargs[key]
        return out

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Everything that is neither a GPTModel argument nor ROLL bookkeeping; activation folded in."""
        out = {k: v for k, v in self._kwargs.items() if k not in GPT_MODEL_ARGS and k not in ROLL_ONLY_KEYS}
        name, gated = self.activation()
        out["gated_linear_unit"] = gated
        out["activation_func"] = name  # resolved to a callable by the Megatron backend
        return out
