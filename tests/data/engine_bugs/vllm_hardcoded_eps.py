"""An out-of-tree vLLM Llama class that hard-codes its RMSNorm epsilon (1e-6, copied from another model)
instead of reading config.rms_norm_eps: the config-parsing view must name rms_norm_eps."""
from vllm import ModelRegistry
from vllm.model_executor.models.llama import LlamaForCausalLM


class FixedEpsLlama(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        for layer in self.model.layers:
            layer.input_layernorm.variance_epsilon = 1e-6
            layer.post_attention_layernorm.variance_epsilon = 1e-6


ModelRegistry.register_model("LlamaForCausalLM", FixedEpsLlama)
