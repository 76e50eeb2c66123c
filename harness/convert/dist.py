"""Distributed layout of a converted Megatron-core state dict: tensor-parallel shards, pipeline stages, experts.

How each tensor splits over TP ranks is the template's declaration (dist_config.py, ROLL's
DistParallelConfig; a template without one gets `default_dist_config`):
  column-parallel, split dim 0: linear_qkv (whole KV groups per rank, because the fused layout is per
      group), linear_fc1 (a stacked [gate; up] is split *per part*, so each rank holds [gate_r; up_r]),
      word embeddings and output layer (vocab-parallel)
  row-parallel, split dim 1: linear_proj, linear_fc2 weights
  duplicated on every TP rank: norms, row-parallel biases, the router, the shared-expert gate.
Pipeline stage s holds layers [s*L/pp, (s+1)*L/pp), renumbered from 0; the embedding lives on
the first stage, the final norm and output layer on the last (with tied embeddings and pp > 1
the last stage keeps its own copy of the embedding as output_layer.weight, as Megatron does).
Experts (`decoder.layers.L.mlp.experts.local_experts.E...`, global E in whole-model dicts): EP rank e
holds global experts [e*E/ep, (e+1)*E/ep) as local ids 0..E/ep-1 (ROLL: `E // (E/ep) == ep_rank`). Their
tensor-parallel size (`expert_tp`) is TP when ep is 1 -- megatron-core's default, and the only one it trains:
with ep 1 it reduces expert gradients as dense parameters, over the dense data-parallel group, so experts
replicated over TP ranks that each saw a sequence shard would keep partial gradients -- and 1 when ep > 1
(experts whole on every TP rank). TP-split experts split by their declared kind, like a dense MLP.

Shards are keyed (pp, tp, ep); a rank's file tag is `rank_tag(...)`. Every (pp, tp, ep) combination is
written (each holds its TP shard of the dense weights and its EP rank's experts), and gather accepts
whichever rank files exist: megatron's ranks at world size pp*lcm(tp, ep) hold only the pairs
t = r % tp, e = r % ep.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dist_config import MCORE_WORD_EMBEDDING, DistParallelConfig, UndeclaredTensorError, default_dist_config
from .layer_spec import to_local

LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)(\..*)$")
EXPERT_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_EXPERT_SUFFIX_RE = re.compile(r"^(\.mlp\.experts\.local_experts\.)\d+(\..*)$")

__all__ = ["EXPERT_RE", "LAYER_RE", "GatherError", "Layout", "UndeclaredTensorError", "expert_owner", "gather",
           "expert_tp", "gather_as", "global_expert_id", "layout_for", "load_rank_shards", "pure_name", "rank_tag", "shard",
           "split_dim", "stacked_suffixes", "stage_of"]


class GatherError(ValueError):
    """Rank files that do not make one model: every problem names its tensor (or the missing rank)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__("; ".join(problems[:3]) + more)


def expert_tp(tp: int, ep: int) -> int:
    """expert_tensor_parallel_size for a (tp, ep) layout (see the module docstring)."""
    return tp if ep == 1 else 1


def rank_tag(pp_rank: int, tp_rank: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """A rank's shard-file tag: pp{p}_tp{t}, with _ep{e} when the layout has expert parallelism."""
    return f"pp{pp_rank}_tp{tp_rank}" + (f"_ep{ep_rank}" if ep_size > 1 else "")


@dataclass
class Layout:
    tp: int
    pp: int
    num_layers: int
    tied: bool = False
    stacked: dict[str, int] = field(default_factory=dict)  # local name without layer index -> parts
    ep: int = 1
    num_experts: int | None = None
    dist_config: DistParallelConfig = field(default_factory=lambda: default_dist_config, repr=False)

    def __post_init__(self):
        if self.num_layers % self.pp:
            raise ValueError(f"num_layers {self.num_layers} is not divisible by pipeline size {self.pp}")
        if self.ep < 1:
            raise ValueError(f"expert-parallel size {self.ep} must be at least 1")
        if self.ep > 1 and (not isinstance(self.num_experts, int) or self.num_experts % self.ep):
            raise ValueError(f"num_moe_experts {self.num_experts} is not divisible by expert-parallel size {self.ep}")

    @property
    def etp(self) -> int:
        return expert_tp(self.tp, self.ep)

    @property
    def per_stage(self) -> int:
        return self.num_layers // self.pp

    @property
    def experts_per_rank(self) -> int | None:
        return self.num_experts // self.ep if self.num_experts else None

    @property
    def world_size(self) -> int:
        return self.pp * math.lcm(self.tp, self.ep)

    def keys(self) -> list[tuple[int, int, int]]:
        """Every (pp, tp, ep) combination, in file order."""
        return [(p, t, e) for p in range(self.pp) for t in range(self.tp) for e in range(self.ep)]

    def tag(self, key: tuple[int, int, int]) -> str:
        return rank_tag(*key, ep_size=self.ep)

    def rank_coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, tp, ep) of a global rank in megatron-core's default order tp-cp-ep-dp-pp (expert TP is 1 when ep > 1)."""
        per_stage = math.lcm(self.tp, self.ep)
        return rank // per_stage, rank % self.tp, rank % self.ep

    def parts(self, name: str) -> int:
        return self.stacked.get(_suffix(to_local(name)), 1)


def _suffix(local: str) -> str:
    """Layer-local suffix of a name, an expert's id replaced by {} (its parts do not depend on the expert)."""
    m = LAYER_RE.match(local)
    if not m:
        return local
    return _EXPERT_SUFFIX_RE.sub(r"\1{}\2", m.group(2))


def layout_for(view, forward_report, tp: int, pp: int, ep: int = 1,
               dist_config: DistParallelConfig | None = None) -> "Layout":
    """The layout of a state dict the template converted (hf_to_mca) under McaConfigView `view`."""
    experts = view.get("num_moe_experts")
    return Layout(tp, pp, int(view.num_layers), bool(view.get("tie_embeddings_and_output_weights")),
                  stacked_suffixes(forward_report.stacked), ep, int(experts) if experts else None,
                  dist_config or default_dist_config)


def stacked_suffixes(stacked: dict[str, tuple[int, int]]) -> dict[str, int]:
    """ConversionReport.stacked (full names) -> {layer-local suffix: parts}."""
    return {_suffix(to_local(name)): parts for name, (parts, _dim) in stacked.items()}


def pure_name(name: str) -> str:
    """ROLL's remove_mca_weight_prefix: the part after decoder.layers.L (an expert's: after its expert id)."""
    m = EXPERT_RE.match(name)
    if m:
        return m.group(3)
    m = LAYER_RE.match(name)
    return m.group(2) if m else name


def split_dim(name: str, config: DistParallelConfig = default_dist_config, etp: int = 1) -> int | None:
    """0 for column-parallel, 1 for row-parallel, None for duplicated tensors (and experts when expert TP is 1).
    UndeclaredTensorError when the dist config does not cover the tensor."""
    spellings = list(dict.fromkeys([pure_name(name), pure_name(to_local(name))]))
    dim = config.split_dim(spellings, name)
    return None if etp == 1 and EXPERT_RE.match(to_local(name)) else dim


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
    if local == MCORE_WORD_EMBEDDING or layout.dist_config.first_stage_only(local):  # megatron's pre_process
        out = [(0, local)]
        if local == MCORE_WORD_EMBEDDING and layout.tied and layout.pp > 1:
            out.append((layout.pp - 1, "output_layer.weight"))
        return out
    return [(layout.pp - 1, local)]  # final norm, output layer


def expert_owner(global_id: int, layout: Layout, name: str = "") -> tuple[int, int]:
    """(ep rank, local id) holding a global expert."""
    if layout.ep == 1:
        return 0, global_id
    if global_id >= layout.num_experts:
        raise ValueError(f"{name}: expert {global_id} but the model has {layout.num_experts} experts")
    return divmod(global_id, layout.experts_per_rank)


def global_expert_id(local_id: int, ep_rank: int, layout: Layout) -> int:
    """The global id of an EP rank's local expert."""
    return ep_rank * layout.experts_per_rank + local_id if layout.ep > 1 else local_id


def _with_expert(name: str, expert_id: int) -> str:
    m = EXPERT_RE.match(name)
    return f"{m.group(1)}{expert_id}{m.group(3)}"


def shard(state: dict[str, torch.Tensor], layout: Layout) -> dict[tuple[int, int, int], dict[str, torch.Tensor]]:
    """Whole Megatron state dict -> {(pp_rank, tp_rank, ep_rank): local-spec state dict}."""
    out = {key: {} for key in layout.keys()}
    for name, tensor in state.items():
        dim = split_dim(name, layout.dist_config, layout.etp)
        pieces = _tp_split(tensor, dim, layout.tp, layout.parts(name), name)
        expert = EXPERT_RE.match(to_local(name))
        if expert:
            ep_rank, local_id = expert_owner(int(expert.group(2)), layout, name)
            for stage, local in stage_of(name, layout):
                for t, piece in enumerate(pieces):
                    out[(stage, t, ep_rank)][_with_expert(local, local_id)] = piece.contiguous()
            continue
        for stage, local in stage_of(name, layout):
            for t, piece in enumerate(pieces):
                piece = piece.contiguous()
                for e in range(layout.ep):
                    out[(stage, t, e)][local] = piece
    return out


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not (a.is_meta or b.is_meta) and not torch.equal(a, b)


def gather(shards: dict[tuple[int, int, int], dict[str, torch.Tensor]], layout: Layout,
           complete_experts: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of shard, from whichever rank files exist: local-spec names, layers renumbered globally, local
    expert ids renumbered to global. Checks every TP and EP rank is represented, duplicated tensors agree,
    no two EP ranks give the same expert and every expert arrives; a GatherError names what does not."""
    whole: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    expert_from: dict[str, int] = {}
    for stage in range(layout.pp):
        keys = sorted(k for k in shards if k[0] == stage)
        tps, eps = {k[1] for k in keys}, {k[2] for k in keys}
        absent = [f"tp rank {t}" for t in range(layout.tp) if t not in tps]
        absent += [f"ep rank {e}" for e in range(layout.ep) if e not in eps]
        if absent:
            problems.append(f"pipeline stage {stage}: no rank file for {', '.join(absent)}")
            continue
        for local in dict.fromkeys(n for k in keys for n in shards[k]):
            m = LAYER_RE.match(local)
            name = f"decoder.layers.{int(m.group(1)) + stage * layout.per_stage}{m.group(2)}" if m else local
            if layout.tied and layout.pp > 1 and stage == layout.pp - 1 and local == "output_layer.weight":
                continue  # Megatron's copy of the tied embedding
            held = [(k, shards[k][local]) for k in keys if local in shards[k]]
            if EXPERT_RE.match(name):
                _gather_expert(name, held, layout, whole, expert_from, problems)
            else:
                _gather_dense(name, held, layout, whole, problems)
    if complete_experts:
        problems += _missing_experts(expert_from, layout)
    if problems:
        raise GatherError(problems)
    return whole


def _tp_ranks_missing(name: str, present, layout, problems: list[str]) -> bool:
    """Whether some TP rank gave no piece of `name` (named in problems): nothing can be joined then."""
    missing = [t for t in range(layout.tp) if t not in present]
    if missing:
        problems.append(f"{name}: missing from tp rank(s) {', '.join(map(str, missing))}")
    return bool(missing)


def _gather_expert(name, held, layout, whole, expert_from, problems) -> None:
    local_id = int(EXPERT_RE.match(name).group(2))
    for e in sorted({k[2] for k, _ in held}):
        copies = [(k, t) for k, t in held if k[2] == e]
        global_name = _with_expert(name, global_expert_id(local_id, e, layout))
        if layout.etp > 1:  # TP-split experts: one piece per TP rank, joined like a dense tensor
            by_tp = {k[1]: t for k, t in copies}
            if _tp_ranks_missing(global_name, by_tp, layout, problems):
                continue
            joined = _tp_join([by_tp[t] for t in range(layout.tp)], split_dim(name, layout.dist_config, layout.etp),
                              layout.parts(name))
            copies = [(copies[0][0], joined)]
        for k, tensor in copies[1:]:
            if _differs(tensor, copies[0][1]):
                problems.append(f"{name}: ep rank {e}'s copy differs between tp ranks {copies[0][0][1]} and {k[1]}")
        if global_name in expert_from:
            problems.append(f"{global_name}: given by ep ranks {expert_from[global_name]} and {e} "
                            f"(expert ids collide: local ids not renumbered to global?)")
            continue
        expert_from[global_name] = e
        whole[global_name] = copies[0][1]


def _gather_dense(name, held, layout, whole, problems) -> None:
    by_tp: dict[int, list] = {}
    for k, tensor in held:
        by_tp.setdefault(k[1], []).append((k, tensor))
    if _tp_ranks_missing(name, by_tp, layout, problems):
        return
    for t, copies in by_tp.items():
        for k, tensor in copies[1:]:
            if _differs(tensor, copies[0][1]):
                problems.append(f"{name}: tp rank {t}'s copy differs between ep ranks {copies[0][0][2]} and {k[2]}")
    pieces = [by_tp[t][0][1] for t in range(layout.tp)]
    dim = split_dim(name, layout.dist_config, layout.etp)
    if dim is None:
        for t, piece in enumerate(pieces[1:], start=1):
            if _differs(piece, pieces[0]):
                problems.append(f"{name}: duplicated tensor differs between tp ranks 0 and {t}")
    whole[name] = _tp_join(pieces, dim, layout.parts(name))


def _missing_experts(expert_from: dict[str, int], layout: Layout) -> list[str]:
    """Per MoE layer and expert weight: the global experts no rank gave."""
    if not layout.num_experts or not expert_from:
        return []
    seen: dict[tuple[str, str], set[int]] = {}
    for name in expert_from:
        m = EXPERT_RE.match(name)
        seen.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    return [f"{prefix}{e}{rest}: no ep rank gave this expert" for (prefix, rest), ids in sorted(seen.items())
            for e in range(layout.num_experts) if e not in ids]


def gather_as(shards: dict[tuple[int, int, int], dict[str, torch.Tensor]], layout: Layout,
              spelled_like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gather, with names spelled as in `spelled_like` (the template's own output may use TE names)."""
    spelling = {to_local(name): name for name in spelled_like}
    return {spelling.get(name, name): tensor for name, tensor in gather(shards, layout).items()}


def load_rank_shards(directory: str | Path, stem: str, layout: Layout) -> dict[tuple[int, int, int], dict[str, torch.Tensor]]:
    """The rank files `{directory}/{stem}{rank_tag}.safetensors` that exist (each rank saves its own), by key."""
    from safetensors.torch import load_file

    paths = {key: Path(directory) / f"{stem}{layout.tag(key)}.safetensors" for key in layout.keys()}
    return {key: load_file(path) for key, path in paths.items() if path.is_file()}
