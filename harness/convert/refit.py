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
    (safetensors sorts its header). A tensor is copied only where it shares storage with one before it (a tied
    head): safetensors refuses shared tensors, and a real-shape model's copy would be one more model in memory."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    save_file(out, str(path), metadata={"send_order": json.dumps(list(state))})
    return str(path)


def load_sync_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The trainer's tensors in the order the trainer sends them."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    return {name: state[name] for name, _ in sync_entries(path)}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _entries(path: str | Path) -> list[tuple[str, int]]:
    """(name, bytes) of a safetensors file's tensors, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        out = []
        for name in f.keys():
            view = f.get_slice(name)
            numel = 1
            for dim in view.get_shape():
                numel *= dim
            out.append((name, numel * _DTYPE_BYTES[view.get_dtype()]))
        return out


def sync_entries(path: str | Path) -> list[tuple[str, int]]:
    """(name, bytes) of a sync file's tensors in the order the trainer sends them; nothing is loaded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        order = json.loads((f.metadata() or {}).get("send_order", "[]"))
    sizes = dict(_entries(path))
    return [(name, sizes[name]) for name in [*order, *sorted(set(sizes) - set(order))]]


def checkpoint_entries(directory: str | Path) -> list[tuple[str, str, int]]:
    """(name, file, bytes) of every tensor of an HF checkpoint (index-aware, stream.hf_weight_files), in file order."""
    from .stream import hf_weight_files

    return [(name, str(f.path), size) for f in hf_weight_files(Path(directory)) for name, size in _entries(f.path)]


def read_tensors(files: dict[str, str], names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """One bucket: the named tensors read from their files (`files`: name -> safetensors file)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for path, wanted in by_file.items():
        with safe_open(path, framework="pt") as f:
            tensors.update((name, f.get_tensor(name)) for name in wanted)
    return [(name, tensors[name]) for name in names]
