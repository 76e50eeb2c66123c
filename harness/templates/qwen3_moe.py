"""Qwen3-MoE -> Megatron-core: routed experts (no shared expert), q/k RMSNorm per head, GQA, no qkv bias, SwiGLU,
RMSNorm, RoPE; released configs set norm_topk_prob true (renormalised top-k). Dense layers, where
decoder_sparse_step / mlp_only_layers make some, use intermediate_size; experts use moe_intermediate_size.

Checkpoint names: model.layers.L.mlp.experts.E.{gate,up,down}_proj, mlp.gate (router), a dense layer's
mlp.{gate,up,down}_proj; Megatron: mlp.experts.local_experts.E.linear_fc1/fc2, mlp.router, mlp.linear_fc1/fc2.
"""
from harness.convert import QKVBiasConverOp, QKVConverOp, RenameConverOp, StackConverOp, register_template
from harness.templates._moe import MoeTemplate

register_template(
    "qwen3_moe",
    hf_layer_prefix="model.layers.",
    hf_moe_prefix=".mlp.experts.",
    template_class=MoeTemplate,  # sliding window, sparse-layer pattern, norm_topk_prob -> moe_router_pre_softmax
    config_hf_to_mca={
        "vocab_size": "padded_vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "ffn_hidden_size",  # dense layers only
        "moe_intermediate_size": "moe_ffn_hidden_size",  # each routed expert
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_query_groups",
        "head_dim": "kv_channels",
        "max_position_embeddings": "max_sequence_length",
        "rms_norm_eps": "layernorm_epsilon",
        "attention_bias": "add_qkv_bias",
        "attention_dropout": "attention_dropout",
        "rope_parameters": "rope_parameters",
        "tie_word_embeddings": "tie_embeddings_and_output_weights",
        "num_experts": "num_moe_experts",  # saved as num_local_experts; the config's attribute_map reads both
        "num_experts_per_tok": "moe_router_topk",
        "router_aux_loss_coef": "moe_aux_loss_coeff",
    },
    constant_mca_config={
        "swiglu": True,
        "normalization": "RMSNorm",
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        "qk_layernorm": True,  # q_norm / k_norm over each head's channels, before RoPE
        "moe_router_score_function": "softmax",
        "moe_router_load_balancing_type": "aux_loss",
    },
    weight_converters=[
        RenameConverOp(hf_names="model.embed_tokens.weight", mca_names="embedding.word_embeddings.weight"),
        RenameConverOp(hf_names="lm_head.weight", mca_names="output_layer.weight"),
        RenameConverOp(hf_names="model.norm.weight", mca_names="decoder.final_layernorm.weight"),
        RenameConverOp(hf_names=".input_layernorm.weight", mca_names=".self_attention.linear_qkv.layer_norm_weight"),
        QKVConverOp(
            hf_names=[".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"],
            mca_names=".self_attention.linear_qkv.weight",
        ),
        QKVBiasConverOp(
            hf_names=[".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias"],
            mca_names=".self_attention.linear_qkv.bias",
        ),
        RenameConverOp(hf_names=".self_attn.q_norm.weight", mca_names=".self_attention.q_layernorm.weight"),
        RenameConverOp(hf_names=".self_attn.k_norm.weight", mca_names=".self_attention.k_layernorm.weight"),
        RenameConverOp(hf_names=".self_attn.o_proj.weight", mca_names=".self_attention.linear_proj.weight"),
        RenameConverOp(hf_names=".post_attention_layernorm.weight", mca_names=".pre_mlp_layernorm.weight"),
        # a dense layer's MLP
        StackConverOp(hf_names=[".mlp.gate_proj.weight", ".mlp.up_proj.weight"], mca_names=".mlp.linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".mlp.down_proj.weight", mca_names=".mlp.linear_fc2.weight"),
        RenameConverOp(hf_names=".mlp.gate.weight", mca_names=".mlp.router.weight"),
        # per routed expert (after hf_moe_prefix + E)
        StackConverOp(hf_names=[".gate_proj.weight", ".up_proj.weight"], mca_names=".linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".down_proj.weight", mca_names=".linear_fc2.weight"),
    ],
)
