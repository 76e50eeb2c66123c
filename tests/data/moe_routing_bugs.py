"""Planted MoE routing bugs, as what a faulty conversion would hand a backend: a checkpoint directory.

  exchange_experts   two experts' weights swapped in one layer (a converter numbering experts wrongly,
                     e.g. local/global ids mixed up at EP): that layer's router is untouched, so its own
                     routing still agrees; its output changes, so a LATER layer's routing must disagree
  flip_pre_softmax   qwen2_moe's norm_topk_prob inverted (megatron-core's moe_router_pre_softmax mapped the
                     wrong way: the top-k weights renormalised or not); the chosen experts of that layer stay,
                     their mixing weights change, so again a later layer's routing disagrees
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def exchange_experts(src: str | Path, dst: str | Path, layer: int = 0, a: int = 0, b: int = 1) -> Path:
    """A copy of the checkpoint with experts `a` and `b` of `layer` exchanged (every tensor of each)."""
    from safetensors.torch import load_file, save_file

    dst = _copy(Path(src), Path(dst))
    state = load_file(str(dst / "model.safetensors"))
    pattern = re.compile(rf"^(.*\.layers\.{layer}\.(?:mlp|block_sparse_moe)\.experts\.)({a}|{b})(\..*)$")
    swapped, moved = {}, 0
    for name, tensor in state.items():
        match = pattern.match(name)
        if match:
            other = b if int(match[2]) == a else a
            name, moved = f"{match[1]}{other}{match[3]}", moved + 1
        swapped[name] = tensor
    if not moved:
        raise ValueError(f"{src}: layer {layer} has no experts {a}, {b} to exchange")
    save_file(swapped, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def flip_pre_softmax(src: str | Path, dst: str | Path) -> Path:
    """A copy whose config renormalises the top-k router weights where the reference does not (or back)."""
    dst = _copy(Path(src), Path(dst))
    config = json.loads((dst / "config.json").read_text())
    config["norm_topk_prob"] = not config.get("norm_topk_prob", False)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
