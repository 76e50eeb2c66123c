"""Qwen2 -> Megatron-core (dense, GQA, qkv bias, SwiGLU, RMSNorm, RoPE)."""
from harness.convert import QKVBiasConverOp, QKVConverOp, RenameConverOp, StackConverOp, register_template

register_template(
    "qwen2",
    hf_layer_prefix="model.layers.",
    config_hf_to_mca={
        "vocab_size": "padded_vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "ffn_hidden_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_query_groups",
        "max_position_embeddings": "max_sequence_length",
        "rms_norm_eps": "layernorm_epsilon",
        "attention_dropout": "attention_dropout",
        # transformers 5 keeps rope_theta inside rope_parameters; McaModelConfig reads it from there
        "rope_parameters": "rope_parameters",
        "tie_word_embeddings": "tie_embeddings_and_output_weights",
    },
    constant_mca_config={
        "swiglu": True,
        "normalization": "RMSNorm",
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "hidden_dropout": 0.0,
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
        RenameConverOp(hf_names=".post_attention_layernorm.weight", mca_names=".mlp.linear_fc1.layer_norm_weight"),
        StackConverOp(hf_names=[".mlp.gate_proj.weight", ".mlp.up_proj.weight"], mca_names=".mlp.linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".mlp.down_proj.weight", mca_names=".mlp.linear_fc2.weight"),
    ],
)
