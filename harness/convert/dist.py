"""Distributed layout of a converted Megatron-core state dict: tensor-parallel shards and pipeline stages.

Rules (megatron-core, local or TE spec):
  column-parallel, split dim 0: linear_qkv (whole KV groups per rank, because the fused
      layout is per group), linear_fc1 (a stacked [gate; up] is split *per part*, so each
      rank holds [gate_r; up_r]), word embeddings and output layer (vocab-parallel)
  row-parallel, split dim 1: linear_proj, linear_fc2 weights
  everything else (norms, row-parallel biases) is duplicated on every TP rank.
Pipeline stage s holds layers [s*L/pp, (s+1)*L/pp), renumbered from 0; the embedding lives on
the first stage, the final norm and output layer on the last (with tied embeddings and pp > 1
the last stage keeps its own copy of the embedding as output_layer.weight, as Megatron does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .layer_spec import to_local

COLUMN_SUFFIXES = (".self_attention.linear_qkv.weight", ".self_attention.linear_qkv.bias",
                   ".mlp.linear_fc1.weight", ".mlp.linear_fc1.bias")
COLUMN_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")
ROW_SUFFIXES = (".self_attention.linear_proj.weight", ".mlp.linear_fc2.weight")
LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)(\..*)$")


def split_dim(name: str) -> int | None:
    """0 for column-parallel, 1 for row-parallel, None for duplicated tensors."""
    local = to_local(name)
    if local in COLUMN_NAMES or local.endswith(COLUMN_SUFFIXES):
        return 0
    if local.endswith(ROW_SUFFIXES):
        return 1
    return None


@dataclass
class Layout:
    tp: int
    pp: int
    num_layers: int
    tied: bool = False
    stacked: dict[str, int] = field(default_factory=dict)  # local name without layer index -> parts

    def __post_init__(self):
        if self.num_layers % self.pp:
            raise ValueError(f"num_layers {self.num_layers} is not divisible by pipeline size {self.pp}")

    @property
    def per_stage(self) -> int:
        return self.num_layers // self.pp

    def parts(self, name: str) -> int:
        local = to_local(name)
        m = LAYER_RE.match(local)
        return self.stacked.get(m.group(2) if m else local, 1)


def layout_for(view, forward_report, tp: int, pp: int) -> "Layout":
    """The (tp, pp) layout of a state dict the template converted (hf_to_mca) under McaConfigView `view`."""
    return Layout(tp, pp, int(view.num_layers), bool(view.get("tie_embeddings_and_output_weights")),
                  stacked_suffixes(forward_report.stacked))


def stacked_suffixes(stacked: dict[str, tuple[int, int]]) -> dict[str, int]:
    """ConversionReport.stacked (full names) -> {layer-local suffix: parts}."""
    out = {}
    for name, (parts, _dim) in stacked.items():
        m = LAYER_RE.match(to_local(name))
        out[m.group(2) if m else to_local(name)] = parts
    return out


def _tp_split(tensor: torch.Tensor, dim: int | None, tp: int, parts: int, name: str) -> list[torch.Tensor]:
    if dim is None or tp == 1:
        return [tensor] * tp
    if tensor.shape[dim] % (tp * parts):
        raise ValueError(f"{name}: dim {dim} of size {tensor.shape[dim]} does not split into {tp} ranks x {parts} parts")
    pieces = [p.chunk(tp, dim=dim) for p in tensor.chunk(parts, dim=dim)]
    return [torch.cat([piece[r] for piece in pieces], dim=dim) for r in range(tp)]


def _tp_join(shards: list[torch.Tensor], dim: int | None, parts: int) -> torch.Tensor:
    if dim is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(parts, dim=dim) for s in shards]
    return torch.cat([torch.cat([r[p] for r in per_rank], dim=dim) for p in range(parts)], dim=dim)


def stage_of(name: str, layout: Layout) -> list[tuple[int, str]]:
    """(stage, local name) pairs a whole-model tensor goes to."""
    local = to_local(name)
    m = LAYER_RE.match(local)
    if m:
        index = int(m.group(1))
        stage = index // layout.per_stage
        return [(stage, f"decoder.layers.{index - stage * layout.per_stage}{m.group(2)}")]
    if local == "embedding.word_embeddings.weight":
        out = [(0, local)]
        if layout.tied and layout.pp > 1:
            out.append((layout.pp - 1, "output_layer.weight"))
        return out
    return [(layout.pp - 1, local)]  # final norm, output layer


def shard(state: dict[str, torch.Tensor], layout: Layout) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Whole Megatron state dict -> {(pp_rank, tp_rank): local-spec state dict}."""
    out = {(p, t): {} for p in range(layout.pp) for t in range(layout.tp)}
    for name, tensor in state.items():
        pieces = _tp_split(tensor, split_dim(name), layout.tp, layout.parts(name), name)
        for stage, local in stage_of(name, layout):
            for rank, piece in enumerate(pieces):
                out[(stage, rank)][local] = piece.contiguous()
    return out


def gather(shards: dict[tuple[int, int], dict[str, torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of shard: local-spec names, layers renumbered globally; checks duplicated tensors agree."""
    whole: dict[str, torch.Tensor] = {}
    for stage in range(layout.pp):
        for local in shards[(stage, 0)]:
            m = LAYER_RE.match(local)
            name = f"decoder.layers.{int(m.group(1)) + stage * layout.per_stage}{m.group(2)}" if m else local
            if layout.tied and layout.pp > 1 and stage == layout.pp - 1 and local == "output_layer.weight":
                continue  # Megatron's copy of the tied embedding
            pieces = [shards[(stage, t)][local] for t in range(layout.tp)]
            dim = split_dim(name)
            if dim is None:
                for t, piece in enumerate(pieces[1:], start=1):
                    if not torch.equal(piece, pieces[0]):
                        raise ValueError(f"{name}: duplicated tensor differs between tp ranks 0 and {t}")
            whole[name] = _tp_join(pieces, dim, layout.parts(name))
    return whole


def gather_as(shards: dict[tuple[int, int], dict[str, torch.Tensor]], layout: Layout,
              spelled_like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gather, with names spelled as in `spelled_like` (the template's own output may use TE names)."""
    spelling = {to_local(name): name for name in spelled_like}
    return {spelling.get(name, name): tensor for name, tensor in gather(shards, layout).items()}
