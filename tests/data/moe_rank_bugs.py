"""MoE template bugs that only the Megatron ranks' numbers show, each registered under its own name.

- qwen2_moe-experts-exchanged: the built-in qwen2_moe template with its routed-expert ops enumerated by hand
  (no hf_moe_prefix) for a 4-expert model, and experts 0 and 1 sent to each other's Megatron slot in every
  layer -- the copy-paste slip of a hand-written expert list. HF -> Megatron -> HF stays the identity; the
  router still picks expert 0 for tokens that now reach expert 1's MLP, so the logits move, at EP 1 and at
  EP 2 alike (both experts live on EP rank 0 there).
"""
import copy

import harness.templates.qwen2_moe  # noqa: F401 - registers the correct template
from harness.convert import RenameConverOp, StackConverOp, register_dist_config, register_template, templates
from harness.convert.dist_config import get_dist_config

EXPERTS = 4  # model_specs/qwen2_moe.yaml's reference num_experts
_ROUTED = (".gate_proj.weight", ".up_proj.weight", ".down_proj.weight")  # the per-expert rests


def _exchanged(ops, a: int = 0, b: int = 1):
    kept = [op for op in copy.deepcopy(ops) if op.hf_names[0] not in _ROUTED]
    slot = {a: b, b: a}
    for e in range(EXPERTS):
        hf, mca = f".mlp.experts.{e}.", f".mlp.experts.local_experts.{slot.get(e, e)}."
        kept += [StackConverOp(hf_names=[hf + "gate_proj.weight", hf + "up_proj.weight"],
                               mca_names=mca + "linear_fc1.weight", dim=0),
                 RenameConverOp(hf_names=hf + "down_proj.weight", mca_names=mca + "linear_fc2.weight")]
    return kept


def _register(name: str, base: str, ops) -> None:
    t = templates[base]
    register_template(name, hf_layer_prefix=t.hf_layer_prefix, hf_moe_prefix=None, template_class=type(t),
                      config_hf_to_mca=dict(t.config_hf_to_mca), constant_mca_config=dict(t.constant_mca_config),
                      weight_converters=ops)
    register_dist_config(name, get_dist_config(base))  # the shared expert shards as in the base template


_register("qwen2_moe-experts-exchanged", "qwen2_moe", _exchanged(templates["qwen2_moe"].weight_converters))
