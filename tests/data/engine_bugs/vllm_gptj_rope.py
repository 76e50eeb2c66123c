"""An out-of-tree vLLM model class, registered the way vLLM documents, that rotates GPT-J style
(interleaved pairs) where Llama rotates NeoX style (halves). Config values all agree; only the
numbers differ."""
from vllm import ModelRegistry
from vllm.model_executor.models.llama import LlamaForCausalLM


class GPTJRopeLlama(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):  # vLLM passes these by keyword
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        for layer in self.model.layers:
            layer.self_attn.rotary_emb.is_neox_style = False


ModelRegistry.register_model("LlamaForCausalLM", GPTJRopeLlama)
