"""Template bug only a weight sync exposes: HF -> Megatron interleaves q/k/v per KV group correctly,
Megatron -> HF splits the fused tensor as if it were a plain [q; k; v] concat (skips the per-group
de-interleave). Every rollout engine refit from the trainer gets scrambled attention weights."""
import copy

import torch

import harness.templates.qwen2  # noqa: F401 - the correct template to copy from
from harness.convert import QKVBiasConverOp, QKVConverOp, register_template, templates
from harness.convert.ops import _attention_shape


def _plain_split(fused, mca_config):
    heads, groups, head_dim = _attention_shape(mca_config)
    return list(torch.split(fused, [heads * head_dim, groups * head_dim, groups * head_dim], dim=0))


class PlainSplitBack(QKVConverOp):
    def _mca_to_hf(self, weights):
        return _plain_split(weights[0], self.mca_config)


class PlainSplitBackBias(QKVBiasConverOp):
    def _mca_to_hf(self, weights):
        return _plain_split(weights[0], self.mca_config)


def _swap(op):
    if type(op) is QKVConverOp:
        return PlainSplitBack(op.hf_names, op.mca_names)
    if type(op) is QKVBiasConverOp:
        return PlainSplitBackBias(op.hf_names, op.mca_names)
    return op


base = templates["qwen2"]
register_template("qwen2-qkv-plain-back", config_hf_to_mca=base.config_hf_to_mca,
                  weight_converters=[_swap(op) for op in copy.deepcopy(base.weight_converters)],
                  hf_layer_prefix=base.hf_layer_prefix, constant_mca_config=base.constant_mca_config)
