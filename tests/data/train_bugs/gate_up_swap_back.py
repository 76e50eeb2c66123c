"""Template bug only training exposes: HF -> Megatron is right, Megatron -> HF swaps gate and up.

Forward parity passes (the forward direction is correct); gradients and updated weights converted
back to HF names land on the wrong tensors.
"""
import copy

import torch

import harness.templates.qwen2  # noqa: F401 - the correct template to copy from
from harness.convert import StackConverOp, register_template, templates


class GateUpSwappedOnTheWayBack(StackConverOp):
    def _mca_to_hf(self, weights):
        gate, up = torch.chunk(weights[0], 2, dim=self.dim)
        return [up, gate]


base = templates["qwen2"]
ops = [GateUpSwappedOnTheWayBack([".mlp.gate_proj.weight", ".mlp.up_proj.weight"], ".mlp.linear_fc1.weight", dim=0)
       if op.mca_names == [".mlp.linear_fc1.weight"] else op for op in copy.deepcopy(base.weight_converters)]
register_template("qwen2-swap-back", config_hf_to_mca=base.config_hf_to_mca, weight_converters=ops,
                  hf_layer_prefix=base.hf_layer_prefix, constant_mca_config=base.constant_mca_config)
