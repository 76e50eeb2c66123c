"""`python -m harness verify CERT...`: is a certificate.json what the harness would have written?

A certificate is a contract: CI gates on it and the published reports show it. This re-checks what
can be checked without re-running anything:

- it is JSON and matches harness/certificate_schema.json (for its certificate_version);
- every check id is unique and is model/suite/backend[/variant][/dtype][/layout] of its own fields;
- the verdict is the one harness.certificate.verdict_of derives from the checks;
- a "passed" check's recorded metrics are within its recorded tolerance, where a tolerance key
  names a top-level numeric metric unambiguously (see `tolerance_violations`);
- with --spec, the spec file's sha256 is the one recorded.

One line per certificate, "OK <path>: <verdict>" or "INVALID <path>: <reason>"; exit 0 if all are OK.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from .certificate import CERTIFICATE_VERSION, verdict_of

SCHEMA_PATH = Path(__file__).resolve().parent / "certificate_schema.json"


class Invalid(Exception):
    """A certificate that fails verification; str() is the one-line reason."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


def _where(path) -> str:
    return "/".join(str(p) for p in path) or "(top level)"


def check_schema(cert: Any) -> None:
    if isinstance(cert, dict) and "certificate_version" in cert and cert["certificate_version"] != CERTIFICATE_VERSION:
        raise Invalid(f"unsupported certificate_version {cert['certificate_version']!r} "
                      f"(this harness reads version {CERTIFICATE_VERSION})")
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(cert))
    if error is not None:
        message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
        raise Invalid(f"schema: {_where(error.absolute_path)}: {message}")


def expected_id(cert: dict[str, Any], check: dict[str, Any]) -> str:
    parts = [cert["model"], check["suite"], check["backend"], check["variant"], check["dtype"], check["layout"]]
    return "/".join(p for p in parts if p)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(key: str, metrics: dict[str, Any]) -> tuple[str, bool] | None:
    """The metric a tolerance key bounds and whether it is an upper bound, or None if that is not clear.

    - "max_X" / "min_X": metric "max_X" / "min_X" itself if recorded, else "X" (upper / lower bound);
    - a key that is itself a recorded metric name: an upper bound (the harness's tolerances are upper
      bounds unless named min_...);
    - "<prefix>_max_X" / "<prefix>_min_X" (e.g. roundtrip_max_abs_diff): the one recorded metric
      "max_X" / "min_X" it ends with, if exactly one does.
    Anything else (a tolerance on a nested or unrecorded count) is not judged here.
    """
    for prefix, upper in (("max_", True), ("min_", False)):
        if key.startswith(prefix):
            for name in (key, key[len(prefix):]):
                if name in metrics:
                    return name, upper
            return None
    if key in metrics:
        return key, True
    suffixed = [m for m in metrics if m.startswith(("max_", "min_")) and key.endswith("_" + m)]
    if len(suffixed) == 1:
        return suffixed[0], suffixed[0].startswith("max_")
    return None


def tolerance_violations(check: dict[str, Any]) -> list[str]:
    """For a check's recorded metrics and tolerance: the bounds that the metrics break (numeric pairs only)."""
    metrics, tolerance = check.get("metrics") or {}, check.get("tolerance") or {}
    problems = []
    for key, bound in tolerance.items():
        match = _bound(key, metrics)
        if match is None or not _number(bound):
            continue
        name, upper = match
        value = metrics[name]
        if not _number(value):
            continue
        if math.isnan(value) or (value > bound if upper else value < bound):
            problems.append(f"{name} = {value!r} {'>' if upper else '<'} {key} {bound!r}")
    return problems


def check_consistency(cert: dict[str, Any]) -> None:
    seen: set[str] = set()
    for check in cert["checks"]:
        if check["id"] in seen:
            raise Invalid(f"duplicate check id {check['id']!r}")
        seen.add(check["id"])
        if check["id"] != expected_id(cert, check):
            raise Invalid(f"check id {check['id']!r} does not match its fields ({expected_id(cert, check)!r})")
    derived = verdict_of(cert["checks"])
    if cert["verdict"] != derived:
        counts: dict[str, int] = {}
        for check in cert["checks"]:
            counts[check["status"]] = counts.get(check["status"], 0) + 1
        shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no checks"
        raise Invalid(f"verdict {cert['verdict']!r} but the checks ({shown}) give {derived!r}")
    for check in cert["checks"]:
        if check["status"] == "passed":
            problems = tolerance_violations(check)
            if problems:
                raise Invalid(f"check {check['id']!r} is passed but {'; '.join(problems)}")


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
    check_consistency(cert)
    if spec is not None:
        check_spec(cert, spec)
    return cert


def check_spec(cert: dict[str, Any], spec: Path) -> None:
    try:
        actual = spec_sha256(spec)
    except OSError as exc:
        raise Invalid(f"cannot read spec {spec}: {exc.strerror or exc}") from None
    if actual != cert["spec_sha256"]:
        raise Invalid(f"spec_sha256 {cert['spec_sha256'][:16]}… is not the sha256 of {spec} ({actual[:16]}…)")


def _spec_name(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_bytes())
    except (OSError, yaml.YAMLError):
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
            print(f"OK {path}: {cert['verdict']}")
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
