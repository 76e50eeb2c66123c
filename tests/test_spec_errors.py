"""Malformed specs give one line naming the spec file and the key, never a traceback.

Most cases run in-process (load_spec / validate_environment raising SpecError); a few go
through the real CLI to check exit status 4, the single "ERROR: " line, and that nothing
already written under the report directory is touched.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from harness.errors import SpecError
from harness.spec import (REPO_ROOT, SPECS_DIR, check_unique_names, json_schema, known_model_names, load_spec,
                          spec_path_for)
from harness.spec_plugins import validate_environment
from harness.spec_yaml import load_yaml

from .conftest import QWEN2_SPEC, base_spec

# without its `calibration:` line: that path is relative to model_specs/, and these copies live elsewhere
QWEN2_TEXT = "".join(line for line in QWEN2_SPEC.read_text().splitlines(True) if not line.startswith("calibration:"))


def _with(path: str, value):
    """The qwen2 spec with one nested key set, e.g. _with("reference.seed", "zero")."""
    data = base_spec()
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def _without(key: str) -> dict:
    data = base_spec()
    del data[key]
    return data


def _ref_path(folder: str) -> dict:
    data = base_spec()
    data["reference"] = {**data["reference"], "path": folder}
    return data


def _valid_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(2, 2)})


# (spec dict or raw YAML, extra files (text, bytes or a callable returning them), stage where it must fail, key or None, message regex)
# stage "load": load_spec raises; stage "env": load_spec passes and validate_environment raises.
CASES = [
    pytest.param(_without("name"), {}, "load", "name", r"required key is missing", id="missing-name"),
    pytest.param(_without("hf_model_type"), {}, "load", "hf_model_type", r"required key is missing",
                 id="missing-hf_model_type"),
    pytest.param(_with("reference.seed", "zero"), {}, "load", "reference.seed",
                 r"Input should be a valid integer.*", id="wrong-type-seed"),
    pytest.param(base_spec(colour="blue"), {}, "load", "colour", r"unknown key", id="unknown-top-level-key"),
    pytest.param(_with("reference.foo", 1), {}, "load", "reference.foo", r"unknown key", id="unknown-nested-key"),
    pytest.param(_with("parallel", [{"tp": 1, "pp": 1, "cp": 2}]), {}, "load", "parallel[0].cp", r"unknown key",
                 id="unknown-key-in-list-item"),
    pytest.param(_with("backends.infer", ["hf", "nosuch"]), {}, "load", "backends.infer[1]",
                 r"Input should be 'hf', 'vllm', 'sglang' or 'lmdeploy'", id="unknown-infer-backend"),
    pytest.param(_with("backends.train", ["megatron", "megatron"]), {}, "load", "backends.train",
                 r"backend listed twice: megatron", id="backend-listed-twice"),
    pytest.param("name: broken\nhf_model_type: [qwen2\ndtypes: [float32]\n", {}, "load", "line 3",
                 r"invalid YAML: .*", id="bad-yaml-syntax"),
    pytest.param("- name: qwen2\n- hf_model_type: qwen2\n", {}, "load", None,
                 r"expected a mapping at the top level, got list", id="top-level-list"),
    pytest.param("", {}, "load", None, r"spec is empty.*", id="empty-file"),
    pytest.param("# only a comment\n", {}, "load", None, r"spec is empty.*", id="comment-only-file"),
    pytest.param(base_spec(name="Qwen 2"), {}, "load", "name", r"String should match pattern .*",
                 id="invalid-name-pattern"),
    pytest.param(base_spec(dtypes=["float32", "float16"]), {}, "load", "dtypes[1]",
                 r"Input should be 'float32' or 'bfloat16'", id="dtype-not-allowed"),
    pytest.param(base_spec(dtypes=[]), {}, "load", "dtypes", r"List should have at least 1 item.*", id="no-dtypes"),
    pytest.param(base_spec(parallel=[{"tp": 0, "pp": 1}]), {}, "load", "parallel[0].tp",
                 r"Input should be greater than or equal to 1", id="parallel-tp-0"),
    pytest.param(base_spec(parallel=[{"tp": 2, "pp": 1}, {"tp": 2}]), {}, "load", "parallel",
                 r"parallel layouts repeat: \['tp2pp1', 'tp2pp1'\]", id="duplicate-parallel-layouts"),
    pytest.param(base_spec(tolerances={"float32": {"max_abs_logprb": 1e-3}}), {}, "load", "tolerances",
                 r"unknown metric 'max_abs_logprb' for float32 \(known: .*max_abs_logprob.*\)",
                 id="tolerance-unknown-metric"),
    pytest.param(base_spec(tolerances={"float16": {"max_abs_logprob": 1e-3}}), {}, "load", "tolerances.float16",
                 r"Input should be 'float32' or 'bfloat16'", id="tolerance-unknown-dtype"),
    pytest.param(base_spec(tolerances={"float32": {"max_abs_logprob": "small"}}), {}, "load",
                 "tolerances.float32.max_abs_logprob", r"Input should be a valid number.*",
                 id="tolerance-not-a-number"),
    pytest.param(base_spec(config_waivers={"rope_theta": "   "}), {}, "load", "config_waivers",
                 r"waiver for 'rope_theta' needs a reason", id="waiver-empty-reason"),
    pytest.param(base_spec(worker_timeout_s=0), {}, "load", "worker_timeout_s", r"Input should be greater than 0",
                 id="worker-timeout-zero"),
    pytest.param(base_spec(plugins=["my_template.py"]), {}, "env", "plugins[0]",
                 r"plugin file 'my_template.py' does not exist \(looked for .*my_template.py\)",
                 id="plugin-file-missing"),
    pytest.param(base_spec(engines={"vllm": {"plugins": ["my_vllm_model.py"]}}), {}, "env", "engines.vllm.plugins[0]",
                 r"plugin file 'my_vllm_model.py' does not exist \(looked for .*my_vllm_model.py\)",
                 id="engine-plugin-file-missing"),
    pytest.param(base_spec(rollout={"engine_logprobs": "processed_logprobs"}), {}, "load", "rollout.engine_logprobs",
                 r"Input should be 'processed' or 'raw'", id="rollout-logprobs-mode-typo"),
    pytest.param(base_spec(plugins=["boom.py"]), {"boom.py": "raise RuntimeError('kaboom\\nsecond line')\n"},
                 "env", "plugins[0]", r"plugin 'boom.py' raised RuntimeError: kaboom second line",
                 id="plugin-raises-at-import"),
    pytest.param(base_spec(plugins=["harness.templates.qwen2", "no_such_plugin_module_xyz"]), {}, "env",
                 "plugins[1]", r"no module named 'no_such_plugin_module_xyz'", id="plugin-module-missing"),
    pytest.param(_with("converter.template", "nope"), {}, "env", "converter.template",
                 r"no converter template 'nope' registered \(known: .*\); register one with register_template.*",
                 id="unknown-converter-template"),
    pytest.param(base_spec(hf_model_type="qwen9000", plugins=[], converter={}), {}, "env", "hf_model_type",
                 r"transformers knows no model type 'qwen9000'.*", id="unknown-hf_model_type"),
    pytest.param(_with("reference.config.hiden_size", 64), {}, "env", "reference.config.hiden_size",
                 r"not a qwen2 config key \(a typo would be silently ignored by transformers\)",
                 id="reference-config-typo"),
    pytest.param(_ref_path("no_such_ckpt"), {}, "env", "reference.path",
                 r".*no_such_ckpt does not exist or is not a directory", id="reference-path-missing"),
    pytest.param(_ref_path("ckpt"), {"ckpt/model.safetensors": _valid_safetensors}, "env", "reference.path",
                 r".*ckpt has no config.json", id="reference-path-no-config"),
    pytest.param(_ref_path("ckpt"), {"ckpt/config.json": "{}", "ckpt/model.bin": "x"}, "env", "reference.path",
                 r".*ckpt has no \*\.safetensors weights", id="reference-path-no-safetensors"),
    pytest.param(_ref_path("ckpt"), {"ckpt/config.json": "{}", "ckpt/model.safetensors": b"\x00garbage bytes" * 3},
                 "env", "reference.path", r".*ckpt/model.safetensors is not a valid safetensors file: .+",
                 id="reference-path-corrupt-safetensors"),
    # ---- head and layer counts: the reference model's own, then each parallel layout's ----
    pytest.param(_with("reference.config.num_key_value_heads", 3), {}, "env", "reference.config.num_key_value_heads",
                 r"num_key_value_heads 3 does not divide num_attention_heads 4 \(.*\)", id="kv-heads-not-dividing"),
    pytest.param(_ref_path("ckpt"), {"ckpt/config.json": '{"num_attention_heads": 4, "num_key_value_heads": 3}',
                                     "ckpt/model.safetensors": _valid_safetensors}, "env", "reference.path",
                 r"config.json: num_key_value_heads 3 does not divide num_attention_heads 4 \(.*\)",
                 id="kv-heads-not-dividing-in-checkpoint"),
    pytest.param(_ref_path("ckpt"), {"ckpt/config.json": "{not json", "ckpt/model.safetensors": _valid_safetensors},
                 "env", "reference.path", r".*ckpt/config.json: JSONDecodeError: .+", id="reference-path-bad-config"),
    pytest.param(base_spec(parallel=[{"tp": 1, "pp": 1}, {"tp": 4, "pp": 1}]), {}, "env", "parallel[1].tp",
                 r"tp 4 does not divide num_key_value_heads 2: each TP rank holds whole KV groups "
                 r"\(num_query_groups % tp == 0; .*\)", id="tp-not-dividing-kv-heads"),
    pytest.param(base_spec(parallel=[{"tp": 3, "pp": 1}]), {}, "env", "parallel[0].tp",
                 r"tp 3 does not divide num_attention_heads 4 \(.*\)", id="tp-not-dividing-heads"),
    pytest.param(base_spec(parallel=[{"tp": 1, "pp": 4}]), {}, "env", "parallel[0].pp",
                 r"pp 4 > num_hidden_layers 2: a pipeline stage would hold no layer", id="pp-more-than-layers"),
    pytest.param(_with("reference.config.num_hidden_layers", 3), {}, "env", "parallel[2].pp",
                 r"pp 2 does not divide num_hidden_layers 3: megatron-core 0.16 splits layers evenly .*"
                 r"\(get_num_layers_to_build asserts num_layers % pp == 0\)", id="pp-not-dividing-layers"),
    # ---- tolerances that no measurement could ever meet (or that bound nothing) ----
    pytest.param(base_spec(tolerances={"bfloat16": {"max_abs_logprob": -0.1}}), {}, "load",
                 "tolerances.bfloat16.max_abs_logprob", r".*negative.*", id="tolerance-negative"),
    pytest.param(base_spec(tolerances={"float32": {"mean_abs_logprob": float("nan")}}), {}, "load",
                 "tolerances.float32.mean_abs_logprob", r".*not a finite number.*", id="tolerance-nan"),
    pytest.param(base_spec(tolerances={"bfloat16": {"max_grad_diff": float("inf")}}), {}, "load",
                 "tolerances.bfloat16.max_grad_diff", r".*not a finite number.*", id="tolerance-inf"),
    pytest.param(base_spec(tolerances={"bfloat16": {"min_top1_agreement": 1.5}}), {}, "load",
                 "tolerances.bfloat16.min_top1_agreement", r".*fraction.*", id="tolerance-lower-bound-above-1"),
    pytest.param(base_spec(tolerances={"bfloat16": {"min_closeness": -0.5}}), {}, "load",
                 "tolerances.bfloat16.min_closeness", r".*negative.*", id="tolerance-lower-bound-below-0"),
    pytest.param(base_spec(tolerances={"float32": {"max_mean_exp_abs_logprob": 0.5}}), {}, "load",
                 "tolerances.float32.max_mean_exp_abs_logprob", r".*at least 1.*", id="tolerance-exp-below-1"),
    # ---- duplicate YAML keys (PyYAML would keep the last one silently) ----
    pytest.param("name: dup\nhf_model_type: qwen2\nreference:\n  config:\n    hidden_size: 128\n"
                 "    num_attention_heads: 4\n    hidden_size: 64\n", {}, "load", "reference.config.hidden_size",
                 r"duplicate key at line 7 \(first at line 5\); YAML would silently keep only the last value",
                 id="duplicate-nested-key"),
    pytest.param("name: first\nhf_model_type: qwen2\nname: second\n", {}, "load", "name",
                 r"duplicate key at line 3 \(first at line 1\).*", id="duplicate-top-level-key"),
    pytest.param("name: dup\nhf_model_type: qwen2\nparallel:\n  - {tp: 1, pp: 1}\n  - {tp: 2, tp: 1}\n", {}, "load",
                 "parallel[1].tp", r"duplicate key at line 5 \(first at line 5\).*", id="duplicate-key-in-list-item"),
    # ---- plugins that end, hang or write to stdout while importing ----
    pytest.param(base_spec(plugins=["quit.py"]), {"quit.py": "import sys\nsys.exit(3)\n"}, "env", "plugins[0]",
                 r"plugin 'quit.py' called sys.exit\(3\) at import \(a plugin must not end the process\)",
                 id="plugin-sys-exit"),
    pytest.param(base_spec(plugins=["harness.templates.qwen2", "bare.py"]), {"bare.py": "raise SystemExit\n"}, "env",
                 "plugins[1]", r"plugin 'bare.py' called sys.exit\(None\) at import .*", id="plugin-raise-systemexit"),
    pytest.param(base_spec(plugins=["hang.py"], plugin_import_timeout_s=0.5), {"hang.py": "import time\n"
                                                                                          "time.sleep(20)\n"},
                 "env", "plugins[0]",
                 r"plugin 'hang.py' did not finish importing within 0.5 s \(plugin_import_timeout_s\)",
                 id="plugin-hangs-at-import"),
    pytest.param(base_spec(plugins=["chatty.py"]), {"chatty.py": "print('hello from a plugin')\n"}, "env",
                 "plugins[0]", r"plugin 'chatty.py' wrote to stdout at import \('hello from a plugin'\); a worker's "
                               r"stdout carries its replies: use logging or sys.stderr", id="plugin-prints"),
    pytest.param(base_spec(plugins=["rawfd.py"]), {"rawfd.py": "import os\nos.write(1, b'straight to fd 1\\n')\n"},
                 "env", "plugins[0]", r"plugin 'rawfd.py' wrote to stdout at import \('straight to fd 1'\).*",
                 id="plugin-writes-fd-1"),
    pytest.param(base_spec(plugin_import_timeout_s=0), {}, "load", "plugin_import_timeout_s",
                 r"Input should be greater than 0", id="plugin-timeout-zero"),
]


def _write(folder: Path, spec, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):  # built lazily: keeps torch out of collection
            content = content()
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    path = folder / "spec.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path.resolve()


def _assert_one_line(exc: SpecError, path: Path | str, key: str | None, message: str) -> str:
    line = exc.one_line()
    assert "\n" not in line and "\r" not in line, line
    assert str(exc) == line
    prefix = f"{path}: {key}: " if key else f"{path}: "
    assert line.startswith(prefix), f"{line!r} does not start with {prefix!r}"
    assert re.fullmatch(message, line[len(prefix):]), f"{line[len(prefix):]!r} !~ {message!r}"
    assert exc.key == key
    return line


@pytest.mark.parametrize("spec, files, stage, key, message", CASES)
def test_malformed_spec_gives_one_line(tmp_path, spec, files, stage, key, message):
    path = _write(tmp_path / "specs", copy.deepcopy(spec), files)
    with pytest.raises(SpecError) as info:
        loaded = load_spec(path)
        assert stage == "env", f"load_spec accepted a spec that should fail at load: {path.read_text()}"
        validate_environment(loaded)
    _assert_one_line(info.value, path, key, message)


@pytest.mark.parametrize("spec, files, stage, key, message",
                         [c for c in CASES if c.values[2] == "env"])
def test_environment_errors_are_not_caught_at_load_time(tmp_path, spec, files, stage, key, message):
    """Errors that need plugins/transformers are validate_environment's job; load_spec stays cheap."""
    path = _write(tmp_path / "specs", copy.deepcopy(spec), files)
    load_spec(path)


def test_valid_reference_path_passes(tmp_path):
    path = _write(tmp_path / "specs", _ref_path("ckpt"),
                  {"ckpt/config.json": "{}", "ckpt/model.safetensors": _valid_safetensors()})
    validate_environment(load_spec(path))


def test_yaml_1_2_floats_are_floats(tmp_path):
    """`rms_norm_eps: 1e-6` is a float in YAML 1.2 and JSON; PyYAML's 1.1 rules made it the string '1e-6'."""
    text = QWEN2_TEXT.replace("rms_norm_eps: 1.0e-6", "rms_norm_eps: 1e-6")
    assert text != QWEN2_TEXT
    text += "tolerances: {bfloat16: {max_abs_logprob: 2.5E-1, mean_abs_logprob: .05, max_grad_diff: 5e-2}}\n"
    spec = load_spec(_write(tmp_path / "specs", text, {}))
    assert spec.reference.config["rms_norm_eps"] == 1e-6 and isinstance(spec.reference.config["rms_norm_eps"], float)
    assert spec.tolerances["bfloat16"] == {"max_abs_logprob": 0.25, "mean_abs_logprob": 0.05, "max_grad_diff": 0.05}
    validate_environment(spec)


@pytest.mark.parametrize("text, value", [
    ("1e-6", 1e-6), ("1E+6", 1e6), ("-2.5e-3", -2.5e-3), (".5", 0.5), ("2.5e3", 2500.0), ("+1e2", 100.0),
    ("1.0e-6", 1e-6), (".inf", float("inf")),
    ("1", 1), ("09", "09"), ("0x1f", 31), ("1e", "1e"), ("e5", "e5"), ("'1e-6'", "1e-6"), ("1e-6x", "1e-6x"),
])
def test_spec_loader_scalars(text, value):
    loaded = load_yaml(f"v: {text}\n")["v"]
    assert loaded == value and type(loaded) is type(value), (text, loaded)


def test_spec_loader_leaves_pyyaml_alone():
    assert yaml.safe_load("v: 1e-6\n") == {"v": "1e-6"}  # SafeLoader's own resolvers are untouched
    assert load_yaml("a: &x {k: 1}\nb:\n  <<: *x\n  k: 2\n") == {"a": {"k": 1}, "b": {"k": 2}}  # merge overrides


def test_harness_reads_spec_yaml_through_one_loader(tmp_path):
    """ci_select and verify read specs too: the same loader (1.2 floats, duplicates refused) everywhere."""
    from harness import ci_select, verify

    offenders = [str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "harness").rglob("*.py")
                 if path.name != "spec_yaml.py" and re.search(r"yaml\.(safe_)?load\(", path.read_text())]
    assert offenders == [], f"read YAML with harness.spec_yaml.load_yaml: {offenders}"
    (tmp_path / "model_specs").mkdir()
    (tmp_path / "model_specs" / "floaty.yaml").write_text("name: floaty\nreference: {config: {rms_norm_eps: 1e-6}}\n")
    (tmp_path / "model_specs" / "twice.yaml").write_text("name: twice\nname: again\n")
    specs = ci_select.load_specs(tmp_path)
    assert specs["floaty"]["reference"]["config"]["rms_norm_eps"] == 1e-6
    assert specs["twice"] == {"_path": "model_specs/twice.yaml"}  # unreadable: still selected by its path
    assert verify._spec_name(tmp_path / "model_specs" / "twice.yaml") == "twice"  # the file stem, not "again"


@pytest.mark.parametrize("changes", [
    {"tolerances": {"float32": {"max_mean_exp_abs_logprob": 1.0, "min_top1_agreement": 1.0, "min_closeness": 0.0,
                                "max_abs_logprob": 0.0}}},
    {"backends": {"train": ["deepspeed"], "infer": ["hf", "lmdeploy"]}, "parallel": [{"tp": 4, "pp": 4}]},
    {"backends": {"train": [], "infer": ["hf", "vllm"]}, "parallel": [{"tp": 4, "pp": 4}]},  # no trainer: no refit
    {"reference": {**base_spec()["reference"],
                   "config": {**base_spec()["reference"]["config"], "num_key_value_heads": 1}},
     "parallel": [{"tp": 1, "pp": 1}, {"tp": 1, "pp": 2}]},
], ids=["tolerances-at-their-limits", "layouts-unused-without-megatron", "layouts-unused-by-vllm-alone",
        "mqa-without-tp"])
def test_good_specs_are_let_in(tmp_path, changes):
    validate_environment(load_spec(_write(tmp_path / "specs", base_spec(**changes), {})))


def test_plugin_that_imports_fine_works_as_before(tmp_path):
    from harness.spec_plugins import import_engine_plugins, import_spec_plugins

    files = {"good.py": "import sys\nprint('a note for the user', file=sys.stderr)\nVALUE = 42\n",
             "engine.py": "ENGINE = 'lmdeploy'\n"}
    path = _write(tmp_path / "specs", base_spec(plugins=["harness.templates.qwen2", "good.py"],
                                                 engines={"lmdeploy": {"plugins": ["engine.py"]}}), files)
    spec = load_spec(path)
    validate_environment(spec)
    modules = import_spec_plugins(spec)
    assert modules[1].VALUE == 42 and import_spec_plugins(spec)[1] is modules[1]  # imported once, then reused
    assert modules[0] is sys.modules["harness.templates.qwen2"]
    assert import_engine_plugins(spec, "lmdeploy")[0].ENGINE == "lmdeploy"
    assert sys.stdout is not None and type(sys.stdout).__name__ != "_StdoutWatch"  # put back


def test_engine_plugin_printing_at_import_is_named(tmp_path):
    from harness.spec_plugins import import_engine_plugins

    files = {"builder.py": "print('registered my builder')\n"}
    spec = load_spec(_write(tmp_path / "specs", base_spec(engines={"lmdeploy": {"plugins": ["builder.py"]}}), files))
    with pytest.raises(SpecError) as info:
        import_engine_plugins(spec, "lmdeploy")
    _assert_one_line(info.value, spec.source, "engines.lmdeploy.plugins[0]",
                     r"plugin 'builder.py' wrote to stdout at import \('registered my builder'\).*")


def test_module_plugin_exiting_at_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "exiting_plugin_mod.py").write_text("import sys\nsys.exit(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec(_write(tmp_path / "specs", base_spec(plugins=["exiting_plugin_mod"]), {}))
    with pytest.raises(SpecError) as info:
        validate_environment(spec)
    _assert_one_line(info.value, spec.source, "plugins[0]", r"plugin 'exiting_plugin_mod' called sys.exit\(2\) .*")
    assert "exiting_plugin_mod" not in sys.modules


def test_plugin_importing_a_plugin_while_being_imported(tmp_path, monkeypatch):
    """SGLang's generated package calls import_plugin from inside an import: that runs inline, because a helper
    thread would wait for the module lock the importing thread holds (here: circular_outer's)."""
    (tmp_path / "circular_outer.py").write_text(
        "from types import SimpleNamespace\nfrom harness.spec_plugins import import_plugin\n\n"
        "INNER = import_plugin(SimpleNamespace(source='outer', plugin_import_timeout_s=2), 0, 'circular_inner')\n")
    (tmp_path / "circular_inner.py").write_text("import circular_outer  # half-made while it imports us\nVALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec(_write(tmp_path / "specs", base_spec(plugins=["circular_outer"]), {}))
    try:
        validate_environment(spec)
        assert sys.modules["circular_outer"].INNER.VALUE == 7
    finally:
        for name in ("circular_outer", "circular_inner"):
            sys.modules.pop(name, None)


def test_keyboard_interrupt_in_a_plugin_is_not_swallowed(tmp_path):
    spec = load_spec(_write(tmp_path / "specs", base_spec(plugins=["ctrl_c.py"]),
                            {"ctrl_c.py": "raise KeyboardInterrupt\n"}))
    with pytest.raises(KeyboardInterrupt):
        validate_environment(spec)


def test_missing_spec_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    _assert_one_line(info.value, path, None, r"spec file does not exist")


def test_duplicate_model_names_across_specs(tmp_path):
    first = load_spec(_write(tmp_path / "a", base_spec("twin"), {}))
    second = load_spec(_write(tmp_path / "b", base_spec("twin"), {}))
    check_unique_names([first])
    with pytest.raises(SpecError) as info:
        check_unique_names([first, second])
    _assert_one_line(info.value, second.source, "name",
                     re.escape(f"duplicate model name 'twin' (also in {first.source})"))


def test_unknown_model_name():
    with pytest.raises(SpecError) as info:
        spec_path_for("nope")
    line = _assert_one_line(info.value, "--model", "nope", r"unknown model \(known in .*: .*\)")
    for name in known_model_names():
        assert name in line
    assert {"qwen2", "llama"} <= set(known_model_names())


def test_checked_in_schema_is_exported():
    """model_specs/spec.schema.json must be regenerated whenever the Spec model changes."""
    checked_in = (SPECS_DIR / "spec.schema.json").read_text()
    assert checked_in == json_schema(), "model_specs/spec.schema.json is stale: regenerate it from harness.spec"
    json.loads(checked_in)


@pytest.mark.parametrize("spec_file", sorted(SPECS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(spec_file):
    spec = load_spec(spec_file)
    assert spec.name == spec_file.stem
    try:
        import jsonschema
    except ImportError:
        return  # jsonschema is not a dependency; load_spec above is the same model the schema is made from
    jsonschema.validate(yaml.safe_load(spec_file.read_text()), json.loads(json_schema()))


# ---- through the real CLI (subprocess): exit status 4, one "ERROR: " line, no traceback ----

def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_cli_malformed_spec(run_certify, tmp_path):
    path = _write(tmp_path / "specs", _with("backends.infer", ["hf", "nosuch"]), {})
    run = run_certify("--model-spec", str(path))
    assert run.returncode == 4, run.output
    assert "Traceback" not in run.output
    lines = _error_lines(run.output)
    assert len(lines) == 1, run.output
    assert lines[0] == f"ERROR: {path}: backends.infer[1]: Input should be 'hf', 'vllm', 'sglang' or 'lmdeploy'"


def test_cli_malformed_spec_keeps_existing_reports(run_certify, tmp_path):
    """Nothing already written is lost: a bad spec fails before any report is touched."""
    other = tmp_path / "reports" / "other-model"
    other.mkdir(parents=True)
    cert = other / "certificate.json"
    cert.write_bytes(b'{"model": "other-model", "verdict": "certified"}\n')
    summary = other / "summary.md"
    summary.write_bytes(b"# other-model\n")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cert, summary)}

    path = _write(tmp_path / "specs", _with("reference.config.hiden_size", 64), {})
    run = run_certify("--model-spec", str(path))
    assert run.returncode == 4, run.output
    assert "Traceback" not in run.output
    lines = _error_lines(run.output)
    assert len(lines) == 1 and lines[0].startswith(f"ERROR: {path}: reference.config.hiden_size: "), run.output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cert, summary)} == before
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["other-model"]


@pytest.mark.parametrize("plugin, changes, message", [
    ("import sys\nsys.exit(3)\n", {}, "plugin 'bad_plugin.py' called sys.exit(3) at import "
                                       "(a plugin must not end the process)"),
    ("import time\ntime.sleep(3600)\n", {"plugin_import_timeout_s": 1},
     "plugin 'bad_plugin.py' did not finish importing within 1 s (plugin_import_timeout_s)"),
], ids=["sys-exit", "hang"])
def test_cli_plugin_failing_at_import(run_certify, tmp_path, plugin, changes, message):
    """pytest used to print "mainloop: caught unexpected SystemExit!" (exit 3), or wait for ever."""
    path = _write(tmp_path / "specs", base_spec(plugins=["bad_plugin.py"], **changes), {"bad_plugin.py": plugin})
    run = run_certify("--model-spec", str(path), timeout=120)
    assert run.returncode == 4, run.output
    assert "Traceback" not in run.output and "mainloop" not in run.output
    assert _error_lines(run.output) == [f"ERROR: {path}: plugins[0]: {message}"], run.output


def test_cli_unknown_model(run_certify):
    run = run_certify("--model", "nope")
    assert run.returncode == 4, run.output
    assert "Traceback" not in run.output
    lines = _error_lines(run.output)
    assert len(lines) == 1, run.output
    assert lines[0].startswith("ERROR: --model: nope: unknown model (known in ")
    assert "llama" in lines[0] and "qwen2" in lines[0]


def test_cli_unknown_backend(run_certify):
    run = run_certify("--model", "qwen2", "--backend", "nosuch")
    assert run.returncode == 4, run.output
    assert "Traceback" not in run.output
    lines = _error_lines(run.output)
    assert len(lines) == 1, run.output
    assert lines[0].startswith("ERROR: --backend: nosuch: unknown backend (known: ")


def test_cli_list_models(run_certify):
    run = run_certify("--list-models")
    assert run.returncode == 0, run.output
    rows = {line.split()[0]: line for line in _error_lines(run.output)}
    assert {"qwen2", "llama"} <= set(rows)
    assert "INVALID" not in run.output
    assert "megatron" in rows["qwen2"]


def test_the_deepspeed_grid_comes_from_the_spec():
    from harness.plan import build_plan
    from harness.spec import parse_spec

    def rows(spec) -> list[str]:
        return sorted({c.variant for c in build_plan(parse_spec(spec)) if (c.backend, c.suite) == ("deepspeed", "train")})

    assert rows(base_spec()) == [f"zero{s}-ws{w}" for s in range(4) for w in (1, 2)]  # ROLL's strategies: all
    assert rows(base_spec(deepspeed={"zero_stages": [3], "world_sizes": [2]})) == ["zero3-ws2"]
    for bad in ({"zero_stages": [4]}, {"world_sizes": []}, {"zero": [3]}):
        with pytest.raises(SpecError):
            parse_spec(base_spec(deepspeed=bad))
