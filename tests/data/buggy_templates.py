"""Realistic template bugs, each registered under its own name, derived from the built-in qwen2 template.

Every one of them round-trips HF -> Megatron -> HF bit-exactly (the bug is symmetric), so only running
megatron-core on the converted weights can expose them.
"""
import copy

import harness.templates.qwen2  # noqa: F401 - registers the correct "qwen2" template
from harness.convert import ConcatConverOp, RenameConverOp, StackConverOp, register_template, templates
from harness.selftest.mutations import PlainQKVConcat, Transposed  # the self-test catalogue's own bug ops

BASE = templates["qwen2"]


def _variant(name, replace=None, drop_config=()):
    ops = []
    for op in copy.deepcopy(BASE.weight_converters):
        key = op.mca_names[0]
        ops.append(replace[key] if replace and key in replace else op)
    register_template(
        name,
        config_hf_to_mca={k: v for k, v in BASE.config_hf_to_mca.items() if k not in drop_config},
        weight_converters=ops,
        hf_layer_prefix=BASE.hf_layer_prefix,
        constant_mca_config=BASE.constant_mca_config,
    )


QKV_W = [".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"]
QKV_B = [".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias"]
_variant("qwen2-qkv-concat", {
    ".self_attention.linear_qkv.weight": PlainQKVConcat(QKV_W, ".self_attention.linear_qkv.weight"),
    ".self_attention.linear_qkv.bias": PlainQKVConcat(QKV_B, ".self_attention.linear_qkv.bias"),
})
_variant("qwen2-up-gate", {
    ".mlp.linear_fc1.weight": StackConverOp([".mlp.up_proj.weight", ".mlp.gate_proj.weight"],
                                            ".mlp.linear_fc1.weight", dim=0),
})
_variant("qwen2-transposed-proj", {
    ".self_attention.linear_proj.weight": Transposed(".self_attn.o_proj.weight", ".self_attention.linear_proj.weight"),
})
_variant("qwen2-rope-unmapped", drop_config=("rope_parameters",))
# Concat instead of Stack: identical at TP1; at TP2 rank 0 gets all of gate and rank 1 all of up.
_variant("qwen2-swiglu-concat", {
    ".mlp.linear_fc1.weight": ConcatConverOp([".mlp.gate_proj.weight", ".mlp.up_proj.weight"],
                                             ".mlp.linear_fc1.weight", dim=0),
})
_variant("qwen2-renamed-only", {
    ".self_attention.linear_proj.weight": RenameConverOp(".self_attn.o_proj.weight",
                                                         ".self_attention.linear_proj.weight"),
})
_variant("qwen2-eps-unmapped", drop_config=("rms_norm_eps",))
