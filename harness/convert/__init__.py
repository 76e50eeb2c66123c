"""ROLL-compatible conversion API: port a ROLL template by changing only its imports."""
from ..windows import hf_layer_windows, megatron_window_kwargs
from .compat import is_megatron_llama
from .mca_config import McaConfigView
from .ops import (
    ConcatConverOp,
    ConverOp,
    CopyConverOp,
    DropConverOp,
    QKVBiasConverOp,
    QKVConverOp,
    RenameConverOp,
    StackConverOp,
    StackedTensors,
)
from .template import ConversionReport, Converter, Template, get_template, register_template, templates
from .windows import SlidingWindowTemplate

__all__ = [
    "ConcatConverOp", "ConverOp", "ConversionReport", "Converter", "CopyConverOp", "DropConverOp",
    "McaConfigView", "QKVBiasConverOp", "QKVConverOp", "RenameConverOp", "SlidingWindowTemplate", "StackConverOp",
    "StackedTensors", "Template", "get_template", "hf_layer_windows", "is_megatron_llama", "megatron_window_kwargs",
    "register_template", "templates",
]
