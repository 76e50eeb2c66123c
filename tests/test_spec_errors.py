"""Malformed specs give one line naming the spec file and the key, never a traceback.

Most cases run in-process (load_spec / validate_environment raising SpecError); a few go
through the real CLI to check exit status 4, the single "ERROR: " line, and that nothing
already written under the report directory is touched.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from harness.errors import SpecError
from harness.spec import SPECS_DIR, check_unique_names, json_schema, known_model_names, load_spec, spec_path_for
from harness.spec_plugins import validate_environment

from .conftest import base_spec


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
    pytest.param(_with("parallel", [{"tp": 1, "pp": 1, "ep": 2}]), {}, "load", "parallel[0].ep", r"unknown key",
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
