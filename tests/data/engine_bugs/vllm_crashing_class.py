"""An out-of-tree class whose construction kills the engine process outright (as the OOM killer or a
segfaulting kernel would): the check must end as an error with the engine's stderr, not hang."""
import os
import signal
import sys

from vllm import ModelRegistry
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM


class CrashingQwen2(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        print("engine about to die: planted crash", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


ModelRegistry.register_model("Qwen2ForCausalLM", CrashingQwen2)
