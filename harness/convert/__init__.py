"""ROLL-compatible conversion API: port a ROLL template by changing only its imports."""
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

__all__ = [
    "ConcatConverOp", "ConverOp", "ConversionReport", "Converter", "CopyConverOp", "DropConverOp",
    "McaConfigView", "QKVBiasConverOp", "QKVConverOp", "RenameConverOp", "StackConverOp", "StackedTensors",
    "Template", "get_template", "register_template", "templates",
]
