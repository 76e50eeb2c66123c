"""An out-of-tree class registered under a misspelt architecture name: vLLM silently serves its built-in
class instead, so the user's class is never certified. Registration must say so."""
from vllm import ModelRegistry
from vllm.model_executor.models.llama import LlamaForCausalLM


class MyLlama(LlamaForCausalLM):
    pass


ModelRegistry.register_model("LLamaForCausalLM", MyLlama)
