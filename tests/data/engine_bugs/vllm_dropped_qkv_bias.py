"""An out-of-tree vLLM Qwen2 class whose load_weights skips the q/k/v biases (a name filter written for
a bias-free model): the engine runs with whatever the biases were initialised to."""
from vllm import ModelRegistry
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

BIASES = (".q_proj.bias", ".k_proj.bias", ".v_proj.bias")


class NoQKVBiasQwen2(Qwen2ForCausalLM):
    def load_weights(self, weights):
        return super().load_weights((name, w) for name, w in weights if not name.endswith(BIASES))


ModelRegistry.register_model("Qwen2ForCausalLM", NoQKVBiasQwen2)
