"""Mixtral -> Megatron-core (sparse MoE in every layer, top-k softmax renormalised over the chosen experts, GQA,
SwiGLU experts, RMSNorm, RoPE, optional sliding window).

Checkpoint names are the per-expert ones `save_pretrained` writes (model.layers.L.block_sparse_moe.experts.E.w1 /
w2 / w3, router block_sparse_moe.gate); Megatron's are the local spec's SequentialMLP ones
(decoder.layers.L.mlp.experts.local_experts.E.linear_fc1 / linear_fc2, mlp.router).
"""
from harness.convert import QKVConverOp, RenameConverOp, StackConverOp, register_template
from harness.templates._moe import MoeTemplate

register_template(
    "mixtral",
    hf_layer_prefix="model.layers.",
    hf_moe_prefix=".block_sparse_moe.experts.",
    template_class=MoeTemplate,  # sliding_window -> window_size; every layer sparse -> moe_layer_freq 1
    config_hf_to_mca={
        "vocab_size": "padded_vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "ffn_hidden_size",  # Mixtral's experts' width; moe_ffn_hidden_size follows it
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_query_groups",
        "head_dim": "kv_channels",
        "max_position_embeddings": "max_sequence_length",
        "rms_norm_eps": "layernorm_epsilon",
        "attention_dropout": "attention_dropout",
        "rope_parameters": "rope_parameters",
        "tie_word_embeddings": "tie_embeddings_and_output_weights",
        "num_local_experts": "num_moe_experts",
        "num_experts_per_tok": "moe_router_topk",
        "router_aux_loss_coef": "moe_aux_loss_coeff",
    },
    constant_mca_config={
        "swiglu": True,
        "normalization": "RMSNorm",
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "add_qkv_bias": False,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        # MixtralTopKRouter always renormalises the top-k probabilities: megatron-core's softmax over the top-k
        # logits (pre_softmax False) is the same weighting
        "moe_router_pre_softmax": False,
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
        RenameConverOp(hf_names=".self_attn.o_proj.weight", mca_names=".self_attention.linear_proj.weight"),
        # an MoE layer's norm is its own module in megatron-core (nothing fuses it into the router)
        RenameConverOp(hf_names=".post_attention_layernorm.weight", mca_names=".pre_mlp_layernorm.weight"),
        RenameConverOp(hf_names=".block_sparse_moe.gate.weight", mca_names=".mlp.router.weight"),
        # per expert (after hf_moe_prefix + E): w1 = gate, w3 = up, stacked [gate; up] for swiglu; w2 = down
        StackConverOp(hf_names=[".w1.weight", ".w3.weight"], mca_names=".linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".w2.weight", mca_names=".linear_fc2.weight"),
    ],
)
