"""A custom architecture registered the way ROLL's model providers need it (AutoConfig/AutoModelForCausalLM)."""
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM


class TinyCustomConfig(Qwen2Config):
    model_type = "tinycustom"


class TinyCustomForCausalLM(Qwen2ForCausalLM):
    config_class = TinyCustomConfig


AutoConfig.register("tinycustom", TinyCustomConfig)
AutoModelForCausalLM.register(TinyCustomConfig, TinyCustomForCausalLM)
