"""The GitHub Actions workflows: actionlint-clean, and wired the way the harness expects."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT_CONFIG = REPO / ".github" / "actionlint.yaml"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))


def _actionlint() -> str:
    """The actionlint binary from the dev extra (next to this interpreter), else one on PATH; skip if none runs."""
    beside = Path(sys.executable).parent / "actionlint"
    binary = str(beside) if beside.is_file() else shutil.which("actionlint")
    if binary is None:
        pytest.skip("no actionlint binary (it comes with the dev extra: pip install -e '.[dev]')")
    try:
        proc = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        pytest.skip(f"the actionlint binary {binary} cannot run here: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"the actionlint binary {binary} cannot run here: {(proc.stderr or proc.stdout).strip()[:300]}")
    return binary


def _lint(path: Path, shellcheck: str = "") -> subprocess.CompletedProcess:
    cmd = [_actionlint(), "-no-color", "-oneline", "-config-file", str(ACTIONLINT_CONFIG),
           f"-shellcheck={shellcheck}", "-pyflakes=", str(path)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_actionlint(path):
    """Deterministic: shellcheck and pyflakes integrations off, whatever this machine has."""
    proc = _lint(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_actionlint_with_shellcheck(path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed: run: scripts are not shell-checked here")
    proc = _lint(path, shellcheck)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- structure ----

def _load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads a bare `on` key as True
    return data


def _steps(workflow: dict):
    for job_name, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_name, step


def _runs(workflow: dict) -> str:
    return "\n".join(step.get("run", "") for _job, step in _steps(workflow))


def test_the_workflows_are_the_gate_gpu_publish_and_real_shape_ones():
    assert [p.name for p in WORKFLOW_FILES] == ["gpu.yml", "pr-gate.yml", "publish.yml", "real-shape.yml"]


BARE_PYTHON = re.compile(r"(?<![\w./-])(python3?|pip3?|pytest)(?![\w.-])")


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_python_runs_through_the_venv_after_it_is_set_up(path):
    """run: steps call .venv/bin/python (never a bare python/pip/pytest), and only after a step
    that creates the venv (make ..., or bash .ci/run which runs make test)."""
    workflow = _load(path.name)
    for job_name, job in workflow["jobs"].items():
        venv_ready = False
        for step in job.get("steps", []):
            script = step.get("run", "")
            lines = [line for line in script.splitlines() if not line.strip().startswith("#")]
            for line in lines:
                bare = BARE_PYTHON.findall(line.replace(".venv/bin/python", "").replace(".venv/bin/pytest", ""))
                assert not bare, f"{path.name}:{job_name}: {line.strip()!r} uses a bare {bare[0]}"
            if ".venv/bin/" in script:
                assert venv_ready, f"{path.name}:{job_name}: {step.get('name')!r} uses .venv before it is set up"
            if re.search(r"(^|\s)make(\s|$)", script) or ".ci/run" in script:
                venv_ready = True


def test_pr_gate():
    wf = _load("pr-gate.yml")
    assert "pull_request" in wf["on"]
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = job["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["python-version"] == "3.11"
    runs = _runs(wf)
    order = ["bash .ci/run", "-m harness.ci_select --base", "make certify MODEL=", "-m harness verify",
             "-m harness.ci_select --gate", "GITHUB_STEP_SUMMARY"]
    positions = [runs.find(marker) for marker in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))
    select = next(s for s in steps if "harness.ci_select --base" in s.get("run", ""))
    assert select["env"]["BASE_REF"] == "${{ github.base_ref }}" and "origin/$BASE_REF" in select["run"]
    comment = next(s for s in steps if s.get("uses", "").startswith("actions/github-script@"))
    assert "github.event.pull_request.head.repo.full_name == github.repository" in comment["if"]  # forks
    assert wf["permissions"]["pull-requests"] == "write"
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "reports/" and upload["if"] == "always()"


def test_gpu_matrix():
    wf = _load("gpu.yml")
    assert "workflow_dispatch" in wf["on"] and wf["on"]["schedule"][0]["cron"]
    (job,) = wf["jobs"].values()
    labels = [entry["label"] for entry in job["strategy"]["matrix"]["include"]]
    assert labels == ["gpu-1", "gpu-2", "gpu-8"]
    assert job["runs-on"] == ["self-hosted", "${{ matrix.label }}"]
    assert job["env"]["CERTIFY_DEVICE"] == "cuda" and "matrix.gpus" in job["env"]["CERTIFY_GPUS"]
    assert "make certify MODEL=" in _runs(wf)
    # each runner's GPU count reaches the harness (CERTIFY_GPUS, read by harness.device.select) ...
    counts = {entry["label"]: entry["gpus"] for entry in job["strategy"]["matrix"]["include"]}
    assert counts == {"gpu-1": 1, "gpu-2": 2, "gpu-8": 8}
    assert job["env"]["CERTIFY_GPUS"] == "${{ matrix.gpus }}"
    # ... the runner proves it has them before certifying, and nothing overrides CERTIFY_DEVICE=cuda
    runs = _runs(wf)
    check = runs.find('-m harness device --require-gpus "$CERTIFY_GPUS"')
    assert -1 < check < runs.find("make certify MODEL="), runs
    assert "--device cpu" not in runs and "CERTIFY_DEVICE" not in "".join(
        str(s.get("env", {})) for _j, s in _steps(wf))
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") for _j, s in _steps(wf))
    # actionlint knows these self-hosted labels
    config = yaml.safe_load(ACTIONLINT_CONFIG.read_text())
    assert set(labels) <= set(config["self-hosted-runner"]["labels"])


def test_publish_to_pages():
    wf = _load("publish.yml")
    assert wf["on"]["push"]["branches"] == ["main"]
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    assert "make certify MODEL=" in _runs(wf) and "reports/index.html" in _runs(wf)
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"] == "reports/"
    assert deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["steps"])


def test_published_certificates_are_signed_and_verified_with_the_same_secret():
    wf = _load("publish.yml")
    steps = wf["jobs"]["build"]["steps"]
    certify = next(s for s in steps if "make certify" in s.get("run", ""))
    verify = next(s for s in steps if "harness verify" in s.get("run", ""))
    for step in (certify, verify):
        assert step["env"]["CERTIFY_SIGNING_KEY"] == "${{ secrets.CERTIFY_SIGNING_KEY }}"


def test_ci_requires_the_backends_it_exists_to_exercise(tmp_path):
    """.ci/run names them, checks they import, and a test skipped for one of them then fails instead of passing."""
    import os
    import subprocess
    import sys

    ci = (REPO / ".ci" / "run").read_text()
    assert "CERTIFY_REQUIRE_BACKENDS=hf,megatron,deepspeed,vllm,lmdeploy" in ci
    assert ci.index("harness backends --require") < ci.index("make test")
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n@pytest.mark.skipif(True, reason='megatron-core not installed')\ndef test_x():\n    pass\n")
    env = {**os.environ, "CERTIFY_REQUIRE_BACKENDS": "hf,megatron"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("CERTIFY_REQUIRE_EXTRAS", None)  # CI sets it: each run below chooses its own requirements
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "skipped for a package CI must exercise" in run.stdout, run.stdout[-2000:]
    # the Ray executor is no backend, but CI requires its tests the same way
    assert "CERTIFY_REQUIRE_EXTRAS=ray" in ci
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n@pytest.mark.skipif(True, reason='ray is not installed')\ndef test_x():\n    pass\n")
    extras = {k: v for k, v in env.items() if k != "CERTIFY_REQUIRE_BACKENDS"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(tmp_path)], cwd=tmp_path, env={**extras, "CERTIFY_REQUIRE_EXTRAS": "ray"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "skipped for a package CI must exercise (ray)" in run.stdout, run.stdout[-2000:]
    env.pop("CERTIFY_REQUIRE_BACKENDS")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout[-2000:]


def test_real_shape_nightly_certifies_the_05b_spec_and_requires_its_verdict():
    """The 0.5B-shape certification (too long for the PR gate) runs nightly on a 24 GiB CPU runner; a certificate
    failed on its resource bound alone fails the job too."""
    wf = _load("real-shape.yml")
    assert "workflow_dispatch" in wf["on"] and wf["on"]["schedule"][0]["cron"]
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "cpu-24g"]
    spec = yaml.safe_load((REPO / job["env"]["SPEC"]).read_text())
    assert spec["peak_rss_bound"], job["env"]["SPEC"]
    assert job["env"]["CERTIFICATE"] == f"reports/{spec['name']}/certificate.json"
    runs = _runs(wf)
    order = ['.venv/bin/pytest --model-spec "$SPEC"', '-m harness verify "$CERTIFICATE" --spec "$SPEC"',
             '-m harness.ci_select --gate "$CERTIFICATE"', "GITHUB_STEP_SUMMARY"]
    positions = [runs.find(marker) for marker in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") for _j, s in _steps(wf))
    assert "cpu-24g" in yaml.safe_load(ACTIONLINT_CONFIG.read_text())["self-hosted-runner"]["labels"]
