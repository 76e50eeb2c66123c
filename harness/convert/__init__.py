"""ROLL-compatible conversion API: port a ROLL template by changing only its imports."""
from ..windows import hf_layer_windows, megatron_window_kwargs
from .compat import is_megatron_llama
from .dist_config import (
    DistParallelConfig,
    UndeclaredTensorError,
    default_dist_config,
    get_dist_config,
    register_dist_config,
    shared_moe_dist_config,
)
from .mca_config import McaConfigView
from .ops import (
    ConcatConverOp,
    ConverOp,
    CopyConverOp,
    DropConverOp,
    GatedQKVConverOp,
    QKVBiasConverOp,
    QKVConverOp,
    RenameConverOp,
    StackConverOp,
    StackedTensors,
    ZeroCenteredRMSNormConverOp,
)
from .roll_compat import McaGPTModel, McaModelConfig, register_config, register_model
from .template import ConversionReport, Converter, Template, get_template, register_template, templates
from .windows import SlidingWindowTemplate

__all__ = [
    "ConcatConverOp", "ConverOp", "ConversionReport", "Converter", "CopyConverOp", "DistParallelConfig",
    "DropConverOp", "GatedQKVConverOp", "McaConfigView", "McaGPTModel", "McaModelConfig", "QKVBiasConverOp",
    "QKVConverOp", "RenameConverOp", "SlidingWindowTemplate", "StackConverOp", "StackedTensors", "Template",
    "UndeclaredTensorError", "ZeroCenteredRMSNormConverOp", "default_dist_config", "get_dist_config",
    "get_template", "hf_layer_windows", "is_megatron_llama", "megatron_window_kwargs", "register_config",
    "register_dist_config", "register_model", "register_template", "shared_moe_dist_config", "templates",
]
