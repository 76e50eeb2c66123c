"""Command line: `python -m harness {schema,validate,list}`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import SpecError
from .spec import SPECS_DIR, json_schema, known_model_names, load_spec

SCHEMA_PATH = SPECS_DIR / "spec.schema.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    schema = sub.add_parser("schema", help="print the spec JSON Schema (or --write it to model_specs/)")
    schema.add_argument("--write", action="store_true")
    validate = sub.add_parser("validate", help="validate spec files, importing their plugins")
    validate.add_argument("specs", nargs="+", type=Path)
    sub.add_parser("list", help="list the models in model_specs/")
    args = parser.parse_args(argv)

    if args.command == "schema":
        if args.write:
            SCHEMA_PATH.write_text(json_schema())
            print(f"wrote {SCHEMA_PATH}")
        else:
            sys.stdout.write(json_schema())
        return 0
    if args.command == "list":
        for name in known_model_names():
            print(name)
        return 0
    from .spec_plugins import validate_environment

    status = 0
    for path in args.specs:
        try:
            validate_environment(load_spec(path))
            print(f"{path}: ok")
        except SpecError as exc:
            print(exc.one_line(), file=sys.stderr)
            status = 4
    return status


if __name__ == "__main__":
    sys.exit(main())
