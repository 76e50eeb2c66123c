"""Weight conversion operations with ROLL mcore_adapter's ConverOp API.

A template declares ops; each op knows both directions (HF -> Megatron-core and
back) for whole, unsharded tensors. Names are relative to the layer prefix when
they start with "." and may contain "{}" wildcards, exactly as in ROLL.
Sharding for tensor/pipeline parallelism is applied afterwards, elsewhere.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StackedTensors:
    """Tensors that Megatron keeps fused along `dim` but that shard per part (swiglu [gate; up])."""

    tensors: list[torch.Tensor]
    dim: int = 0

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.tensors, dim=self.dim)


@functools.lru_cache(maxsize=None)  # Converter.add asks for every op's patterns on every tensor
def name_pattern(name: str) -> re.Pattern:
    """'{}' matches any text (layer-local names like '.mlp.experts.{}.w1.weight')."""
    return re.compile("^" + re.escape(name).replace(re.escape("{}"), "(.*?)") + "$")


@functools.lru_cache(maxsize=None)
def roll_pattern(name: str) -> re.Pattern:
    """How ROLL's get_conver_op / is_required_name match a "{}" name: re.match, i.e. a prefix match (text
    after the pattern is allowed), "{}" capturing greedily as its _name_to_pattern does."""
    return re.compile(re.escape(name).replace(re.escape("{}"), "(.*)"))


@dataclass
class ConverOp:
    hf_names: Any
    mca_names: Any
    _mca_config: Any = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.hf_names, str):
            self.hf_names = [self.hf_names]
        if isinstance(self.mca_names, str):
            self.mca_names = [self.mca_names]
        self.hf_names = list(self.hf_names)
        self.mca_names = list(self.mca_names)

    @property
    def mca_config(self):
        return self._mca_config

    @mca_config.setter
    def mca_config(self, value):
        self._mca_config = value

    def is_required_name(self, name: str, mca_name: bool) -> bool:
        names = self.mca_names if mca_name else self.hf_names  # ROLL: the exact name, else a "{}" pattern
        return name in names or any(roll_pattern(n).match(name) for n in names if "{}" in n)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.hf_names} <-> {self.mca_names})"

    def _hf_to_mca(self, weights: list[torch.Tensor]):
        raise NotImplementedError(f"{type(self).__name__} does not convert HF -> Megatron")

    def _mca_to_hf(self, weights: list[torch.Tensor]):
        raise NotImplementedError(f"{type(self).__name__} does not convert Megatron -> HF")


@dataclass
class DropConverOp(ConverOp):
    """Tensors that exist on one side only and are deliberately discarded."""

    def _hf_to_mca(self, weights):
        return []

    def _mca_to_hf(self, weights):
        return []


@dataclass
class RenameConverOp(ConverOp):
    def __post_init__(self):
        super().__post_init__()
        if len(self.hf_names) != 1 or len(self.mca_names) != 1:
            raise ValueError(f"RenameConverOp takes exactly one name per side: {self.hf_names} {self.mca_names}")

    def _hf_to_mca(self, weights):
        return weights

    def _mca_to_hf(self, weights):
        return weights


def _one_side_single(op: ConverOp) -> None:
    if (len(op.hf_names) == 1) == (len(op.mca_names) == 1):
        raise ValueError(f"{type(op).__name__} needs exactly one name on one side: {op.hf_names} {op.mca_names}")


@dataclass
class CopyConverOp(ConverOp):
    """One tensor duplicated into several on the other side (and read back from the first)."""

    def __post_init__(self):
        super().__post_init__()
        _one_side_single(self)

    def _hf_to_mca(self, weights):
        return [weights[0]] * len(self.mca_names)

    def _mca_to_hf(self, weights):
        return [weights[0]] * len(self.hf_names)


@dataclass
class ConcatConverOp(ConverOp):
    dim: int = 0

    def __post_init__(self):
        super().__post_init__()
        _one_side_single(self)

    def _hf_to_mca(self, weights):
        if len(weights) == 1:
            return list(torch.chunk(weights[0], len(self.mca_names), dim=self.dim))
        return torch.cat(weights, dim=self.dim)

    def _mca_to_hf(self, weights):
        if len(weights) == 1:
            return list(torch.chunk(weights[0], len(self.hf_names), dim=self.dim))
        return torch.cat(weights, dim=self.dim)


@dataclass
class StackConverOp(ConverOp):
    """Like Concat, but the fused tensor remembers its parts so TP shards each part (swiglu)."""

    dim: int = 0

    def __post_init__(self):
        super().__post_init__()
        _one_side_single(self)

    def _hf_to_mca(self, weights):
        if len(weights) == 1:
            return list(_as_stacked(weights[0], len(self.mca_names), self.dim).tensors)
        return StackedTensors(list(weights), dim=self.dim)

    def _mca_to_hf(self, weights):
        if len(weights) == 1:
            return list(_as_stacked(weights[0], len(self.hf_names), self.dim).tensors)
        return StackedTensors(list(weights), dim=self.dim)


def _as_stacked(weight, parts: int, dim: int) -> StackedTensors:
    if isinstance(weight, StackedTensors):
        return weight
    return StackedTensors(list(torch.chunk(weight, parts, dim=dim)), dim=dim)


def _attention_shape(config) -> tuple[int, int, int]:
    heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    if heads % groups:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_query_groups {groups}")
    return heads, groups, head_dim


@dataclass
class QKVConverOp(ConverOp):
    """q, k, v -> Megatron's fused linear_qkv, interleaved per KV group: [q_g; k_g; v_g] for each group g."""

    hidden_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if len(self.hf_names) != 3 or len(self.mca_names) != 1:
            raise ValueError(f"{type(self).__name__} maps three HF names to one: {self.hf_names} {self.mca_names}")

    def _hf_to_mca(self, weights):
        q, k, v = weights
        heads, groups, head_dim = _attention_shape(self.mca_config)
        trailing = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, heads // groups * head_dim, *trailing),
                k.reshape(groups, head_dim, *trailing),
                v.reshape(groups, head_dim, *trailing),
            ],
            dim=1,
        )
        return fused.reshape(-1, *trailing)

    def _mca_to_hf(self, weights):
        (fused,) = weights
        heads, groups, head_dim = _attention_shape(self.mca_config)
        trailing = fused.shape[1:]
        per_group = fused.reshape(groups, (heads // groups + 2) * head_dim, *trailing)
        q, k, v = torch.split(per_group, [heads // groups * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *trailing) for t in (q, k, v)]


@dataclass
class QKVBiasConverOp(QKVConverOp):
    """The same per-group interleave for the 1-D q/k/v biases."""


@dataclass
class GatedQKVConverOp(QKVConverOp):
    """Gated attention (Qwen3-Next/Qwen3.5): each head's q_proj rows are [q_h; gate_h] (2 x head_dim).

    Megatron's linear_qkv holds, per KV group g: the group's q heads, then their gates, then k_g, v_g
    (ROLL's layout), so a TP rank's whole groups keep their gates.
    """

    def _hf_to_mca(self, weights):
        q, k, v = weights
        heads, groups, head_dim = _attention_shape(self.mca_config)
        trailing = q.shape[1:]
        q_and_gate = q.reshape(groups, heads // groups, 2, head_dim, *trailing)
        fused = torch.cat([q_and_gate[:, :, 0], q_and_gate[:, :, 1],
                           k.reshape(groups, 1, head_dim, *trailing), v.reshape(groups, 1, head_dim, *trailing)], dim=1)
        return fused.reshape(-1, *trailing)

    def _mca_to_hf(self, weights):
        (fused,) = weights
        heads, groups, head_dim = _attention_shape(self.mca_config)
        per_group, trailing = heads // groups, fused.shape[1:]
        q, gate, k, v = torch.split(fused.reshape(groups, 2 * per_group + 2, head_dim, *trailing),
                                    [per_group, per_group, 1, 1], dim=1)
        q_and_gate = torch.stack([q, gate], dim=2)  # [groups, per_group, 2, head_dim, ...]
        return [q_and_gate.reshape(-1, *trailing), k.reshape(-1, *trailing), v.reshape(-1, *trailing)]


@dataclass
class ZeroCenteredRMSNormConverOp(ConverOp):
    """An RMSNorm Megatron keeps zero-centered (it applies 1 + w) and HF keeps as w: Megatron = HF - 1.

    Exact both ways for HF weights in [0.5, 2] (Sterbenz: w - 1 is representable there), where trained
    norm gains live; a weight far outside that range loses low bits, which the round trip names.
    """

    def __post_init__(self):
        super().__post_init__()
        if len(self.hf_names) != 1 or len(self.mca_names) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one name per side: {self.hf_names} {self.mca_names}")

    def _hf_to_mca(self, weights):
        return weights[0] - 1

    def _mca_to_hf(self, weights):
        return weights[0] + 1
