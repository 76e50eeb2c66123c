"""Sliding-window attention: HF's per-layer windows and the megatron-core fields that express them.

HF (transformers 5 masking_utils.sliding_window_overlay): a query at i sees keys j with i - W < j <= i, i.e. W
keys including itself. megatron-core's window_size (left, right) sees [i - left, i + right]
(transformer/utils.get_sliding_window_causal_mask), so HF's W is (W - 1, 0). Which layers are windowed:
`layer_types` where the family has it (Qwen2/3 derive it from use_sliding_window and max_window_layers),
else every layer (Mistral). megatron-core picks windowed layers with window_attn_skip_freq
(transformer/utils.is_layer_window_attention): None = all, int N = all but every Nth, a list = one flag per
layer (1 = windowed). Pure Python: the config judges import it without torch.
"""
from __future__ import annotations

from typing import Any


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def hf_layer_windows(config: Any) -> list[int | None]:
    """The window HF's model applies in each layer (None = full attention); config: a dict or PretrainedConfig."""
    types = _get(config, "layer_types")
    layers = len(types) if types else int(_get(config, "num_hidden_layers", 0) or 0)
    window = _get(config, "sliding_window")
    if window is None or _get(config, "use_sliding_window", True) is False:
        return [None] * layers
    if types:
        return [int(window) if kind == "sliding_attention" else None for kind in types]
    return [int(window)] * layers


def megatron_window_kwargs(config: Any) -> dict[str, Any]:
    """window_size / window_attn_skip_freq for megatron-core equal to HF's windows ({} when there are none)."""
    windows = hf_layer_windows(config)
    sizes = {w for w in windows if w is not None}
    if not sizes:
        return {}
    if len(sizes) > 1:
        raise ValueError(f"layers use different sliding windows {sorted(sizes)}; megatron-core has one window_size")
    pattern = None if all(w is not None for w in windows) else [int(w is not None) for w in windows]
    return {"window_size": (sizes.pop() - 1, 0), "window_attn_skip_freq": pattern}


def megatron_layer_windows(window_size: Any, skip_freq: Any, num_layers: int) -> list[Any]:
    """Per layer, the window megatron-core applies in HF's terms (left + 1 keys; None = full attention; a
    non-causal window has no HF equivalent and is shown as megatron spells it)."""
    out: list[Any] = []
    for number in range(1, num_layers + 1):  # megatron-core's layer numbers are 1-based and global
        if not window_size:
            windowed = False
        elif skip_freq is None:
            windowed = True
        elif isinstance(skip_freq, int):
            windowed = number % skip_freq != 0
        else:
            windowed = bool(skip_freq[number - 1])
        left, right = (window_size or (-1, 0))[:2]
        if not windowed or left < 0:
            out.append(None)
        else:
            out.append(int(left) + 1 if right == 0 else f"window_size=({left}, {right})")
    return out


def layer_kinds(windows: list[Any]) -> list[str]:
    """HF's layer_types spelling of per-layer windows."""
    return ["full_attention" if w is None else "sliding_attention" for w in windows]
