"""Weight sync (refit): what a rollout engine receives from a Megatron-core trainer, and how it travels.

ROLL keeps rollout weights current by gathering the trainer's live tensor-parallel shards, converting
them back to HF names with the template's Megatron->HF direction, and streaming them into the
engine's own weight loader in buckets of a configured byte size (ROLL's model_update_buffer_size_mb;
its peers bucket too). The trainer side lives in the Megatron worker (op_refit_source: one train
step, then the live parameters are gathered and converted); the engine side in the engine's worker
(vLLM op_refit). This module holds what both sides share: the checkpoint reader, the bucketing rule
and the documented test seam that plants sync faults.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Test seam (negative controls only; tests/test_refit_negative.py): read by the refit path alone.
#   HARNESS_FAULT_REFIT=drop-bucket:N   the engine never receives bucket N (0-based): lost in transit
#   HARNESS_FAULT_REFIT=pre-step        the trainer syncs its weights from before the train step
# A run with a planted fault says so in the refit row's metrics ("planted_fault").
FAULT_ENV = "HARNESS_FAULT_REFIT"


def planted_fault() -> dict | None:
    """The fault planted through HARNESS_FAULT_REFIT, parsed: {"kind": ..., "bucket": N}; None when unset."""
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text:
        return None
    kind, _, arg = text.partition(":")
    if kind == "pre-step" and not arg:
        return {"kind": kind, "text": text}
    if kind == "drop-bucket" and arg.isdigit():
        return {"kind": kind, "bucket": int(arg), "text": text}
    raise ValueError(f"{FAULT_ENV}={text!r}: expected 'drop-bucket:N' or 'pre-step'")


def load_hf_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The whole checkpoint in memory (the round trip and the engine side of refit compare whole dicts):
    the files the index's weight_map names, else every *.safetensors (stream.hf_weight_files)."""
    from safetensors.torch import load_file

    from .stream import hf_weight_files

    state: dict[str, torch.Tensor] = {}
    for f in hf_weight_files(Path(directory)):
        state.update(load_file(f.path))
    return state


def bucket_names(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Tensors in send order, grouped into buckets of at most `bucket_bytes` (ROLL's rule: a tensor that
    would overflow the current bucket starts the next one; a tensor bigger than a bucket travels alone)."""
    buckets: list[list[str]] = []
    current, used = [], 0
    for name, size in sizes:
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        buckets.append(current)
    return buckets


def save_sync_file(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """The trainer's HF-named tensors as one safetensors file; the send order rides in the metadata
    (safetensors sorts its header)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"send_order": json.dumps(list(state))})
    return str(path)


def load_sync_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The trainer's tensors in the order the trainer sends them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        order = json.loads((f.metadata() or {}).get("send_order", "[]"))
    state = load_file(str(path))
    return {name: state[name] for name in [*order, *sorted(set(state) - set(order))]}
