"""Shared by the built-in MoE templates: what config_hf_to_mca cannot express by renaming a key.

- placement: decoder_sparse_step -> moe_layer_freq would move every sparse layer by one (HF: (i + 1) % N == 0,
  megatron-core: i % N == 0) and mlp_only_layers has no Megatron key, so it goes as an explicit per-layer list;
- routing weights: HF's norm_topk_prob True renormalises the top-k softmax probabilities, which is megatron-core's
  softmax over the top-k logits (moe_router_pre_softmax False); False keeps the full softmax's top-k values
  (pre_softmax True). The flag is inverted, so it is derived here, through ROLL's convert_hf_to_mca_config_kws hook.
"""
from __future__ import annotations

from harness.convert import SlidingWindowTemplate
from harness.moe_layers import megatron_moe_layer_freq


class MoeTemplate(SlidingWindowTemplate):
    """Sliding windows (as SlidingWindowTemplate), HF's sparse-layer pattern and its router weighting."""

    def convert_hf_to_mca_config_kws(self, hf_config, **kw_args):
        kw_args["moe_layer_freq"] = megatron_moe_layer_freq(hf_config)
        norm = getattr(hf_config, "norm_topk_prob", None)
        if norm is not None:
            kw_args["moe_router_pre_softmax"] = not bool(norm)
        return super().convert_hf_to_mca_config_kws(hf_config, **kw_args)
