"""Sharding declarations per template: ROLL mcore_adapter's DistParallelConfig and register_dist_config.

A template declares how each Megatron weight it produces is split over tensor-parallel ranks, next
to its mapping (ROLL: `register_dist_config("qwen2_moe", default_dist_config.merge_configs(
shared_moe_dist_config))`); a template without a declaration gets `default_dist_config`
(ROLL's get_dist_config). Names are "pure" names: the part after `decoder.layers.L` or, for an
expert, after `decoder.layers.L.mlp.experts.local_experts.E` (ROLL's remove_mca_weight_prefix);
entries match exactly or as fnmatch patterns, as ROLL's name_match does.

Kinds, in ROLL's order of precedence: swiglu (column-parallel per [gate; up] part), gdn (column per
part), duplicated, column (split dim 0), row (split dim 1). A `.bias` takes its weight's kind, as in
ROLL, except that a row-parallel layer's bias is duplicated (megatron adds it after the reduction, one
whole copy per rank). Expert weights are TP-split only at ep 1 (dist.expert_tp), but they must
be declared like any other. A tensor no declaration covers is an UndeclaredTensorError.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MCORE_WORD_EMBEDDING = "embedding.word_embeddings.weight"
MCORE_LM_HEAD = "output_layer.weight"


class UndeclaredTensorError(ValueError):
    """A Megatron tensor whose sharding no dist config declares (it would otherwise be silently duplicated)."""


@dataclass
class DistParallelConfig:
    pre_process_weights: list[str] = field(default_factory=list)  # first pipeline stage only
    post_process_weights: list[str] = field(default_factory=list)  # last pipeline stage only
    duplicated_weights: list[str] = field(default_factory=list)
    column_parallel_weights: list[str] = field(default_factory=list)
    row_parallel_weights: list[str] = field(default_factory=list)
    swiglu_weights: list[str] = field(default_factory=list)
    gdn_weights: list[str] = field(default_factory=list)
    # TE grouped-GEMM expert names (ROLL); the harness builds SequentialMLP, whose names are per expert
    grouped_duplicated_map: dict[str, str] = field(default_factory=dict)
    grouped_column_map: dict[str, str] = field(default_factory=dict)
    grouped_row_map: dict[str, str] = field(default_factory=dict)
    te_to_local_key_map: dict[str, str] = field(default_factory=dict)

    def merge_configs(self, other: "DistParallelConfig | None") -> "DistParallelConfig":
        """A new config holding both (ROLL's merge_configs)."""
        if other is None:
            return self
        lists = {name: getattr(self, name) + getattr(other, name) for name in _LIST_FIELDS}
        maps = {name: {**getattr(self, name), **getattr(other, name)} for name in _MAP_FIELDS}
        return DistParallelConfig(**lists, **maps)

    def kind(self, pure_name: str) -> str | None:
        """'swiglu' | 'gdn' | 'duplicated' | 'column' | 'row' for a pure name, None when undeclared."""
        for kind in ("swiglu", "gdn", "duplicated", "column", "row"):
            if _name_match(pure_name, getattr(self, _KIND_FIELDS[kind])):
                return kind
        if pure_name.endswith(".bias"):
            weight_kind = self.kind(pure_name[: -len(".bias")] + ".weight")
            return "duplicated" if weight_kind == "row" else weight_kind
        return None

    def split_dim(self, pure_names: list[str], full_name: str) -> int | None:
        """0 column-parallel, 1 row-parallel, None duplicated; the first of `pure_names` (spellings) declared."""
        for pure in pure_names:
            kind = self.kind(pure)
            if kind is not None:
                return {"duplicated": None, "row": 1}.get(kind, 0)
        raise UndeclaredTensorError(
            f"{full_name}: no dist config declares how to shard {pure_names[0]!r} (add it to the template's "
            f"register_dist_config: duplicated_weights, column_parallel_weights, row_parallel_weights or "
            f"swiglu_weights)")

    def first_stage_only(self, name: str) -> bool:
        return _name_match(name, self.pre_process_weights)


_LIST_FIELDS = ("pre_process_weights", "post_process_weights", "duplicated_weights", "column_parallel_weights",
                "row_parallel_weights", "swiglu_weights", "gdn_weights")
_MAP_FIELDS = ("grouped_duplicated_map", "grouped_column_map", "grouped_row_map", "te_to_local_key_map")
_KIND_FIELDS = {"swiglu": "swiglu_weights", "gdn": "gdn_weights", "duplicated": "duplicated_weights",
                "column": "column_parallel_weights", "row": "row_parallel_weights"}


def _name_match(name: str, patterns) -> bool:
    return name in patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


lora_config = DistParallelConfig(
    duplicated_weights=[".self_attention.linear_proj.lora_B.weight", ".self_attention.linear_qkv.lora_A.weight",
                        ".mlp.linear_fc1.lora_A.weight", ".linear_fc1.lora_A.weight",
                        ".mlp.linear_fc2.lora_B.weight", ".linear_fc2.lora_B.weight"],
    column_parallel_weights=[".self_attention.linear_qkv.lora_B.weight", ".mlp.linear_fc1.lora_B.weight",
                             ".linear_fc1.lora_B.weight"],
    row_parallel_weights=[".self_attention.linear_proj.lora_A.weight", ".mlp.linear_fc2.lora_A.weight",
                          ".linear_fc2.lora_A.weight"],
    swiglu_weights=[".mlp.linear_fc1.lora_B.weight", ".linear_fc1.lora_B.weight"],
)

# ROLL's default_dist_config, plus the local-spec spellings the harness loads (".input_layernorm.weight")
# and the router's expert bias; ".linear_fc1/2.weight" are the per-expert (SequentialMLP) names.
default_dist_config = DistParallelConfig(
    pre_process_weights=[MCORE_WORD_EMBEDDING],
    post_process_weights=[MCORE_LM_HEAD, "decoder.final_layernorm.weight"],
    duplicated_weights=[
        ".self_attention.linear_qkv.layer_norm_weight", ".mlp.linear_fc1.layer_norm_weight",
        ".input_layernorm.weight", ".pre_mlp_layernorm.weight", "decoder.final_layernorm.weight",
        "decoder.final_layernorm.bias", ".self_attention.q_layernorm.weight", ".self_attention.k_layernorm.weight",
        ".mlp.router.weight", ".mlp.router.expert_bias",
    ],
    column_parallel_weights=[MCORE_WORD_EMBEDDING, MCORE_LM_HEAD, ".self_attention.linear_qkv.weight",
                             ".mlp.linear_fc1.weight", ".linear_fc1.weight"],
    row_parallel_weights=[".self_attention.linear_proj.weight", ".mlp.linear_fc2.weight", ".linear_fc2.weight"],
    swiglu_weights=[".mlp.linear_fc1.weight", ".linear_fc1.weight"],
    grouped_column_map={".linear_fc1.weight": ".mlp.experts.weight1"},
    grouped_row_map={".linear_fc2.weight": ".mlp.experts.weight2"},
    te_to_local_key_map={".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
                         ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight"},
).merge_configs(lora_config)

lora_shared_moe_dist_config = DistParallelConfig(
    duplicated_weights=[".mlp.shared_experts.linear_fc1.lora_A.weight", ".mlp.shared_experts.linear_fc2.lora_B.weight"],
    column_parallel_weights=[".mlp.shared_experts.linear_fc1.lora_B.weight"],
    row_parallel_weights=[".mlp.shared_experts.linear_fc2.lora_A.weight"],
    swiglu_weights=[".mlp.shared_experts.linear_fc1.lora_B.weight"],
)

# qwen2_moe's shared expert: TP-split like a dense MLP; its sigmoid gate is duplicated
shared_moe_dist_config = DistParallelConfig(
    duplicated_weights=[".mlp.shared_experts.gate_weight"],
    row_parallel_weights=[".mlp.shared_experts.linear_fc2.weight"],
    swiglu_weights=[".mlp.shared_experts.linear_fc1.weight"],
    te_to_local_key_map={".pre_mlp_layernorm.weight": ".pre_mlp_layernorm.weight"},
).merge_configs(lora_shared_moe_dist_config)


# ---- registry (ROLL's module-level dist_configs) ----
dist_configs: dict[str, DistParallelConfig] = {}
replaced_dist_configs: list[str] = []  # names registered again in this process (the latest declaration wins)


def register_dist_config(names: str | list[str], config: DistParallelConfig) -> None:
    """ROLL asserts a name is new; here a second registration (a plugin imported twice, a ROLL port beside a
    built-in of the same name) replaces the first and is recorded in `replaced_dist_configs`."""
    for name in names if isinstance(names, list) else [names]:
        if name in dist_configs and dist_configs[name] != config:
            replaced_dist_configs.append(name)
            log.info("dist config %r registered again: the latest declaration is used", name)
        dist_configs[name] = config


def get_dist_config(name: str) -> DistParallelConfig:
    return dist_configs.get(name, default_dist_config)
