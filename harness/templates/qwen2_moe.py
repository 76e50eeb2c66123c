"""Qwen2-MoE (Qwen1.5-MoE) -> Megatron-core: routed experts plus a shared expert scaled by a sigmoid gate,
qkv bias, GQA, SwiGLU, RMSNorm, RoPE. With norm_topk_prob false (every released Qwen1.5/2-MoE) the routing
weights are the full softmax's top-k values, not renormalised.

Checkpoint names: model.layers.L.mlp.experts.E.{gate,up,down}_proj, mlp.gate (router), mlp.shared_expert.*,
mlp.shared_expert_gate; Megatron: mlp.experts.local_experts.E.linear_fc1/fc2, mlp.router,
mlp.shared_experts.linear_fc1/fc2 and mlp.shared_experts.gate_weight.
"""
from harness.convert import (QKVBiasConverOp, QKVConverOp, RenameConverOp, StackConverOp, default_dist_config,
                             register_dist_config, register_template, shared_moe_dist_config)
from harness.templates._moe import MoeTemplate


register_template(
    "qwen2_moe",
    hf_layer_prefix="model.layers.",
    hf_moe_prefix=".mlp.experts.",
    template_class=MoeTemplate,  # + norm_topk_prob -> moe_router_pre_softmax
    config_hf_to_mca={
        "vocab_size": "padded_vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "ffn_hidden_size",  # dense layers (mlp_only_layers / decoder_sparse_step)
        "moe_intermediate_size": "moe_ffn_hidden_size",  # each routed expert
        "shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_query_groups",
        "max_position_embeddings": "max_sequence_length",
        "rms_norm_eps": "layernorm_epsilon",
        "qkv_bias": "add_qkv_bias",
        "attention_dropout": "attention_dropout",
        "rope_parameters": "rope_parameters",
        "tie_word_embeddings": "tie_embeddings_and_output_weights",
        "num_experts": "num_moe_experts",
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
        "moe_router_score_function": "softmax",
        "moe_router_load_balancing_type": "aux_loss",
        # shared_expert_gate: sigmoid(x . w) scales the shared expert. megatron-core 0.16 reads moe_shared_expert_gate
        # (McaModelConfig's moe_use_shared_expert_gate, which ROLL's qwen2_moe sets, reaches nothing)
        "moe_shared_expert_gate": True,
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
        RenameConverOp(hf_names=".self_attn.o_proj.weight", mca_names=".self_attention.linear_proj.weight"),
        RenameConverOp(hf_names=".post_attention_layernorm.weight", mca_names=".pre_mlp_layernorm.weight"),
        # a dense layer's MLP (none in an all-sparse config)
        StackConverOp(hf_names=[".mlp.gate_proj.weight", ".mlp.up_proj.weight"], mca_names=".mlp.linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".mlp.down_proj.weight", mca_names=".mlp.linear_fc2.weight"),
        RenameConverOp(hf_names=".mlp.gate.weight", mca_names=".mlp.router.weight"),
        # per routed expert (after hf_moe_prefix + E)
        StackConverOp(hf_names=[".gate_proj.weight", ".up_proj.weight"], mca_names=".linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".down_proj.weight", mca_names=".linear_fc2.weight"),
        # the shared expert: one SwiGLU MLP every token goes through, and its [1, hidden] gate
        StackConverOp(hf_names=[".mlp.shared_expert.gate_proj.weight", ".mlp.shared_expert.up_proj.weight"],
                      mca_names=".mlp.shared_experts.linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".mlp.shared_expert.down_proj.weight",
                       mca_names=".mlp.shared_experts.linear_fc2.weight"),
        RenameConverOp(hf_names=".mlp.shared_expert_gate.weight", mca_names=".mlp.shared_experts.gate_weight"),
    ],
)

# the shared expert shards like a dense MLP (fc1 column/swiglu, fc2 row), its gate is duplicated (ROLL's declaration)
register_dist_config("qwen2_moe", default_dist_config.merge_configs(shared_moe_dist_config))
