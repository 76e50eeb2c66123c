"""Megatron-side weight names under the Transformer-Engine spec vs the local spec.

ROLL's templates name the norms the TE way (fused into the following linear);
megatron-core's local spec keeps them as separate modules. Both describe the
same tensors, so the harness compares and loads through this correspondence.
"""
from __future__ import annotations

TE_TO_LOCAL = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".self_attention.linear_qkv.layer_norm_bias": ".input_layernorm.bias",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_bias": ".pre_mlp_layernorm.bias",
}
LOCAL_TO_TE = {v: k for k, v in TE_TO_LOCAL.items()}


def _swap(name: str, table: dict[str, str]) -> str:
    for suffix, replacement in table.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + replacement
    return name


def to_local(name: str) -> str:
    return _swap(name, TE_TO_LOCAL)


def to_te(name: str) -> str:
    return _swap(name, LOCAL_TO_TE)
