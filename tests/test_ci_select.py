"""harness.ci_select: which models a change touches, and the CPU PR gate on a certificate."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.ci_select import changed_files, gate, load_specs, main, select_models
from harness.spec import known_model_names

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def specs() -> dict:
    """The repo's real specs plus out-of-tree style ones: a file plugin next to the spec, a module plugin,
    a spec in a subfolder and a reference checkpoint folder."""
    out = load_specs(REPO)
    out["custom"] = {"_path": "model_specs/custom.yaml", "name": "custom", "hf_model_type": "custom_lm",
                     "plugins": ["plugins/custom_template.py", "my_pkg.models.custom"],
                     "converter": {"template": "custom"}}
    out["nested"] = {"_path": "model_specs/team/nested.yaml", "hf_model_type": "qwen2",
                     "plugins": ["../plugins/shared.py", "./local.py"],
                     "reference": {"path": "ckpt/nested-0.5b"}}
    return out


ALL = sorted([*known_model_names(), "custom", "nested"])  # every repo spec plus the two out-of-tree ones


def test_load_specs_reads_every_repo_spec():
    specs = load_specs(REPO)
    assert sorted(specs) == known_model_names()
    assert specs["qwen2"]["plugins"] == ["harness.templates.qwen2"]
    assert specs["qwen2"]["_path"] == "model_specs/qwen2.yaml"


@pytest.mark.parametrize("paths, expected", [
    (["model_specs/qwen2.yaml"], ["qwen2"]),
    (["./model_specs/llama.yaml"], ["llama"]),
    (["model_specs/custom.yaml", "model_specs/team/nested.yaml"], ["custom", "nested"]),
    (["model_specs/deleted.yaml"], []),  # a removed spec: nothing left to certify
])
def test_spec_only(specs, paths, expected):
    models, reason = select_models(paths, specs)
    assert models == expected
    if expected:
        assert all(f"-> {m}" in reason for m in expected), reason


@pytest.mark.parametrize("paths, expected", [
    (["harness/templates/qwen2.py"], ["nested", "qwen2"]),  # nested's template is its hf_model_type, qwen2
    (["harness/templates/llama.py"], ["llama"]),
    (["harness/templates/custom.py"], ["custom"]),  # converter.template names a built-in one
    (["harness/templates/mistral.py"], ["mistral"]),
    (["harness/templates/unused.py"], []),  # a template no spec uses yet
])
def test_template_only(specs, paths, expected):
    assert select_models(paths, specs)[0] == expected


@pytest.mark.parametrize("paths, expected", [
    (["model_specs/plugins/custom_template.py"], ["custom"]),
    (["my_pkg/models/custom.py"], ["custom"]),
    (["my_pkg/models/custom/__init__.py"], ["custom"]),  # a module plugin that is a package
    (["model_specs/plugins/shared.py"], ["nested"]),  # ../ resolves against the spec's folder
    (["model_specs/team/local.py"], ["nested"]),
    (["model_specs/team/ckpt/nested-0.5b/config.json"], ["nested"]),  # the reference checkpoint
    (["model_specs/plugins/unused.py", "my_pkg/models/other.py"], []),
])
def test_plugin_only(specs, paths, expected):
    assert select_models(paths, specs)[0] == expected


@pytest.mark.parametrize("path", ["harness/plan.py", "harness/backends/megatron.py", "harness/templates/__init__.py",
                                  "suites/test_logits.py", "fixtures/tiny_models.py", "pyproject.toml", "Makefile",
                                  "model_specs/spec.schema.json", "harness/certificate_schema.json"])
def test_harness_wide(specs, path):
    models, reason = select_models([path], specs)
    assert models == ALL
    assert reason.startswith("every model") and path in reason


@pytest.mark.parametrize("paths", [
    ["README.md"],
    ["reports/README.md", "docs/adding-a-model.md", ".github/ISSUE_TEMPLATE/bug.md", ".github/pull_request_template.md"],
    ["harness/README.md"],  # a markdown file under harness/ is still documentation
])
def test_docs_only(specs, paths):
    assert select_models(paths, specs) == ([], "no model: documentation-only change")


def test_harness_tests_and_ci_only_touch_no_model(specs):
    models, reason = select_models(["tests/test_plan.py", ".ci/run", ".github/workflows/gpu.yml"], specs)
    assert models == [] and reason.startswith("no model") and "documentation" not in reason
    assert select_models([], specs)[0] == []


def test_mixed_change(specs):
    paths = ["README.md", "model_specs/llama.yaml", "model_specs/plugins/custom_template.py", "tests/test_x.py"]
    models, reason = select_models(paths, specs)
    assert models == ["custom", "llama"]
    assert reason == "model_specs/llama.yaml -> llama; model_specs/plugins/custom_template.py -> custom"
    # one shared file makes it every model
    assert select_models(paths + ["harness/session.py"], specs)[0] == ALL


# ---- git and the CLI ----

def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=root, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_changed_files_since_the_merge_base(tmp_path):
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "model_specs").mkdir()
    (tmp_path / "model_specs" / "a.yaml").write_text("name: a\n")
    (tmp_path / "README.md").write_text("x\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "base")
    _git(tmp_path, "checkout", "-q", "-b", "pr")
    _git(tmp_path, "mv", "model_specs/a.yaml", "model_specs/b.yaml")
    _git(tmp_path, "commit", "-q", "-m", "rename")
    _git(tmp_path, "checkout", "-q", "main")
    (tmp_path / "README.md").write_text("changed on main after the branch point\n")
    _git(tmp_path, "commit", "-q", "-am", "main moves on")
    _git(tmp_path, "checkout", "-q", "pr")
    # both sides of the rename; not main's own later change
    assert sorted(changed_files("main", root=tmp_path)) == ["model_specs/a.yaml", "model_specs/b.yaml"]


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_cli_base_writes_github_output(tmp_path, monkeypatch, capsys):
    out = tmp_path / "github_output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out))
    assert main(["--base", "HEAD"]) == 0  # HEAD...HEAD: nothing changed
    captured = capsys.readouterr()
    assert captured.out == "\n" and "no model" in captured.err
    assert out.read_text().splitlines()[0] == "models="
    assert main(["--base", "no-such-revision-xyz"]) == 2


# ---- the CPU PR gate ----

def _cert(*checks: tuple[str, str, str, str]) -> dict:
    rows = [{"id": f"m/{suite}/{backend}", "suite": suite, "backend": backend, "status": status, "scope": scope,
             "reason": f"{status} because\nsecond line"} for suite, backend, status, scope in checks]
    return {"model": "m", "verdict": "x", "summary": "a summary", "checks": rows}


@pytest.mark.parametrize("status", ["failed", "error", "not_run"])
def test_gate_fails_on_any_cpu_scope_check_without_a_pass(status):
    """A backend that did not install leaves not_run rows: no evidence is no pass."""
    ok, message = gate(_cert(("hf", "hf", "passed", "cpu"), ("train", "megatron", status, "cpu"),
                             ("logits", "sglang", "not_run", "gpu")))
    assert not ok
    assert message == f"m: 1 CPU check(s) without a pass: m/train/megatron {status}: {status} because"


def test_gate_passes_a_certified_cpu_scope_and_names_what_is_left_to_the_gpu_workflow():
    ok, message = gate(_cert(("hf", "hf", "passed", "cpu"), ("logits", "lmdeploy", "not_applicable", "cpu"),
                             ("logits", "sglang", "failed", "gpu")))
    assert ok and "CPU scope certified (2 checks); 1 GPU-scope check(s) left to gpu.yml" in message


def test_gate_fails_a_certificate_over_its_resource_bound():
    """Every row passed, the spec's peak-RSS bound did not: the verdict is failed, and so is the gate."""
    cert = _cert(("hf", "hf", "passed", "cpu"), ("train", "deepspeed", "passed", "cpu"))
    cert["resources"] = {"bound": {"status": "failed", "reason": "deepspeed peaked at 16.13 GiB > 14.88 GiB"}}
    ok, message = gate(cert)
    assert not ok and message == "m: peak RSS over the spec's bound: deepspeed peaked at 16.13 GiB > 14.88 GiB"
    cert["resources"]["bound"] = {"status": "passed", "reason": "worst deepspeed at 13.70 GiB"}
    assert gate(cert)[0]


def test_gate_fails_a_certificate_with_nothing_in_the_cpu_scope():
    ok, message = gate(_cert(("logits", "sglang", "not_run", "gpu")))
    assert not ok and "nothing was proven here" in message


def test_gate_counts_failures():
    ok, message = gate(_cert(("hf", "hf", "failed", "cpu"), ("roundtrip", "megatron", "error", "cpu")))
    assert not ok and message.endswith("(+1 more)")


def test_gate_cli_verifies_each_certificate_first(tmp_path, capsys):
    from harness import certificate

    def real(status: str) -> dict:
        rows = [{"id": "m/hf/hf/load/float32", "suite": "hf", "backend": "hf", "variant": "load",
                 "dtype": "float32", "layout": "", "scope": "cpu", "seconds": 0.1, "status": status,
                 "reason": "" if status == "passed" else "broken", "metrics": {}, "tolerance": {}}]
        spec = "name: m\nhf_model_type: qwen2\ndtypes: [float32]\nbackends: {infer: [hf]}\n"
        cert = certificate.build("m", __import__("hashlib").sha256(spec.encode()).hexdigest(),
                                 {"torch": "2.13.0", "transformers": "5.19.0"}, rows, "", "", spec)
        return cert

    good, bad, forged = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "forged.json"
    cert = real("passed")
    cert["checks"] = cert["checks"] + [dict(cert["checks"][0], id="m/hf/hf/save-load/float32", variant="save-load",
                                            tolerance={"save_load_max_abs_diff": {
                                                "value": 0.0, "metric": "max_abs_diff", "upper": True,
                                                "source": "default"}}, metrics={"max_abs_diff": 0.0})]
    cert.update(verdict=certificate.verdict_of(cert["checks"]), scopes=certificate.scope_verdicts(cert["checks"]),
                summary=certificate.summary_line(cert["checks"]))
    cert["integrity"] = certificate.seal(cert, key="")
    good.write_text(json.dumps(cert))
    broken = real("error")
    broken["checks"] = cert["checks"][:1] + [dict(cert["checks"][1], status="error", reason="boom")]
    broken.update(verdict="failed", scopes=certificate.scope_verdicts(broken["checks"]),
                  summary=certificate.summary_line(broken["checks"]))
    broken["integrity"] = certificate.seal(broken, key="")
    bad.write_text(json.dumps(broken))
    forged.write_text(json.dumps(dict(cert, verdict="failed")))
    assert main(["--gate", str(good)]) == 0
    assert main(["--gate", str(good), str(bad)]) == 1
    assert main(["--gate", str(forged)]) == 1
    assert main(["--gate", str(tmp_path / "missing.json")]) == 1  # certification crashed before writing one
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS m: CPU scope certified (2 checks)"), lines
    assert lines[2].startswith("FAIL m: 1 CPU check(s) without a pass: m/hf/hf/save-load/float32 error"), lines
    assert lines[3].startswith(f"FAIL {forged}: the certificate does not verify: integrity"), lines
    assert lines[4].startswith("FAIL ") and "cannot read" in lines[4]


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "harness.ci_select", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--base" in proc.stdout and "--gate" in proc.stdout
