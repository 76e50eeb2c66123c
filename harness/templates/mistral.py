"""Mistral -> Megatron-core (dense, GQA, SwiGLU, RMSNorm, RoPE, a sliding window on every layer)."""
from harness.convert import QKVConverOp, RenameConverOp, SlidingWindowTemplate, StackConverOp, register_template

register_template(
    "mistral",
    hf_layer_prefix="model.layers.",
    template_class=SlidingWindowTemplate,  # sliding_window -> window_size (W keys in HF = (W - 1, 0) in Megatron)
    config_hf_to_mca={
        "vocab_size": "padded_vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "ffn_hidden_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_query_groups",
        "head_dim": "kv_channels",  # Mistral-Nemo's 128 is not hidden_size / heads
        "max_position_embeddings": "max_sequence_length",
        "rms_norm_eps": "layernorm_epsilon",
        "attention_dropout": "attention_dropout",
        "rope_parameters": "rope_parameters",
        "tie_word_embeddings": "tie_embeddings_and_output_weights",
    },
    hf_invalid_keys=[".self_attn.rotary_emb.inv_freq"],  # older checkpoints saved the rope buffer
    constant_mca_config={
        "swiglu": True,
        "normalization": "RMSNorm",
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "add_qkv_bias": False,
        "add_bias_linear": False,
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
        RenameConverOp(hf_names=".self_attn.o_proj.weight", mca_names=".self_attention.linear_proj.weight"),
        RenameConverOp(hf_names=".post_attention_layernorm.weight", mca_names=".mlp.linear_fc1.layer_norm_weight"),
        StackConverOp(hf_names=[".mlp.gate_proj.weight", ".mlp.up_proj.weight"], mca_names=".mlp.linear_fc1.weight", dim=0),
        RenameConverOp(hf_names=".mlp.down_proj.weight", mca_names=".mlp.linear_fc2.weight"),
    ],
)
