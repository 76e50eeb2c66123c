"""Templates: ROLL-compatible declarations that convert a whole model both ways.

`register_template` has ROLL mcore_adapter's signature. A Converter streams
tensors one at a time (so a CLI can convert without holding the model) and
records which op consumed every tensor, so that unconsumed, doubly consumed
and half-fed tensors are named instead of silently dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .mca_config import McaConfigView
from .ops import ConverOp, StackedTensors, name_pattern, roll_pattern

MCA_LAYER_PREFIX = "decoder.layers."
MCA_MOE_PREFIX = ".mlp.experts.local_experts."  # ROLL convert_utils


@dataclass
class Template:
    hf_model_type: str
    hf_layer_prefix: str
    config_hf_to_mca: dict[str, str]
    weight_converters: list[ConverOp]
    constant_mca_config: dict[str, Any] = field(default_factory=dict)
    constant_hf_config: dict[str, Any] = field(default_factory=dict)
    hf_invalid_keys: list[str] = field(default_factory=list)
    config_mca_to_hf: dict[str, str] | None = None
    hf_moe_prefix: str | None = None
    source: str = ""  # module that registered it, for messages

    def __post_init__(self):
        self.config_hf_to_mca = self.adjust_config_hf_to_mca()
        if self.config_mca_to_hf is None:
            self.config_mca_to_hf = {v: k for k, v in self.config_hf_to_mca.items()}

    def adjust_config_hf_to_mca(self) -> dict[str, str]:
        """Hook kept from ROLL: subclasses rewrite the mapping (e.g. nest keys under text_config)."""
        return self.config_hf_to_mca

    # ---- config ----
    def mca_config_kwargs(self, hf_config) -> tuple[dict[str, Any], list[str]]:
        """The Megatron-side kwargs (through ROLL's convert_hf_to_mca_config_kws hook, which a template_class
        may override) and the HF keys the template asked for but the config lacks."""
        return self.convert_hf_to_mca_config_kws(hf_config), self._read_mapped(hf_config)[1]

    def convert_hf_to_mca_config_kws(self, hf_config, **kw_args) -> dict[str, Any]:
        """ROLL's hook and precedence: kw_args (a subclass's derived values), then mapped keys, then constants."""
        return {**kw_args, **self._read_mapped(hf_config)[0], **self.constant_mca_config}

    def _read_mapped(self, hf_config) -> tuple[dict[str, Any], list[str]]:
        """ROLL semantics: read each mapped HF attribute (dotted paths allowed); absent ones are skipped."""
        kwargs: dict[str, Any] = {}
        absent: list[str] = []
        for hf_key, mca_key in self.config_hf_to_mca.items():
            value, found = hf_config, True
            for part in hf_key.split("."):
                if isinstance(value, dict) and part in value:
                    value = value[part]
                elif not isinstance(value, dict) and hasattr(value, part):
                    value = getattr(value, part)
                else:
                    found = False
                    break
            if found:
                kwargs[mca_key] = value
            else:
                absent.append(hf_key)
        return kwargs, absent

    def mca_config(self, hf_config) -> McaConfigView:
        return McaConfigView(self.mca_config_kwargs(hf_config)[0])

    def hf_config_values(self, mca_config: McaConfigView) -> dict[str, Any]:
        """Reverse direction: HF config values recovered from the Megatron config."""
        values = {}
        for mca_key, hf_key in self.config_mca_to_hf.items():
            if mca_key in mca_config.as_dict():
                values[hf_key] = mca_config.get(mca_key)
        values.update(self.constant_hf_config)
        return values

    # ---- weights ----
    @property
    def dist_config(self):
        """How the Megatron tensors shard (register_dist_config under this model type; else the default)."""
        from .dist_config import get_dist_config

        return get_dist_config(self.hf_model_type)

    def converter(self, mca_config: McaConfigView, to_mca: bool = True) -> "Converter":
        return Converter(self, mca_config, to_mca)

    def hf_to_mca(self, state_dict: dict[str, torch.Tensor], mca_config: McaConfigView):
        return self.converter(mca_config, True).run(state_dict.items())

    def mca_to_hf(self, state_dict: dict[str, torch.Tensor], mca_config: McaConfigView):
        return self.converter(mca_config, False).run(state_dict.items())


@dataclass
class ConversionReport:
    consumed_by: dict[str, str] = field(default_factory=dict)
    unconsumed: dict[str, str] = field(default_factory=dict)
    multiply_consumed: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    duplicate_outputs: list[str] = field(default_factory=list)
    stacked: dict[str, tuple[int, int]] = field(default_factory=dict)  # output name -> (parts, dim)
    # output name -> {"op", "sources"}: which op made it from which tensors (divergence localization names them)
    produced_from: dict[str, dict[str, Any]] = field(default_factory=dict)
    # output name -> why: made from another layer's or another expert's tensors (an id mix-up in the names)
    misplaced: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = [f"{n}: {why}" for n, why in sorted(self.unconsumed.items())]
        out += [f"{n}: consumed by {len(ops)} ops ({'; '.join(ops)})" for n, ops in sorted(self.multiply_consumed.items())]
        out += [f"{n}: produced more than once" for n in sorted(self.duplicate_outputs)]
        out += [f"{n}: {why}" for n, why in sorted(self.misplaced.items())]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "unconsumed": dict(sorted(self.unconsumed.items())),
            "multiply_consumed": dict(sorted(self.multiply_consumed.items())),
            "dropped": sorted(self.dropped),
            "duplicate_outputs": sorted(self.duplicate_outputs),
            "misplaced": dict(sorted(self.misplaced.items())),
            "consumed": len(self.consumed_by),
        }


class Converter:
    """Streams tensors through a template in one direction.

    Names are split as ROLL's convert_utils does: `<layer prefix>L` groups a layer's tensors, and a name
    holding the template's `hf_moe_prefix` (".mlp.experts.") is grouped per expert under
    `<layer prefix>L<moe prefix>E`, so ops match the expert-local rest (".gate_proj.weight"). The
    Megatron side splits at MCA_MOE_PREFIX (ROLL's get_mca_weight_prefix).
    """

    def __init__(self, template: Template, mca_config: McaConfigView, to_mca: bool):
        self.template = template
        self.to_mca = to_mca
        self.report = ConversionReport()
        self._pending: dict[tuple, dict[str, tuple[str, torch.Tensor]]] = {}
        self._ops: dict[int, ConverOp] = {id(op): op for op in template.weight_converters}
        self._emitted: set[str] = set()
        for op in template.weight_converters:
            op.mca_config = mca_config
        # ROLL splits Megatron names at MCA_MOE_PREFIX even without an hf_moe_prefix; here only with one, so a
        # template naming experts by "{}" patterns in layer-local names (no hf_moe_prefix) converts both ways
        hf_moe = template.hf_moe_prefix or None
        src, dst = (template.hf_layer_prefix, hf_moe), (MCA_LAYER_PREFIX, MCA_MOE_PREFIX if hf_moe else None)
        if not to_mca:
            src, dst = dst, src
        (self._src_prefix, self._src_moe), (self._dst_prefix, self._dst_moe) = src, dst
        layer = re.escape(self._src_prefix) + r"\d+"
        self._layer_re = re.compile("^(" + layer + r")(?=\.|$)")
        self._moe_res = []
        if self._src_moe:
            moe = re.escape(self._src_moe)
            # ROLL's get_moe_prefix: per expert, else (fused experts, qwen3_vl_moe) the experts module
            self._moe_res = [re.compile("^(" + layer + moe + r"\d+)(?=\.|$)"), re.compile("^(" + layer + moe + ")")]
        self._invalid = [name_pattern(k) for k in template.hf_invalid_keys] if to_mca else []
        hf_ids = _IdReader(template.hf_layer_prefix, hf_moe or HF_EXPERT_FALLBACK)
        mca_ids = _IdReader(MCA_LAYER_PREFIX, MCA_MOE_PREFIX)
        self._src_ids, self._dst_ids = (hf_ids, mca_ids) if to_mca else (mca_ids, hf_ids)
        # ROLL's get_conver_op: an exact name first, else the first "{}" pattern that re.match-es (a prefix)
        self._exact: dict[str, list[tuple[ConverOp, str]]] = {}
        self._patterns: list[tuple[ConverOp, str, re.Pattern]] = []
        for op in template.weight_converters:
            for source in self._sources(op):
                if "{}" in source:
                    self._patterns.append((op, source, roll_pattern(source)))
                else:
                    self._exact.setdefault(source, []).append((op, source))

    def _split(self, name: str) -> tuple[str, str]:
        """(weight prefix, the rest ops match): ROLL's get_weight_prefix / remove_weight_prefix."""
        if not name.startswith(self._src_prefix):
            return "", name
        if self._src_moe and self._src_moe in name:
            for pattern in self._moe_res:
                m = pattern.match(name)
                if m:
                    return m.group(1), name[m.end():]
        m = self._layer_re.match(name)
        return (m.group(1), name[m.end():]) if m else ("", name)

    def _dst(self, prefix: str) -> str:
        """ROLL's convert_to_mca_prefix / convert_to_hf_prefix."""
        if not prefix:
            return ""
        out = prefix.replace(self._src_prefix, self._dst_prefix, 1)
        if self._src_moe and self._dst_moe:
            out = out.replace(self._src_moe, self._dst_moe, 1)
        return out

    def _sources(self, op: ConverOp) -> list[str]:
        return op.hf_names if self.to_mca else op.mca_names

    def _targets(self, op: ConverOp) -> list[str]:
        return op.mca_names if self.to_mca else op.hf_names

    def _matches(self, local: str) -> list[tuple[ConverOp, str, tuple]]:
        """Every op that claims `local`, the one ROLL would convert it with first.

        ROLL keeps one op per exact name (the last registered); an exact name wins over patterns, which
        are tried in declaration order. More than one claimant is reported (multiply consumed) either way.
        """
        exact = self._exact.get(local)
        if exact:
            chosen = exact[-1]
            return [(chosen[0], chosen[1], ())] + [(op, s, ()) for op, s in exact if (op, s) != chosen]
        out = []
        for op, source, pattern in self._patterns:
            m = pattern.match(local)
            if m and not any(o is op for o, _, _ in out):
                out.append((op, source, m.groups()))
        return out

    def add(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feed one tensor; returns the tensors completed by it (often none)."""
        prefix, local = self._split(name)
        if any(p.match(local) for p in self._invalid):
            self.report.dropped.append(name)
            return {}
        matches = self._matches(local)
        if not matches:
            side = "HF" if self.to_mca else "Megatron"
            self.report.unconsumed[name] = f"no converter op takes this {side} tensor"
            return {}
        if len(matches) > 1:
            order = {id(op): i for i, op in enumerate(self.template.weight_converters)}
            self.report.multiply_consumed[name] = [op.describe() for op, _, _ in
                                                   sorted(matches, key=lambda m: order[id(m[0])])]
        op, source, captures = matches[0]
        self.report.consumed_by[name] = op.describe()
        key = (prefix, id(op), captures)
        group = self._pending.setdefault(key, {})
        if source in group:
            self.report.multiply_consumed.setdefault(name, []).append(f"{op.describe()} received it twice")
        group[source] = (name, tensor)
        if len(group) < len(self._sources(op)):
            return {}
        del self._pending[key]
        weights = [group[s][1] for s in self._sources(op)]
        out = op._hf_to_mca(weights) if self.to_mca else op._mca_to_hf(weights)
        outputs = out if isinstance(out, (list, tuple)) else [out]
        targets = self._targets(op)
        if len(outputs) != len(targets):
            raise ValueError(f"{op.describe()} returned {len(outputs)} tensors for {len(targets)} names")
        dst_prefix = self._dst(prefix)
        produced = {}
        for target, tensor_out in zip(targets, outputs):
            out_name = dst_prefix + _fill(target, captures)
            if isinstance(tensor_out, StackedTensors):
                self.report.stacked[out_name] = (len(tensor_out.tensors), tensor_out.dim)
                tensor_out = tensor_out.materialize()
            if out_name in self._emitted or out_name in produced:
                self.report.duplicate_outputs.append(out_name)
            produced[out_name] = tensor_out
            sources = [group[s][0] for s in self._sources(op)]
            self.report.produced_from[out_name] = {"op": op.describe(), "sources": sources}
            why = self._misplaced(out_name, sources)
            if why:
                self.report.misplaced[out_name] = why
        self._emitted.update(produced)
        return produced

    def _misplaced(self, out_name: str, sources: list[str]) -> str:
        """A layer or expert id the output does not share with its sources (ops never move tensors across
        layers or experts; a hand-enumerated template's copy-paste slip does)."""
        out_ids = self._dst_ids.read(out_name)
        for what, index in (("layer", 0), ("expert", 1)):
            if out_ids[index] is None:
                continue
            for source in sources:
                source_id = self._src_ids.read(source)[index]
                if source_id is not None and source_id != out_ids[index]:
                    return f"{what} {out_ids[index]} made from {what} {source_id}'s {source} ({self.template.hf_model_type})"
        return ""

    def finish(self) -> ConversionReport:
        for (prefix, op_id, _), group in self._pending.items():
            op = self._ops[op_id]
            missing = [s for s in self._sources(op) if s not in group]
            for name, _ in group.values():
                self.report.unconsumed[name] = f"{op.describe()} never received {', '.join(missing)}"
        self._pending.clear()
        return self.report

    def run(self, items: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in items:
            out.update(self.add(name, tensor))
        return out, self.finish()


# HF names an expert ".experts.E." (mixtral's block_sparse_moe.experts, qwen's mlp.experts, deepseek's): where a
# template declares no hf_moe_prefix, that is where the misplaced check reads an HF tensor's expert id
HF_EXPERT_FALLBACK = ".experts."


class _IdReader:
    """(layer id, expert id) in a full name, None where the name has none."""

    def __init__(self, layer_prefix: str, moe_prefix: str):
        self._layer = re.compile("^" + re.escape(layer_prefix) + r"(\d+)(?=\.|$)")
        self._expert = re.compile("^" + re.escape(layer_prefix) + r"\d+.*?" + re.escape(moe_prefix) + r"(\d+)(?=\.|$)")

    def read(self, name: str) -> tuple[int | None, int | None]:
        layer, expert = self._layer.match(name), self._expert.match(name)
        return (int(layer.group(1)) if layer else None, int(expert.group(1)) if expert else None)


def _fill(name: str, captures: tuple) -> str:
    for value in captures:
        name = name.replace("{}", value, 1)
    return name


# ---- registry (ROLL's module-level `templates` dict) ----
templates: dict[str, Template] = {}


def register_template(
    hf_model_type,
    config_hf_to_mca,
    weight_converters,
    hf_layer_prefix,
    hf_invalid_keys=[],  # noqa: B006 - ROLL's signature, never mutated
    template_class=Template,
    constant_mca_config={},  # noqa: B006
    constant_hf_config={},  # noqa: B006
    **kwargs,
):
    import sys

    caller = sys._getframe(1).f_code.co_filename  # inspect.stack() would read every frame's source: ~0.3 s
    kwargs.setdefault("source", caller)
    templates[hf_model_type] = template_class(
        hf_model_type=hf_model_type,
        hf_layer_prefix=hf_layer_prefix,
        hf_invalid_keys=list(hf_invalid_keys),
        config_hf_to_mca=dict(config_hf_to_mca),
        constant_mca_config=dict(constant_mca_config),
        constant_hf_config=dict(constant_hf_config),
        weight_converters=list(weight_converters),
        **kwargs,
    )
    return templates[hf_model_type]


def get_template(name: str) -> Template:
    if name not in templates:
        raise KeyError(f"no template {name!r} registered (known: {', '.join(sorted(templates)) or 'none'})")
    return templates[name]
