"""CI helpers: which models a change touches, and whether a certificate may pass the CPU PR gate.

    python -m harness.ci_select --base origin/main       # models touched by REV...HEAD, space-separated
    python -m harness.ci_select --gate reports/*/certificate.json   # exit 1 unless it verifies and its CPU scope passed

Both are pure functions underneath (`select_models`, `gate`) so the workflow's decisions are tested.
"""
from __future__ import annotations

import argparse
import os
import posixpath
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = "model_specs"

# A change here can change any model's certificate.
EVERY_MODEL_PREFIXES = ("harness/", "suites/", "fixtures/")
EVERY_MODEL_FILES = {"pyproject.toml", "Makefile", f"{SPECS_DIR}/spec.schema.json", "harness/templates/__init__.py",
                     ".github/workflows/pr-gate.yml"}
TEMPLATES_DIR = "harness/templates/"
DOC_SUFFIXES = (".md", ".rst")
DOC_PREFIXES = ("docs/",)
DOC_FILES = {"LICENSE", "reports/README.md"}

# backend -> suites of it that run on a CPU runner (None: every suite). The PR gate fails on
# these; the others (GPU engines) are certified by gpu.yml and only reported here.
def _norm(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return posixpath.normpath(path) if path else path


def _spec_path(name: str, spec: dict[str, Any]) -> str:
    return _norm(spec.get("_path") or f"{SPECS_DIR}/{name}.yaml")


def _is_file_plugin(entry: str) -> bool:  # the same rule as harness.spec_plugins
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def _module_paths(module: str) -> tuple[str, str]:
    """A module name's file and package folder, relative to the repo (harness.templates.qwen2 ->
    harness/templates/qwen2.py, harness/templates/qwen2/)."""
    base = module.replace(".", "/")
    return f"{base}.py", f"{base}/"


def spec_files(name: str, spec: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Repo-relative (files, folders) a spec depends on besides the shared harness: its own file,
    its plugins, its converter template (built-ins live in harness/templates/) and its reference checkpoint."""
    path = _spec_path(name, spec)
    here = posixpath.dirname(path)
    files, folders = {path}, set()
    for entry in spec.get("plugins") or []:
        if not isinstance(entry, str):
            continue
        if _is_file_plugin(entry):
            files.add(_norm(posixpath.join(here, entry.replace("\\", "/"))))
        else:
            module_file, package = _module_paths(entry)
            files.add(module_file)
            folders.add(package)
    converter = spec.get("converter") if isinstance(spec.get("converter"), dict) else {}
    template = converter.get("template") or spec.get("hf_model_type")
    if isinstance(template, str) and template:
        module_file, package = _module_paths(f"harness.templates.{template}")
        files.add(module_file)
        folders.add(package)
    calibration = spec.get("calibration")  # cited by the certificate: a new one changes its evidence
    files.add(_norm(posixpath.join(here, calibration)) if isinstance(calibration, str)
              else f"{SPECS_DIR}/calibration/{name}.json")
    reference = spec.get("reference") if isinstance(spec.get("reference"), dict) else {}
    if isinstance(reference.get("path"), str):
        folders.add(_norm(posixpath.join(here, reference["path"])) + "/")
    return files, folders


def _is_doc(path: str) -> bool:
    return path in DOC_FILES or path.endswith(DOC_SUFFIXES) or path.startswith(DOC_PREFIXES)


def select_models(changed_paths: list[str], specs: dict[str, dict[str, Any]]) -> tuple[list[str], str]:
    """The models (sorted) whose certificates `changed_paths` can change, and why, in one line.

    `specs` maps a model name to its parsed spec YAML; an optional "_path" key gives the spec's
    repo-relative path (default model_specs/<name>.yaml), which relative plugin paths resolve against.
    """
    every = sorted(specs)
    deps = {name: spec_files(name, spec) for name, spec in specs.items()}
    chosen: set[str] = set()
    why: list[str] = []
    wide: list[str] = []
    for raw in changed_paths:
        path = _norm(raw)
        if not path or _is_doc(path):  # documentation never changes a certificate
            continue
        if path in EVERY_MODEL_FILES or (path.startswith(EVERY_MODEL_PREFIXES) and not path.startswith(TEMPLATES_DIR)):
            wide.append(path)
            continue
        users = sorted(name for name, (files, folders) in deps.items()
                       if path in files or any(path.startswith(folder) for folder in folders))
        if users:
            chosen.update(users)
            why.append(f"{path} -> {', '.join(users)}")
        # everything else (docs, tests/, .ci/, other workflows, unused templates or plugins) touches no model
    if wide:
        shown = ", ".join(wide[:3]) + (f" (+{len(wide) - 3} more)" if len(wide) > 3 else "")
        return every, f"every model: shared harness files changed ({shown})"
    if not chosen:
        docs = [p for p in map(_norm, changed_paths) if p and _is_doc(p)]
        if changed_paths and len(docs) == len([p for p in changed_paths if _norm(p)]):
            return [], "no model: documentation-only change"
        return [], "no model: no spec, plugin, template or shared harness file changed"
    return sorted(chosen), "; ".join(why)


def load_specs(root: Path = REPO_ROOT) -> dict[str, dict[str, Any]]:
    """model_specs/*.yaml as plain dicts keyed by model name (the file stem, as `make certify MODEL=` takes it).

    Read as raw YAML, not validated: a broken spec is still selected, and its certification then fails loudly.
    """
    import yaml

    from .spec_yaml import load_yaml

    specs: dict[str, dict[str, Any]] = {}
    for path in sorted((root / SPECS_DIR).glob("*.yaml")):
        try:
            data = load_yaml(path.read_text())
        except (OSError, yaml.YAMLError):
            data = None
        spec = dict(data) if isinstance(data, dict) else {}
        spec["_path"] = path.relative_to(root).as_posix()
        specs[path.stem] = spec
    return specs


def changed_files(base: str, root: Path = REPO_ROOT) -> list[str]:
    """Paths changed between the merge base of `base` and HEAD (both sides of a rename)."""
    out = subprocess.run(["git", "diff", "--name-only", "--no-renames", f"{base}...HEAD"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def gate(certificate: dict[str, Any]) -> tuple[bool, str]:
    """Whether a touched model's certificate passes the CPU PR gate, and a one-line message.

    Evidence or nothing: every check a CPU runner can run (scope "cpu", declared by its backend) must
    have passed or be not_applicable by design; a not_run or error row fails the gate as surely as a
    failed one (a backend that did not install leaves not_run rows behind), and so does a failed
    resource bound (`peak_rss_bound`). GPU-scope rows are left to gpu.yml and named in the message.
    """
    model = certificate.get("model", "?")
    checks = certificate.get("checks") or []
    cpu = [c for c in checks if c.get("scope") == "cpu"]
    if not cpu:
        return False, f"{model}: no CPU-scope checks in the certificate: nothing was proven here"
    bad = [c for c in cpu if c.get("status") not in ("passed", "not_applicable")]
    if bad:
        first = bad[0]
        reason = (first.get("reason") or "").strip().splitlines()[0:1]
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        return False, (f"{model}: {len(bad)} CPU check(s) without a pass: {first.get('id')} "
                       f"{first.get('status')}{': ' + reason[0][:200] if reason else ''}{more}")
    bound = (certificate.get("resources") or {}).get("bound") or {}
    if bound.get("status") == "failed":  # the spec's peak-RSS bound is judged on this CPU run too
        return False, f"{model}: peak RSS over the spec's bound: {bound.get('reason', '')}"
    gpu = [c for c in checks if c.get("scope") == "gpu" and c.get("status") != "passed"]
    note = f"; {len(gpu)} GPU-scope check(s) left to gpu.yml" if gpu else ""
    return True, f"{model}: CPU scope certified ({len(cpu)} checks){note} — {certificate.get('summary', '')}"


def _write_output(name: str, value: str) -> None:
    target = os.environ.get("GITHUB_OUTPUT")
    if target:
        with open(target, "a") as handle:
            handle.write(f"{name}={value}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.ci_select", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--base", metavar="REV", help="print the models touched by `git diff REV...HEAD`")
    mode.add_argument("--gate", nargs="+", type=Path, metavar="CERTIFICATE",
                      help="exit 1 unless every certificate verifies and every CPU-scope check passed")
    args = parser.parse_args(argv)

    if args.base is not None:
        try:
            paths = changed_files(args.base)
        except subprocess.CalledProcessError as exc:
            print(f"git diff {args.base}...HEAD failed: {exc.stderr.strip()}", file=sys.stderr)
            return 2
        models, reason = select_models(paths, load_specs())
        print(" ".join(models))
        print(reason, file=sys.stderr)
        _write_output("models", " ".join(models))
        _write_output("reason", " ".join(reason.split()))
        return 0

    from .verify import Invalid, verify

    status = 0
    for path in args.gate:
        try:
            cert = verify(path)  # a certificate that does not verify proves nothing, whatever its rows say
        except Invalid as exc:
            print(f"FAIL {path}: the certificate does not verify: {exc}")
            status = 1
            continue
        ok, message = gate(cert)
        print(f"{'PASS' if ok else 'FAIL'} {message}")
        status |= 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
