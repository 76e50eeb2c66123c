"""The trainer side of a weight sync (refit): what a rollout engine receives from a Megatron-core trainer.

ROLL keeps rollout weights current by gathering the trainer's tensor-parallel shards, converting
them back to HF names with the template's Megatron->HF direction, and streaming them into the
engine's own weight loader. This reproduces that path from an HF checkpoint:
HF -> template hf_to_mca -> shard for (tp, pp) -> gather -> template mca_to_hf.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import dist


def load_hf_state(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def trainer_weights(directory: str, template, tp: int, pp: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF-named tensors as a (tp, pp) Megatron-core trainer would send them; plus conversion problems."""
    from transformers import AutoConfig

    from .mca_config import McaConfigView

    kwargs, _absent = template.mca_config_kwargs(AutoConfig.from_pretrained(directory))
    view = McaConfigView(kwargs)
    mca_state, forward = template.hf_to_mca(load_hf_state(directory), view)
    layout = dist.layout_for(view, forward, tp, pp)
    hf_state, backward = template.mca_to_hf(dist.gather_as(dist.shard(mca_state, layout), layout, mca_state), view)
    return hf_state, forward.problems() + backward.problems()
