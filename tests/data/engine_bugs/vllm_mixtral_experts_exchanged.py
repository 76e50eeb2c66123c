"""An out-of-tree vLLM Mixtral class whose load_weights maps layer 0's experts 0 and 1 onto each other (an
expert-index remap written off by one): the router still picks expert 0, which then computes expert 1."""
import re

from vllm import ModelRegistry
from vllm.model_executor.models.mixtral import MixtralForCausalLM

SWAP = re.compile(r"^(model\.layers\.0\.block_sparse_moe\.experts\.)([01])(\.)")


class ExpertsExchangedMixtral(MixtralForCausalLM):
    def load_weights(self, weights):
        return super().load_weights((SWAP.sub(lambda m: f"{m[1]}{1 - int(m[2])}{m[3]}", name), w)
                                    for name, w in weights)


ModelRegistry.register_model("MixtralForCausalLM", ExpertsExchangedMixtral)
