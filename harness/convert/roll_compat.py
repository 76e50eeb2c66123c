"""The rest of what a ROLL mcore_adapter model module imports, so that a port changes only its import lines.

ROLL's MoE modules (models/{mixtral,qwen2_moe,qwen3_moe}/__init__.py) start with
    register_config("qwen2_moe", McaModelConfig)
    register_model("qwen2_moe", McaGPTModel)
    register_dist_config("qwen2_moe", default_dist_config.merge_configs(shared_moe_dist_config))
register_dist_config is real here (dist_config.py: it decides the sharding). register_config and
register_model only record what was registered (`registered_configs`, `registered_models`): the harness
builds megatron-core's GPTModel itself, from the TransformerConfig the template's config mapping yields
and the local layer spec (as ROLL's McaGPTModel does), so a registered class selects nothing. A
registration of anything but McaModelConfig / McaGPTModel is recorded all the same, for a check to name.
"""
from __future__ import annotations

import logging

from .mca_config import McaConfigView

log = logging.getLogger(__name__)

registered_configs: dict[str, type] = {}
registered_models: dict[str, type] = {}


class McaModelConfig(McaConfigView):
    """ROLL's McaModelConfig (a TransformerConfig plus the HF model type) as the harness sees it: the
    Megatron-side keyword arguments a template maps, read through McaConfigView."""


class McaGPTModel:
    """ROLL's McaGPTModel, named for register_model. The harness never instantiates it: the Megatron backend
    builds megatron-core's GPTModel from the template's TransformerConfig with the local layer spec."""

    def __init__(self, *args, **kwargs):
        raise TypeError("McaGPTModel is a registration name only: the harness builds megatron-core's GPTModel "
                        "itself (harness/backends/megatron.py)")


def _record(table: dict[str, type], what: str, names, cls: type) -> None:
    for name in names if isinstance(names, (list, tuple)) else [names]:
        if name in table and table[name] is not cls:
            log.info("%s %r registered again: the latest registration is kept", what, name)
        table[name] = cls


def register_config(names, config_cls: type = McaModelConfig) -> None:
    """ROLL's register_config(model_type, config class): recorded only (see the module docstring)."""
    _record(registered_configs, "config", names, config_cls)


def register_model(names, model_cls: type = McaGPTModel) -> None:
    """ROLL's register_model(model_type, model class): recorded only; the harness builds GPTModel itself."""
    _record(registered_models, "model", names, model_cls)
