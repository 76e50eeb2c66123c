"""`python -m harness self-test --model NAME`: does the harness catch the bugs real projects hit, on this model?

For every entry of the catalogue (catalogue.yaml, plus entries a spec's plugins add with `add_mutation`):
plant the bug in a copy of the model's spec (its template, a plugin, or a spec key), certify the entry's
selection of the plan in a subprocess exactly as a user would, and read the certificate. The unmutated
spec is certified on every selection first: a failure there is a false alarm. Printed as a table:
mutation -> the checks that caught it -> bug margin (the failed metric / its bound). Exit 0 only when
there is no false alarm and every applicable mutation was caught.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CATALOGUE = HERE / "catalogue.yaml"
PLUGINS = HERE / "plugins"
EXTRA: list[dict[str, Any]] = []  # mutations a spec's plugins add


def add_mutation(entry: dict[str, Any]) -> None:
    """For a spec's plugins: one more catalogue entry (the keys of catalogue.yaml's mutations)."""
    missing = {"name", "what", "selection", "expect"} - set(entry)
    if missing:
        raise ValueError(f"a self-test mutation needs {sorted(missing)}")
    EXTRA.append(dict(entry))


def catalogue() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from ..spec_yaml import load_yaml

    data = load_yaml(CATALOGUE.read_bytes())
    return data["selections"], data["mutations"] + EXTRA


@dataclass
class Result:
    mutation: str
    what: str
    selection: str
    status: str  # caught | missed | not_applicable | not_run | false_alarm | passed (the baseline)
    caught_by: list[str] = field(default_factory=list)
    margin: float | str | None = None
    detail: str = ""
    seconds: float = 0.0
    # which bound gave the margin (check, key, metric, dtype, value, bound): calibrate derives bf16 visibility
    margin_from: dict[str, Any] | None = None
    localization: str = ""  # where the first localized failed row says the model first diverges


def _ratios(rows: list[dict[str, Any]]):
    """(metric / bound, where it came from) for every numeric bound of the rows."""
    for row in rows:
        for key, bound in (row.get("tolerance") or {}).items():
            value, limit = (row.get("metrics") or {}).get(bound.get("metric")), bound.get("value")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not isinstance(limit, (int, float)):
                continue
            if bound.get("upper", True):
                ratio = value / limit if limit > 0 else (math.inf if value > 0 else 0.0)
            else:
                ratio = (1 - value) / (1 - limit) if limit < 1 else (math.inf if value < limit else 0.0)
            yield ratio, {"check": row.get("id"), "key": key, "metric": bound.get("metric"),
                          "dtype": row.get("dtype"), "value": value, "bound": limit, "upper": bound.get("upper", True)}


def margin_source(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The bound that gave margin_of's finite margin (None when the margin is not a finite ratio)."""
    finite = [(ratio, where) for ratio, where in _ratios(rows) if not math.isinf(ratio) and ratio > 1]
    return max(finite, key=lambda item: item[0])[1] if finite else None


def margin_of(rows: list[dict[str, Any]]) -> float | str | None:
    """The largest finite metric / bound among the failed rows' broken bounds ('structural' for count checks).

    A lower bound of 1 (an agreement rate that must be exact) gives an infinite ratio; that is shown only
    when no finite ratio exists."""
    finite, infinite = [], False
    for ratio, _where in _ratios(rows):
        if math.isinf(ratio):
            infinite = True
        elif ratio > 1:
            finite.append(ratio)
    if finite:
        return max(finite)
    if infinite:
        return math.inf
    return "structural" if rows else None


def _absolute_plugins(entries: list[str], base: Path) -> list[str]:
    return [str((base / e).resolve()) if e.endswith(".py") or "/" in e else e for e in entries]


def mutated_spec(spec, selection: dict[str, Any], name: str, mutation: dict[str, Any] | None, folder: Path) -> Path:
    """A copy of the spec restricted to `selection`, with the mutation planted; its path."""
    from ..spec import load_yaml

    data = load_yaml(spec.text.encode())
    base = spec.source.parent
    data["name"] = name
    data.pop("calibration", None)  # the file calibrates the model, not a renamed mutant copy of its spec
    data["plugins"] = _absolute_plugins(list(data.get("plugins") or []), base)
    for engine, options in (data.get("engines") or {}).items():
        options["plugins"] = _absolute_plugins(list(options.get("plugins") or []), base)
        if options.get("custom_module_map"):
            options["custom_module_map"] = str((base / options["custom_module_map"]).resolve())
    if (data.get("reference") or {}).get("path"):
        data["reference"]["path"] = str((base / data["reference"]["path"]).resolve())
    data["backends"] = {"train": [b for b in selection["backends"]["train"] if b in spec.backends.train],
                        "infer": [b for b in selection["backends"]["infer"] if b in spec.backends.infer]}
    data["dtypes"] = [d for d in selection["dtypes"] if d in spec.dtypes] or selection["dtypes"]
    data["parallel"] = selection["parallel"]
    if mutation and "template" in mutation:
        template = spec.template_name
        mutant = f"{template}-selftest-{mutation['name']}"
        plugin = folder / "selftest_mutation.py"
        plugin.write_text("# written by harness self-test\nfrom harness.selftest.mutations import register_mutant\n\n"
                          f"register_mutant({template!r}, {mutant!r}, {mutation['template']!r})\n")
        data["plugins"].append(str(plugin))
        data.setdefault("converter", {})["template"] = mutant
    if mutation and "plugin" in mutation:
        data["plugins"].append(str(PLUGINS / mutation["plugin"]))
    for key, value in ((mutation or {}).get("spec") or {}).items():
        data[key] = {**(data.get(key) or {}), **value} if isinstance(value, dict) else value
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def certify(spec_path: Path, selection: dict[str, Any], report_dir: Path, timeout: float) -> dict[str, Any]:
    """The selection certified in a subprocess, as a user would run it; the certificate (or an error entry)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--model-spec", str(spec_path), "--report-dir", str(report_dir), "-k", selection["k"]]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(cmd, cwd=HERE.parent.parent, env=env, capture_output=True, text=True, timeout=timeout)
    from ..spec_yaml import load_yaml

    name = load_yaml(spec_path.read_bytes())["name"]
    cert_path = report_dir / name / "certificate.json"
    if not cert_path.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"error": f"no certificate (exit {proc.returncode}): {' | '.join(tail)}"}
    return json.loads(cert_path.read_text())


def _rows(cert: dict[str, Any], suites: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    rows = [c for c in cert.get("checks", []) if suites is None or c["suite"] in suites]
    return {status: [c for c in rows if c["status"] == status] for status in ("passed", "failed", "error")}


def _applicable(spec, selection: dict[str, Any], mutation: dict[str, Any]) -> str | None:
    """Why the mutation does not apply to this model (None when it does)."""
    needed = selection["backends"]["train"] + [b for b in selection["backends"]["infer"] if b != "hf"]
    absent = [b for b in needed if b not in spec.all_backends]
    if absent:
        return f"the spec does not claim {', '.join(absent)}"
    if "template" in mutation:
        from ..spec_plugins import resolve_template
        from .mutations import mutate

        _, why = mutate(resolve_template(spec), mutation["template"], hf_tensor_names(spec), hf_reference_config(spec))
        return why
    return None


def hf_reference_config(spec):
    """The reference model's HF config (what the template reads), without building the model."""
    from transformers import AutoConfig

    if spec.reference.path is not None:
        return AutoConfig.from_pretrained(str(spec.resolve_relative(spec.reference.path)))
    return AutoConfig.for_model(spec.hf_model_type, **spec.reference.config)


def hf_tensor_names(spec) -> set[str]:
    """The reference model's tensor names, without materialising it (meta device, or the checkpoint's headers)."""
    if spec.reference.path is not None:
        from safetensors import safe_open

        names: set[str] = set()
        for shard in sorted(spec.resolve_relative(spec.reference.path).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                names |= set(handle.keys())
        return names
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(spec.hf_model_type, **spec.reference.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return set(model.state_dict())


def _missing_backend(selection: dict[str, Any]) -> str | None:
    from ..backends import backend_class

    for name in selection["backends"]["train"] + selection["backends"]["infer"]:
        reason = backend_class(name).unavailable()
        if reason:
            return f"{name}: {reason}"
    return None


def run(spec, only: list[str] | None = None, timeout: float = 1800, progress=print) -> list[Result]:
    selections, mutations = catalogue()
    if only:
        unknown = sorted(set(only) - {m["name"] for m in mutations})
        if unknown:
            raise ValueError(f"no such mutation: {', '.join(unknown)}")
        mutations = [m for m in mutations if m["name"] in only]
    results, baselines = [], {}
    with tempfile.TemporaryDirectory(prefix="harness-selftest-") as tmp:
        tmp = Path(tmp)
        planned = []
        for m in mutations:
            why = _applicable(spec, selections[m["selection"]], m)
            if why:
                results.append(Result(m["name"], m["what"], m["selection"], "not_applicable", detail=why))
            else:
                planned.append(m)
        for sel_name in dict.fromkeys(m["selection"] for m in planned):  # the unmutated spec: no false alarm
            selection = selections[sel_name]
            missing = _missing_backend(selection)
            started = time.monotonic()
            if missing:
                baselines[sel_name] = Result("(none)", "the unmutated spec", sel_name, "not_run", detail=missing)
            else:
                folder = tmp / f"baseline-{sel_name}"
                folder.mkdir()
                cert = certify(mutated_spec(spec, selection, f"{spec.name}-st-baseline-{sel_name}", None, folder),
                               selection, tmp / "reports", timeout)
                rows = _rows(cert) if "error" not in cert else {}
                bad = rows.get("failed", []) + rows.get("error", [])
                status = "false_alarm" if bad or "error" in cert or not rows.get("passed") else "passed"
                baselines[sel_name] = Result("(none)", "the unmutated spec", sel_name, status,
                                             [c["id"] for c in bad], detail=cert.get("error", "") or
                                             "; ".join(c["reason"].splitlines()[0][:160] for c in bad[:2]))
            baselines[sel_name].seconds = round(time.monotonic() - started, 1)
            progress(_line(baselines[sel_name]))
        for m in planned:
            selection = selections[m["selection"]]
            started = time.monotonic()
            missing = _missing_backend(selection)
            if missing:
                result = Result(m["name"], m["what"], m["selection"], "not_run", detail=missing)
            else:
                folder = tmp / m["name"]
                folder.mkdir()
                cert = certify(mutated_spec(spec, selection, f"{spec.name}-st-{m['name']}", m, folder), selection,
                               tmp / "reports", timeout)
                if "error" in cert:
                    result = Result(m["name"], m["what"], m["selection"], "missed", detail=cert["error"])
                else:
                    failed = _rows(cert, m["expect"])["failed"]
                    result = Result(m["name"], m["what"], m["selection"], "caught" if failed else "missed",
                                    [c["id"] for c in failed], margin_of(failed),
                                    failed[0]["reason"].splitlines()[0][:200] if failed else
                                    f"no {'/'.join(m['expect'])} check failed", margin_from=margin_source(failed),
                                    localization=localization_of(cert))
            result.seconds = round(time.monotonic() - started, 1)
            results.append(result)
            progress(_line(result))
    return list(baselines.values()) + results


def localization_of(cert: dict[str, Any]) -> str:
    """'layer 0 attention (q before rope): <weights>' from the first failed row that localized its divergence."""
    for row in cert.get("checks", []):
        found = (row.get("localization") or {}).get("first_divergence") or {}
        if row.get("status") == "failed" and found.get("point"):
            where = f"layer {found['layer']} {found['submodule']}" if found.get("layer") is not None else found["submodule"]
            what = found.get("detail") or found.get("parameter", "")
            weights = ", ".join(w.rsplit(".", 2)[-2] + "." + w.rsplit(".", 1)[-1]
                                for w in found.get("megatron_weights") or found.get("hf_weights") or [])
            return f"{where} ({what})" + (f": {weights}" if weights else "")
        if row.get("status") == "failed" and (row.get("localization") or {}).get("status") == "localized":
            return row["localization"].get("summary", "")[:120]
    return ""


def _margin_text(margin) -> str:
    if isinstance(margin, float):
        return "inf" if math.isinf(margin) else f"{margin:.3g}x"
    return margin or ""


def _line(r: Result) -> str:
    caught = ", ".join(c.split("/", 1)[1] for c in r.caught_by[:3]) + (" …" if len(r.caught_by) > 3 else "")
    where = f"  -> {r.localization}" if r.localization else ""
    return (f"{r.mutation:24} {r.status:14} {_margin_text(r.margin):>10}  {caught or r.detail[:90]}{where}"
            f"  ({r.seconds:.0f} s)")


def table(results: list[Result]) -> str:
    lines = ["| mutation | selection | result | caught by | localized at | bug margin | detail |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        caught = ", ".join(f"`{c.split('/', 1)[1]}`" for c in r.caught_by[:4]) + (" …" if len(r.caught_by) > 4 else "")
        lines.append(f"| {r.mutation} ({r.what}) | {r.selection} | {r.status} | {caught} | {r.localization} | "
                     f"{_margin_text(r.margin)} | {r.detail[:160].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def ok(results: list[Result]) -> bool:
    return all(r.status in ("passed", "caught", "not_applicable") for r in results)


def main(argv: list[str] | None = None) -> int:
    from ..errors import SpecError
    from ..spec import load_spec, spec_path_for
    from ..spec_plugins import validate_environment

    parser = argparse.ArgumentParser(prog="python -m harness self-test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="model_specs/NAME.yaml")
    where.add_argument("--model-spec", type=Path, help="a spec file anywhere")
    parser.add_argument("--only", default="", help="comma list of mutation names (default: the whole catalogue)")
    parser.add_argument("--out", type=Path, default=None, help="write selftest.json and selftest.md here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per certification run")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.model_spec or spec_path_for(args.model))
        validate_environment(spec)  # imports the plugins: templates registered, extra mutations added
        results = run(spec, [o for o in args.only.split(",") if o.strip()], args.timeout)
    except SpecError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 4
    except ValueError as exc:
        print(f"harness self-test: {exc}", file=sys.stderr)
        return 2
    text = table(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "selftest.json").write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
        (args.out / "selftest.md").write_text(f"# self-test: {spec.name}\n\n{text}")
    caught = sum(r.status == "caught" for r in results)
    applicable = sum(r.status in ("caught", "missed", "not_run") for r in results)
    alarms = sum(r.status == "false_alarm" for r in results)
    print(f"{spec.name}: {caught}/{applicable} applicable mutations caught, {alarms} false alarm(s)")
    return 0 if ok(results) else 1
