"""The self-test: the catalogue's bugs planted in a copy of a spec are each caught; the unmutated spec passes.

Pure parts (mutations, applicability, margins) run in milliseconds; a fast subset of the catalogue runs as
real certifications for qwen2 and llama (the whole catalogue: `make self-test`).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from harness.convert import ConcatConverOp, QKVBiasConverOp, QKVConverOp, StackConverOp
from harness.selftest import catalogue, margin_of
from harness.selftest.mutations import PlainQKVConcat, Transposed, mutate
from harness.spec import load_spec
from harness.spec_plugins import resolve_template, validate_environment

from .conftest import REPO


@pytest.fixture(scope="module")
def templates():
    out = {}
    for model in ("qwen2", "llama"):
        spec = load_spec(REPO / "model_specs" / f"{model}.yaml")
        validate_environment(spec)
        out[model] = resolve_template(spec)
    return out


def _ops(template, suffix):
    return [op for op in template.weight_converters if any(n.endswith(suffix) for n in op.mca_names)]


def test_template_mutations_change_exactly_what_they_say(templates):
    base = templates["qwen2"]
    entries = {m["name"]: m for m in catalogue()[1]}
    mutant, _ = mutate(base, entries["qkv-concat"]["template"])
    assert {type(op) for op in _ops(mutant, "linear_qkv.weight") + _ops(mutant, "linear_qkv.bias")} == {PlainQKVConcat}
    mutant, _ = mutate(base, entries["gate-up-swap"]["template"])
    (fc1,) = _ops(mutant, "linear_fc1.weight")
    assert isinstance(fc1, StackConverOp) and fc1.hf_names == [".mlp.up_proj.weight", ".mlp.gate_proj.weight"]
    mutant, _ = mutate(base, entries["swiglu-split-under-tp"]["template"])
    assert type(_ops(mutant, "linear_fc1.weight")[0]) is ConcatConverOp
    mutant, _ = mutate(base, entries["transposed-o-proj"]["template"])
    assert type(_ops(mutant, "linear_proj.weight")[0]) is Transposed
    mutant, _ = mutate(base, entries["qkv-bias-dropped"]["template"])
    assert not any(isinstance(op, QKVBiasConverOp) for op in mutant.weight_converters)
    mutant, _ = mutate(base, entries["rope-base-unmapped"]["template"])
    assert "rope_parameters" not in mutant.config_hf_to_mca
    mutant, _ = mutate(base, entries["layer-prefix-typo"]["template"])
    assert mutant.hf_layer_prefix == "model.layer."
    # the registered template itself is never touched
    assert type(_ops(base, "linear_qkv.weight")[0]) is QKVConverOp and base.hf_layer_prefix == "model.layers."


def test_a_mutation_for_tensors_the_model_lacks_is_not_applicable(templates):
    entry = next(m for m in catalogue()[1] if m["name"] == "qkv-bias-dropped")
    llama_names = {"model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"}  # no biases
    mutant, why = mutate(templates["llama"], entry["template"], llama_names)
    assert mutant is None and "has no tensor" in why
    mutant, why = mutate(templates["qwen2"], {"kind": "drop_config", "keys": ["no_such_key"]})
    assert mutant is None and "maps none of" in why


def test_qk_norm_and_window_mutations_apply_only_where_the_model_has_them():
    from harness.selftest import _applicable, catalogue as load

    selections, entries = load()
    entries = {m["name"]: m for m in entries}
    expected = {"qwen2": (False, False), "llama": (False, False), "qwen3": (True, True), "mistral": (False, True)}
    for model, (qk, window) in expected.items():
        spec = load_spec(REPO / "model_specs" / f"{model}.yaml")
        validate_environment(spec)
        assert (_applicable(spec, selections["wiring"], entries["qk-norm-swap"]) is None) is qk, model
        assert (_applicable(spec, selections["wiring"], entries["sliding-window-unmapped"]) is None) is window, model
    qwen3 = resolve_template(load_spec(REPO / "model_specs" / "qwen3.yaml"))
    mutant, _ = mutate(qwen3, entries["qk-norm-swap"]["template"])
    assert _ops(mutant, "q_layernorm.weight")[0].hf_names == [".self_attn.k_norm.weight"]
    assert _ops(mutant, "k_layernorm.weight")[0].hf_names == [".self_attn.q_norm.weight"]
    config = {"num_hidden_layers": 2, "sliding_window": 16}
    mutant, _ = mutate(qwen3, entries["sliding-window-unmapped"]["template"])
    assert "window_size" in qwen3.mca_config_kwargs(config)[0]
    assert "window_size" not in mutant.mca_config_kwargs(config)[0]


def test_bug_margin_is_the_largest_broken_bound_ratio():
    row = {"metrics": {"max_abs_logprob": 2.0, "top1_agreement": 0.5},
           "tolerance": {"max_abs_logprob": {"value": 1e-4, "metric": "max_abs_logprob", "upper": True},
                         "min_top1_agreement": {"value": 0.9, "metric": "top1_agreement", "upper": False}}}
    assert margin_of([row]) == pytest.approx(2e4)
    structural = {"metrics": {"counts": {"unmapped": 1}}, "tolerance": {"unmapped": {"value": 0, "metric": "unmapped"}}}
    assert margin_of([structural]) == "structural" and margin_of([]) is None


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
@pytest.mark.parametrize("model, only", [("qwen2", "qkv-concat,rope-base-unmapped"),
                                         ("llama", "gate-up-swap,qkv-bias-dropped")])
def test_fast_subset_is_caught_without_false_alarms(tmp_path, model, only):
    proc = subprocess.run([sys.executable, "-m", "harness", "self-test", "--model", model, "--only", only,
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["mutation"]: r for r in json.loads((tmp_path / "selftest.json").read_text())}
    assert results["(none)"]["status"] == "passed"  # the unmutated spec: no false alarm
    for name in only.split(","):
        r = results[name]
        assert r["status"] in ("caught", "not_applicable"), r
        if r["status"] == "caught":
            assert r["caught_by"] and r["margin"] is not None
    if model == "llama":
        assert results["qkv-bias-dropped"]["status"] == "not_applicable"  # llama has no q/k/v biases
    assert "| mutation | selection | result |" in (tmp_path / "selftest.md").read_text()
