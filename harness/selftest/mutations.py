"""Template mutations: a realistic converter bug applied to a copy of a registered template.

Each kind is data-driven (harness/selftest/catalogue.yaml names the kind and its arguments), works on
any template built from ConverOps, and says when it does not apply (nothing in the template matches),
so the same catalogue serves every model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..convert import ConcatConverOp, ConverOp, StackConverOp, register_template, templates


class PlainQKVConcat(ConverOp):
    """cat([q, k, v]) instead of Megatron's per-KV-group interleave (symmetric: it round-trips)."""

    def _hf_to_mca(self, weights):
        return torch.cat(weights, dim=0)

    def _mca_to_hf(self, weights):
        c = self.mca_config
        q, kv = c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
        return list(torch.split(weights[0], [q, kv, kv], dim=0))


class Transposed(ConverOp):
    """A square projection stored transposed (shapes agree, so only the math notices)."""

    def _hf_to_mca(self, weights):
        return weights[0].t().contiguous()

    def _mca_to_hf(self, weights):
        return weights[0].t().contiguous()


WINDOW_KEYS = ("window_size", "window_attn_skip_freq")


class _WithoutWindows:
    """Mixed in before a template's class: its Megatron config loses the sliding window (ROLL's mistral template)."""

    def convert_hf_to_mca_config_kws(self, hf_config, **kw_args):
        out = super().convert_hf_to_mca_config_kws(hf_config, **kw_args)
        return {k: v for k, v in out.items() if k not in WINDOW_KEYS}


def _matches(op: ConverOp, match: dict[str, Any]) -> bool:
    if "type" in match and type(op).__name__ not in ([match["type"]] if isinstance(match["type"], str)
                                                     else match["type"]):
        return False
    if "mca_suffix" in match and not any(n.endswith(match["mca_suffix"]) for n in op.mca_names):
        return False
    return True


def _replacement(op: ConverOp, kind: str) -> ConverOp:
    if kind == "qkv_concat":
        return PlainQKVConcat(op.hf_names, op.mca_names)
    if kind == "transposed":
        return Transposed(op.hf_names, op.mca_names)
    if kind == "concat":  # Concat instead of Stack: the same at TP1, each TP rank gets whole parts at TP2
        return ConcatConverOp(op.hf_names, op.mca_names, dim=getattr(op, "dim", 0))
    if kind == "reverse_hf_names":  # e.g. [up, gate] for [gate, up]
        swapped = copy.deepcopy(op)
        swapped.hf_names = list(reversed(op.hf_names))
        return swapped
    raise ValueError(f"unknown replacement {kind!r}")


def _live(template, op: ConverOp, hf_names: set[str] | None) -> bool:
    """Whether the op converts a tensor the model really has (a template may carry ops for absent biases)."""
    if hf_names is None:
        return True
    import re

    from ..convert.ops import name_pattern

    layer = re.compile("^" + re.escape(template.hf_layer_prefix) + r"\d+(\..*)$")
    local = {m.group(1) if (m := layer.match(n)) else n for n in hf_names}
    return any(name_pattern(source).match(name) for source in op.hf_names for name in local)


def mutate(template, mutation: dict[str, Any], hf_names: set[str] | None = None, hf_config=None):
    """(mutated copy, None) or (None, why it does not apply to this template and model).

    hf_names / hf_config: the model's tensors and HF config, to say "not applicable" (None: apply blindly)."""
    mutant = copy.deepcopy(template)
    kind = mutation["kind"]
    if kind == "swap_sources":  # two ops read each other's HF tensors (q_norm <-> k_norm)
        pair = [[op for op in mutant.weight_converters if _matches(op, m)] for m in mutation["match"]]
        if len(pair) != 2 or any(len(ops) != 1 for ops in pair):
            return None, f"the template has not exactly one op for each of {mutation['match']}"
        (a,), (b,) = pair
        if not (_live(mutant, a, hf_names) and _live(mutant, b, hf_names)):
            return None, f"the model has no tensors the ops matching {mutation['match']} convert"
        a.hf_names, b.hf_names = b.hf_names, a.hf_names
    elif kind == "drop_windows":
        if hf_config is not None and not set(WINDOW_KEYS) & set(template.mca_config_kwargs(hf_config)[0]):
            return None, "the template sets no sliding window for this model"
        mutant.__class__ = type(f"{type(template).__name__}WithoutWindows", (_WithoutWindows, type(template)), {})
        mutant.constant_mca_config = {k: v for k, v in mutant.constant_mca_config.items() if k not in WINDOW_KEYS}
        mutant.config_hf_to_mca = {k: v for k, v in mutant.config_hf_to_mca.items() if v not in WINDOW_KEYS}
    elif kind in ("replace_op", "drop_op"):
        hits = [i for i, op in enumerate(mutant.weight_converters) if _matches(op, mutation["match"])]
        if not hits:
            return None, f"the template has no op matching {mutation['match']}"
        hits = [i for i in hits if _live(mutant, mutant.weight_converters[i], hf_names)]
        if not hits:
            return None, f"the model has no tensor the ops matching {mutation['match']} convert"
        for i in reversed(hits):
            if kind == "drop_op":
                del mutant.weight_converters[i]
            else:
                mutant.weight_converters[i] = _replacement(mutant.weight_converters[i], mutation["with"])
    elif kind == "drop_config":
        present = [k for k in mutation["keys"] if k in mutant.config_hf_to_mca]
        if not present:
            return None, f"the template maps none of {mutation['keys']}"
        for key in present:
            del mutant.config_hf_to_mca[key]
    elif kind == "layer_prefix":
        mutant.hf_layer_prefix = mutant.hf_layer_prefix.replace(mutation["old"], mutation["new"], 1)
        if mutant.hf_layer_prefix == template.hf_layer_prefix:
            return None, f"the layer prefix {template.hf_layer_prefix!r} has no {mutation['old']!r}"
    else:
        raise ValueError(f"unknown template mutation kind {kind!r}")
    return mutant, None


def register_mutant(base: str, name: str, mutation: dict[str, Any]) -> None:
    """Called by the plugin file self-test writes beside the mutated spec, inside every worker."""
    template = templates[base]
    mutant, why = mutate(template, mutation)
    if mutant is None:
        raise ValueError(f"mutation does not apply to template {base!r}: {why}")
    register_template(name, config_hf_to_mca=mutant.config_hf_to_mca, weight_converters=mutant.weight_converters,
                      hf_layer_prefix=mutant.hf_layer_prefix, hf_invalid_keys=mutant.hf_invalid_keys,
                      constant_mca_config=mutant.constant_mca_config, constant_hf_config=mutant.constant_hf_config,
                      config_mca_to_hf=None, hf_moe_prefix=mutant.hf_moe_prefix, template_class=type(mutant),
                      source=f"self-test mutation of {base}")
