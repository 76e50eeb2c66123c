"""Realistic MoE template bugs, each registered under its own name, derived from the built-in MoE templates.

- mixtral-pre-softmax-flipped: the router takes Qwen1.5-MoE's pre-softmax (softmax over all experts, top-k not
  renormalised) where Mixtral renormalises -- every routed output is scaled down, the top-k set unchanged;
- qwen2_moe-norm-topk-unmapped: a plain Template, so nothing turns norm_topk_prob into pre_softmax: Megatron's
  default (False: renormalised) runs a Qwen2-MoE whose norm_topk_prob is false;
- qwen2_moe-shared-gate-dropped: the shared expert's sigmoid gate neither enabled nor converted;
- mixtral-experts-fused: no hf_moe_prefix, per-expert ops whose Megatron name forgets the expert index, so every
  expert of a layer is written over one tensor (each HF expert consumed, one Megatron tensor produced E times).
"""
import copy

import harness.templates.mixtral  # noqa: F401 - registers the correct templates
import harness.templates.qwen2_moe  # noqa: F401
import harness.templates.qwen3_moe  # noqa: F401
from harness.convert import (RenameConverOp, StackConverOp, Template, get_dist_config, register_dist_config,
                             register_template, templates)


def _variant(name, base, *, constants=None, drop_constants=(), drop_ops=(), ops=None, template_class=None,
             hf_moe_prefix="same", config_hf_to_mca=None):
    base = templates[base]
    weight_converters = [op for op in copy.deepcopy(base.weight_converters) if op.hf_names[0] not in drop_ops]
    register_template(
        name,
        hf_layer_prefix=base.hf_layer_prefix,
        hf_moe_prefix=base.hf_moe_prefix if hf_moe_prefix == "same" else hf_moe_prefix,
        template_class=template_class or type(base),
        config_hf_to_mca=dict(config_hf_to_mca or base.config_hf_to_mca),
        constant_mca_config={**{k: v for k, v in base.constant_mca_config.items() if k not in drop_constants},
                             **(constants or {})},
        weight_converters=weight_converters if ops is None else ops(weight_converters),
    )
    register_dist_config(name, get_dist_config(base.hf_model_type))  # shards like its base (shared expert)


_variant("mixtral-pre-softmax-flipped", "mixtral", constants={"moe_router_pre_softmax": True})
# a plain Template: no hook derives pre_softmax from norm_topk_prob (nor the sparse-layer list: every layer is)
_variant("qwen2_moe-norm-topk-unmapped", "qwen2_moe", template_class=Template)
_variant("qwen2_moe-shared-gate-dropped", "qwen2_moe", drop_constants=("moe_shared_expert_gate",),
         drop_ops=(".mlp.shared_expert_gate.weight",))

_EXPERT = ".block_sparse_moe.experts.{}"


def _fused(ops):
    kept = [op for op in ops if op.hf_names[0] not in (".w1.weight", ".w2.weight")]
    return kept + [
        StackConverOp(hf_names=[f"{_EXPERT}.w1.weight", f"{_EXPERT}.w3.weight"],
                      mca_names=".mlp.experts.linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=f"{_EXPERT}.w2.weight", mca_names=".mlp.experts.linear_fc2.weight"),
    ]


_variant("mixtral-experts-fused", "mixtral", hf_moe_prefix=None, ops=_fused)
