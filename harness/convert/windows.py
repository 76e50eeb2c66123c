"""A template whose Megatron config carries HF's sliding windows (harness/windows.py has the semantics)."""
from __future__ import annotations

from ..windows import megatron_window_kwargs
from .template import Template


class SlidingWindowTemplate(Template):
    """HF's sliding_window (+ layer_types) -> window_size / window_attn_skip_freq, through ROLL's
    convert_hf_to_mca_config_kws hook (config_hf_to_mca can only rename keys, not turn W into (W - 1, 0))."""

    def convert_hf_to_mca_config_kws(self, hf_config, **kw_args):
        kw_args.update(megatron_window_kwargs(hf_config))
        return super().convert_hf_to_mca_config_kws(hf_config, **kw_args)
