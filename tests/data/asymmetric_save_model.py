"""A custom model class whose checkpoint format is asymmetric: it saves the final norm zero-centred
(w - 1, as some models store RMSNorm gains) but loads it back as a plain gain."""
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM


class ZeroCentredSaveConfig(Qwen2Config):
    model_type = "zerocentredsave"


class ZeroCentredSaveForCausalLM(Qwen2ForCausalLM):
    config_class = ZeroCentredSaveConfig

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if "model.norm.weight" in state:
            state["model.norm.weight"] = state["model.norm.weight"] - 1
        return state


AutoConfig.register("zerocentredsave", ZeroCentredSaveConfig)
AutoModelForCausalLM.register(ZeroCentredSaveConfig, ZeroCentredSaveForCausalLM)
