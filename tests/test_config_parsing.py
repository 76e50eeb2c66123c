"""Config parsing: the pure judge on hand-built inputs, then negative controls through the real Megatron worker.

The negative controls are copies of the built-in qwen2 template with one bug each, registered under their own
name and selected by the spec's converter.template, the way a user ports a template. Each must fail naming the
HF key it breaks; a spec waiver must turn an unmapped key into waived/passed.
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from harness.checks.config_parsing import judge, measure
from harness.spec import load_spec

from .conftest import REPO, base_spec

# ---------------------------------------------------------------- pure: hand-built inputs

# the built-in template's own mapping, so these pure tests judge what the harness ships
import harness.templates.qwen2  # noqa: E402,F401 - registers "qwen2"
from harness.convert import templates  # noqa: E402

QWEN2_MAPPING = dict(templates["qwen2"].config_hf_to_mca)
HF_CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "transformers_version": "5.0.0",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "layer_types": ["full_attention", "full_attention"],
    "initializer_range": 0.1,
}
CONSTANTS = {"swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope", "rotary_percent": 1.0,
             "add_bias_linear": False, "add_qkv_bias": True, "hidden_dropout": 0.0}
BUILT = {
    "tc": {"hidden_size": 128, "ffn_hidden_size": 256, "num_layers": 2, "num_attention_heads": 4,
           "num_query_groups": 2, "kv_channels": 32, "normalization": "RMSNorm", "layernorm_epsilon": 1e-6,
           "activation_func": "silu", "gated_linear_unit": True, "attention_dropout": 0.0, "hidden_dropout": 0.0,
           "add_qkv_bias": True, "add_bias_linear": False, "window_size": None, "window_attn_skip_freq": None},
    "gpt": {"vocab_size": 512, "max_sequence_length": 512, "position_embedding_type": "rope", "rotary_percent": 1.0,
            "rotary_base": 1000000.0, "rope_scaling": False, "rope_scaling_factor": 8.0,
            "share_embeddings_and_output_weights": False},
    "unknown_keys": [],
}


def _kwargs(hf: dict, mapping: dict) -> dict:
    """What Template.mca_config_kwargs would hand over for this config and mapping."""
    return {**{mca: hf[key] for key, mca in mapping.items() if key in hf}, **CONSTANTS}


def _measure(hf=None, mapping=None, built=None, absent=()) -> dict:
    hf = copy.deepcopy(HF_CONFIG if hf is None else hf)
    mapping = dict(QWEN2_MAPPING if mapping is None else mapping)
    built = copy.deepcopy(BUILT if built is None else built)
    return measure(hf, _kwargs(hf, mapping), list(absent), mapping, built)


def _without(mapping: dict, key: str) -> dict:
    assert key in mapping
    return {k: v for k, v in mapping.items() if k != key}


def test_faithful_template_passes_with_every_key_mapped():
    m = _measure()
    verdict = judge(m, {}, "qwen2")
    assert verdict.status == "passed", verdict.reason
    for key in QWEN2_MAPPING:
        assert m["keys"][key]["state"] == "mapped", (key, m["keys"][key])
    assert m["keys"]["hidden_act"]["state"] == "mapped"  # through swiglu
    assert m["keys"]["transformers_version"]["state"] == "ignored"
    assert verdict.metrics["counts"]["mapped"] == len(QWEN2_MAPPING) + 1
    assert verdict.tolerance == {"unmapped": 0, "mismatch": 0}


def test_key_without_rule_or_mapping_is_unmapped_and_named():
    hf = {**HF_CONFIG, "fancy_new_knob": 3}
    m = _measure(hf)
    assert m["keys"]["fancy_new_knob"] == {"hf": 3, "state": "unmapped"}
    verdict = judge(m, {}, "qwen2")
    assert verdict.status == "failed"
    assert "fancy_new_knob is not mapped" in verdict.reason


def test_unmapped_key_fails_even_when_the_backend_default_coincides():
    built = copy.deepcopy(BUILT)
    m = _measure(mapping=_without(QWEN2_MAPPING, "attention_dropout"), built=built)  # backend also says 0.0
    assert m["keys"]["attention_dropout"]["state"] == "unmapped"
    verdict = judge(m, {}, "qwen2")
    assert verdict.status == "failed" and "attention_dropout is not mapped" in verdict.reason


def test_mapped_key_with_a_different_backend_value_is_a_mismatch():
    built = copy.deepcopy(BUILT)
    built["tc"]["layernorm_epsilon"] = 1e-5
    verdict = judge(_measure(built=built), {}, "qwen2")
    assert verdict.status == "failed"
    assert "rms_norm_eps: hf=['RMSNorm', 1e-06] but backend=['RMSNorm', 1e-05]" in verdict.reason


def test_waived_key_passes_with_state_waived_and_the_reason():
    hf = {**HF_CONFIG, "fancy_new_knob": 3}
    m = _measure(hf)
    why = "only read by the tokenizer"
    verdict = judge(m, {"fancy_new_knob": why, "hidden_size": "not needed"}, "qwen2")
    assert verdict.status == "passed", verdict.reason
    row = verdict.metrics["keys"]["fancy_new_knob"]
    assert row["state"] == "waived" and row["why"] == why
    assert verdict.metrics["counts"]["waived"] == 1
    assert verdict.metrics["keys"]["hidden_size"]["state"] == "mapped"  # a waiver never downgrades a mapped key


def test_waiver_does_not_hide_other_problems():
    built = copy.deepcopy(BUILT)
    built["unknown_keys"] = ["hiden_size"]
    verdict = judge(_measure({**HF_CONFIG, "fancy_new_knob": 3}, built=built), {"fancy_new_knob": "tokenizer"}, "qwen2")
    assert verdict.status == "failed" and "hiden_size" in verdict.reason and "fancy_new_knob" not in verdict.reason


def test_head_dim_derived_by_the_backend_passes():
    m = _measure({**HF_CONFIG, "head_dim": 32})  # not mapped; Megatron derives kv_channels = 128 / 4
    assert m["keys"]["head_dim"]["state"] == "derived"
    assert judge(m, {}, "qwen2").status == "passed"


def test_head_dim_the_backend_cannot_derive_fails():
    m = _measure({**HF_CONFIG, "head_dim": 64})  # explicit head_dim != hidden/heads, and nothing maps it
    assert m["keys"]["head_dim"]["state"] == "mismatch"
    verdict = judge(m, {}, "qwen2")
    assert verdict.status == "failed" and "head_dim: hf=64 but backend=32" in verdict.reason


def test_inactive_sliding_window_keys_pass():
    m = _measure()
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
        assert m["keys"][key]["state"] == "inactive", key
    assert judge(m, {}, "qwen2").status == "passed"


def test_active_sliding_window_without_mapping_fails():
    # what Qwen2Config derives for use_sliding_window with max_window_layers 0: every layer windowed
    hf = {**HF_CONFIG, "use_sliding_window": True, "max_window_layers": 0,
          "layer_types": ["sliding_attention", "sliding_attention"]}
    verdict = judge(_measure(hf), {}, "qwen2")
    assert verdict.status == "failed"
    assert "sliding_window" in verdict.reason and "use_sliding_window" in verdict.reason


def test_use_sliding_window_without_windowed_layers_is_inactive():
    # max_window_layers (28) >= the 2 layers: HF's model windows no layer, whatever use_sliding_window says
    m = _measure({**HF_CONFIG, "use_sliding_window": True})
    assert m["keys"]["sliding_window"]["state"] == "inactive"
    assert judge(m, {}, "qwen2").status == "passed"


def test_key_the_backend_does_not_read_fails():
    built = copy.deepcopy(BUILT)
    built["unknown_keys"] = ["hiden_size"]
    verdict = judge(_measure(built=built), {}, "qwen2")
    assert verdict.status == "failed"
    assert "template sets 'hiden_size', which the backend does not read" in verdict.reason


def test_model_type_mismatch_fails():
    verdict = judge(_measure(), {}, "llama")
    assert verdict.status == "failed"
    assert "config model_type 'qwen2' != template hf_model_type 'llama'" in verdict.reason


def test_rope_theta_read_from_an_absent_attribute_fails_on_rope_parameters():
    mapping = {**_without(QWEN2_MAPPING, "rope_parameters"), "rope_theta": "rotary_base"}
    built = copy.deepcopy(BUILT)
    built["gpt"]["rotary_base"] = 10000  # GPTModel's default: the template never set it
    m = _measure(mapping=mapping, built=built, absent=["rope_theta"])
    assert m["template_reads_absent_keys"] == ["rope_theta"]
    verdict = judge(m, {}, "qwen2")
    assert verdict.status == "failed" and "rope_parameters" in verdict.reason


def test_measure_is_json_serialisable():
    json.dumps(_measure({**HF_CONFIG, "hidden_act": type("silu", (), {})}))


# ---------------------------------------------------------------- negative controls through the Megatron worker

QWEN2_TEMPLATE = (REPO / "harness" / "templates" / "qwen2.py").read_text()


def _bugged_template(name: str, *edits: tuple[str, str]) -> str:
    text = QWEN2_TEMPLATE.replace('register_template(\n    "qwen2",', f'register_template(\n    "{name}",', 1)
    assert f'"{name}"' in text, "harness/templates/qwen2.py changed shape; update the test's edits"
    for old, new in edits:
        assert text.count(old) == 1, f"harness/templates/qwen2.py no longer contains {old!r} once"
        text = text.replace(old, new)
    return text


def _drop(key: str, target: str) -> tuple[str, str]:
    return f'        "{key}": "{target}",\n', ""


# case -> (template name, edits, spec changes)
CASES = {
    "bad-rope": ("qwen2-bad-rope",
                 [('        "rope_parameters": "rope_parameters",\n', '        "rope_theta": "rotary_base",\n')], {}),
    "no-rms-eps": ("qwen2-no-rms-eps", [_drop("rms_norm_eps", "layernorm_epsilon")], {}),
    "no-kv-heads": ("qwen2-no-kv-heads", [_drop("num_key_value_heads", "num_query_groups")], {}),
    "no-tie": ("qwen2-no-tie", [_drop("tie_word_embeddings", "tie_embeddings_and_output_weights")],
               {"tie_word_embeddings": True}),
    "typo-key": ("qwen2-typo-key", [('"hidden_size": "hidden_size"', '"hidden_size": "hiden_size"')], {}),
    "waived": ("qwen2-no-dropout", [_drop("attention_dropout", "attention_dropout")], {}),
}
WAIVER = "dropout is set by the training recipe, not by the HF config"


def _write_case(folder: Path, case: str) -> Path:
    template, edits, ref_changes = CASES[case]
    folder.mkdir(parents=True)
    (folder / "bugged_template.py").write_text(_bugged_template(template, *edits))
    spec = base_spec(f"cfg-{case}", plugins=["bugged_template.py"], converter={"template": template},
                     backends={"train": ["megatron"], "infer": ["hf"]}, dtypes=["float32"])
    spec["reference"]["config"].update(ref_changes)
    if case == "waived":
        spec["config_waivers"] = {"attention_dropout": WAIVER}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _measure_through_workers(root: Path) -> dict[str, dict]:
    """case -> {"spec": path, "measurement": ...}, from one HF worker (references) and one Megatron worker.

    The Megatron worker's spec loads every case's plugin; the config op is asked for each case's template by name,
    except for the case its own spec selects with converter.template, which goes the suite's way (no name).
    """
    from harness.workers import Worker

    paths = {case: _write_case(root / case, case) for case in CASES}
    specs = {case: load_spec(path) for case, path in paths.items()}
    by_spec = "bad-rope"
    rig = base_spec("cfg-rig", plugins=[str(paths[case].parent / "bugged_template.py") for case in CASES],
                    converter={"template": CASES[by_spec][0]}, backends={"train": ["megatron"], "infer": ["hf"]})
    rig_path = root / "rig.yaml"
    rig_path.write_text(yaml.safe_dump(rig, sort_keys=False))

    def reference_dirs() -> dict[str, str]:
        hf = Worker("hf", str(rig_path))
        try:
            out, made = {}, {}
            for case, spec in specs.items():
                ref = spec.reference
                key = json.dumps([spec.hf_model_type, ref.config, ref.seed], sort_keys=True)
                if key not in made:
                    made[key] = hf.call("materialize", {"model_type": spec.hf_model_type, "overrides": ref.config,
                                                        "seed": ref.seed, "dtype": "float32", "path": None},
                                        timeout=300)["dir"]
                out[case] = made[key]
            return out
        finally:
            hf.close()

    with ThreadPoolExecutor(max_workers=2) as pool:  # the two workers start side by side
        refs = pool.submit(reference_dirs)
        megatron = pool.submit(Worker, "megatron", str(rig_path)).result()
        try:
            return {case: {"spec": str(paths[case]),
                           "measurement": megatron.call("config", {
                               "dir": refs.result()[case],
                               "template": None if case == by_spec else specs[case].converter.template,
                           }, timeout=300)}
                    for case in CASES}
        finally:
            megatron.close()


@pytest.fixture(scope="module")
def megatron_config(tmp_path_factory):
    """case -> (spec, measurement). Measured once per run: under pytest-xdist the first worker to get here measures
    and the others read its results, instead of each starting backend workers again."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # parent: this run's, shared by workers
    results = shared / "config-controls.json"
    with open(shared / "config-controls.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not results.is_file():
            root = shared / "config-controls"
            shutil.rmtree(root, ignore_errors=True)  # a run that died half way
            data = _measure_through_workers(root)
            tmp = results.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(results)
        data = json.loads(results.read_text())
    return {case: (load_spec(row["spec"]), row["measurement"]) for case, row in data.items()}


def _judged(megatron_config, case: str):
    spec, measurement = megatron_config[case]
    # the config suite's judgement: waivers from the spec, model type the spec declares
    return judge(copy.deepcopy(measurement), spec.config_waivers, spec.hf_model_type), measurement


@pytest.mark.parametrize("case, key", [
    ("bad-rope", "rope_parameters"),
    ("no-rms-eps", "rms_norm_eps"),
    ("no-kv-heads", "num_key_value_heads"),
    ("no-tie", "tie_word_embeddings"),
])
def test_bugged_template_fails_naming_the_key(megatron_config, case, key):
    verdict, measurement = _judged(megatron_config, case)
    assert verdict.status == "failed"
    assert key in verdict.reason, verdict.reason
    # the reference differs from Megatron's default for each of these keys on purpose, so the unmapped key shows
    # as a mismatch with both values (the pure tests above cover a coinciding default: "unmapped")
    assert measurement["keys"][key]["state"] == "mismatch", measurement["keys"][key]
    # nothing else is wrong: the bug is the only reason
    others = {k: r["state"] for k, r in measurement["keys"].items()
              if k != key and r["state"] in ("unmapped", "mismatch")}
    assert others == {}, others
    assert measurement["unknown_backend_keys"] == []


def test_bad_rope_template_reads_an_attribute_transformers_5_lacks(megatron_config):
    _, measurement = _judged(megatron_config, "bad-rope")
    assert measurement["template_reads_absent_keys"] == ["rope_theta"]
    row = measurement["keys"]["rope_parameters"]
    assert row["hf"]["rope_theta"] == 1000000.0 and row["backend"]["rope_theta"] == 10000.0


def test_tied_reference_untied_backend(megatron_config):
    _, measurement = _judged(megatron_config, "no-tie")
    assert measurement["keys"]["tie_word_embeddings"]["hf"] is True
    assert measurement["keys"]["tie_word_embeddings"]["backend"] is False


def test_mapping_to_a_key_megatron_does_not_have_fails(megatron_config):
    verdict, measurement = _judged(megatron_config, "typo-key")
    assert verdict.status == "failed"
    assert measurement["unknown_backend_keys"] == ["hiden_size"]
    assert "template sets 'hiden_size', which the backend does not read" in verdict.reason
    assert "hidden_size" in verdict.reason


def test_spec_waiver_turns_an_unmapped_key_into_waived(megatron_config):
    spec, measurement = megatron_config["waived"]
    assert spec.config_waivers == {"attention_dropout": WAIVER}
    without = judge(copy.deepcopy(measurement), {}, spec.hf_model_type)
    assert without.status == "failed" and "attention_dropout" in without.reason  # the control: it is really unmapped
    verdict, _ = _judged(megatron_config, "waived")
    assert verdict.status == "passed", verdict.reason
    row = verdict.metrics["keys"]["attention_dropout"]
    assert row["state"] == "waived" and row["why"] == WAIVER
