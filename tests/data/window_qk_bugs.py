"""Negative controls for the q/k-norm and sliding-window families, derived from the built-in templates.

qwen3-qk-norm-swap: q_layernorm loaded from k_norm and k_layernorm from q_norm (same shape: it round-trips
bit-exactly and loads; only the math notices). mistral-window-unmapped: the built-in Mistral template without
its sliding-window hook, as ROLL's mistral template is (Megatron attends to the whole prefix).
"""
import copy

import harness.templates.mistral  # noqa: F401 - registers "mistral"
import harness.templates.qwen3  # noqa: F401 - registers "qwen3"
from harness.convert import Template, register_template, templates


def _copy(base, name, template_class, weight_converters):
    register_template(name, config_hf_to_mca=base.config_hf_to_mca, weight_converters=weight_converters,
                      hf_layer_prefix=base.hf_layer_prefix, hf_invalid_keys=base.hf_invalid_keys,
                      constant_mca_config=base.constant_mca_config, template_class=template_class)


QWEN3 = templates["qwen3"]
swapped = copy.deepcopy(QWEN3.weight_converters)
q_op, k_op = (next(op for op in swapped if op.mca_names == [f".self_attention.{x}_layernorm.weight"]) for x in "qk")
q_op.hf_names, k_op.hf_names = k_op.hf_names, q_op.hf_names
_copy(QWEN3, "qwen3-qk-norm-swap", type(QWEN3), swapped)

MISTRAL = templates["mistral"]
_copy(MISTRAL, "mistral-window-unmapped", Template, copy.deepcopy(MISTRAL.weight_converters))
