"""Megatron-core (local layer spec) as ROLL's megatron_train/megatron_infer strategies build it.

Operations: the config-parsing view (the TransformerConfig really built from
the template) and the round trip with the names/shapes GPTModel expects.

megatron-core 0.16.1 on CPU (Python 3.11) needs: gloo, use_cpu_initialization,
every fusion off, and the RNG tracker initialised without the CUDA seeding
helper (it asserts on CPU). Newer megatron-core on GPU takes the same code.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

from .base import Backend

ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu"}
CPU_SAFE = dict(
    use_cpu_initialization=True, perform_initialization=False, bias_activation_fusion=False,
    bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
    cross_entropy_loss_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
)
# TransformerConfig fields the config-parsing rules read, reported even when the template leaves them default
REPORTED_FIELDS = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                   "kv_channels", "normalization", "layernorm_epsilon", "activation_func", "gated_linear_unit",
                   "attention_dropout", "hidden_dropout", "add_qkv_bias", "add_bias_linear", "window_size",
                   "window_attn_skip_freq", "qk_layernorm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _activation(name: str):
    import torch
    import torch.nn.functional as F

    if name == "squared_relu":
        return lambda x: torch.pow(F.relu(x), 2)
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no Megatron equivalent in the harness")
    return getattr(F, ACTIVATIONS[name])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(getattr(value, "__name__", value))


class MegatronBackend(Backend):
    name = "megatron"
    suites = ("config", "roundtrip")
    packages = ("torch", "megatron-core")

    def setup(self) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
        # The CUDA seeding helper asserts on CPU; the inference tracker needs no device.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- helpers ----
    def _template_and_view(self, directory: str):
        from transformers import AutoConfig

        from ..spec_plugins import resolve_template

        hf_config = AutoConfig.from_pretrained(directory)
        template = resolve_template(self.spec)
        kwargs, absent = template.mca_config_kwargs(hf_config)
        from ..convert import McaConfigView

        return hf_config, template, kwargs, absent, McaConfigView(kwargs)

    def _transformer_config(self, view, dtype: str = "float32"):
        import torch
        from megatron.core.transformer import TransformerConfig

        fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        requested = view.transformer_config_kwargs()
        unknown = sorted(k for k in requested if k not in fields)
        kwargs = {k: v for k, v in requested.items() if k in fields}
        kwargs["activation_func"] = _activation(kwargs["activation_func"])
        kwargs.update(CPU_SAFE, params_dtype=getattr(torch, dtype))
        return TransformerConfig(**kwargs), unknown

    # ---- operations ----
    def op_config(self, dir: str) -> dict[str, Any]:  # noqa: A002 - wire name
        from ..checks import config_parsing

        hf_config, template, kwargs, absent, view = self._template_and_view(dir)
        tc, unknown = self._transformer_config(view)
        reported = set(REPORTED_FIELDS) | set(view.transformer_config_kwargs())
        built = {
            "tc": {name: _jsonable(getattr(tc, name)) for name in sorted(reported) if hasattr(tc, name)},
            "gpt": {k: _jsonable(v) for k, v in view.gpt_model_kwargs().items()},
            "unknown_keys": unknown,
        }
        return config_parsing.measure(hf_config.to_dict(), kwargs, absent, template.config_hf_to_mca, built)

    def op_roundtrip(self, dir: str) -> dict[str, Any]:  # noqa: A002
        from safetensors.torch import load_file

        from ..checks.roundtrip import measure_roundtrip

        hf_config, template, kwargs, absent, view = self._template_and_view(dir)
        state = {}
        for shard in sorted(Path(dir).glob("*.safetensors")):
            state.update(load_file(shard))
        measurement = measure_roundtrip(state, template, view)
        measurement["expected_shapes"] = self._expected_shapes(view)
        return measurement

    def _expected_shapes(self, view) -> dict[str, list[int]]:
        """Parameter names and shapes of megatron-core's GPTModel (local spec) for this config."""
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        tc, _ = self._transformer_config(view, "bfloat16")
        model = GPTModel(tc, get_gpt_layer_local_spec(), **view.gpt_model_kwargs())
        shapes = {name: list(t.shape) for name, t in model.state_dict().items()
                  if not name.endswith("._extra_state")}
        del model
        return shapes


BACKEND = MegatronBackend
