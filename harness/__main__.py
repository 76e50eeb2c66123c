"""Command line: `python -m harness {schema,validate,list,convert,verify,backends,device,self-test,calibrate}`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import SpecError
from .spec import SPECS_DIR, json_schema, known_model_names, load_spec

SCHEMA_PATH = SPECS_DIR / "spec.schema.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["self-test"]:  # its own parser (harness/selftest): the catalogue runner
        from .selftest import main as self_test

        return self_test(argv[1:])
    if argv[:1] == ["calibrate"]:  # its own parser (harness/calibrate.py): the noise-floor measurement
        from .calibrate import main as calibrate

        return calibrate(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    schema = sub.add_parser("schema", help="print the spec JSON Schema (or --write it to model_specs/)")
    schema.add_argument("--write", action="store_true")
    validate = sub.add_parser("validate", help="validate spec files, importing their plugins")
    validate.add_argument("specs", nargs="+", type=Path)
    sub.add_parser("list", help="list the models in model_specs/")
    sub.add_parser("self-test", help="plant the catalogue's bugs in a copy of a model's spec and certify each "
                                     "(python -m harness self-test --help)")
    sub.add_parser("calibrate", help="measure the noise floor and write model_specs/calibration/<name>.json "
                                     "(python -m harness calibrate --help)")
    convert = sub.add_parser("convert", help="convert a checkpoint HF <-> Megatron-core shards (streaming)",
                             description="Streams tensors one at a time: memory stays near the largest tensor.")
    convert.add_argument("--to", choices=("mcore", "hf"), required=True,
                         help="mcore: HF checkpoint -> pp{p}_tp{t}.safetensors + harness_layout.json; "
                              "hf: back to config.json + model.safetensors")
    convert.add_argument("--tp", type=int, default=None, help="tensor-parallel size (--to mcore; default 1)")
    convert.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (--to mcore; default 1)")
    convert.add_argument("--ep", type=int, default=None, help="expert-parallel size (--to mcore, MoE; default 1): "
                                                             "files pp{p}_tp{t}_ep{e}.safetensors")
    convert.add_argument("--template", default=None, help="converter template (default: the config's model_type)")
    convert.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                         help="import this plugin first (e.g. one that registers a template); repeatable")
    convert.add_argument("in_dir", type=Path)
    convert.add_argument("out_dir", type=Path)
    from . import verify

    verify.add_arguments(sub.add_parser("verify", help="check certificate.json files against the schema and "
                                                        "their own checks (exit 1 if any is invalid)"))
    backends = sub.add_parser("backends", help="which backends import on this machine, and why not")
    backends.add_argument("--require", default="", metavar="A,B",
                          help="exit 1 naming each of these backends that does not import (CI: what it must run)")
    device = sub.add_parser("device", help="the device a certification run would use here (--device/CERTIFY_DEVICE, "
                                           "CERTIFY_GPUS), as the certificate records it")
    device.add_argument("--device", default=None, choices=("cpu", "cuda"), help="as pytest's --device")
    device.add_argument("--require-gpus", type=int, default=None, metavar="N",
                        help="exit 1 unless the run may use N CUDA GPUs (a GPU runner checking its label)")
    args = parser.parse_args(argv)

    if args.command == "schema":
        if args.write:
            SCHEMA_PATH.write_text(json_schema())
            print(f"wrote {SCHEMA_PATH}")
        else:
            sys.stdout.write(json_schema())
        return 0
    if args.command == "convert":
        from .convert.stream import run

        return run(args)
    if args.command == "verify":
        return verify.run(args)
    if args.command == "backends":
        return _backends([b for b in args.require.split(",") if b.strip()])
    if args.command == "device":
        return _device(args.device, args.require_gpus)
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


def _backends(required: list[str]) -> int:
    from .backends import ALL_BACKENDS, backend_class

    missing = []
    for name in ALL_BACKENDS:
        problem = backend_class(name).import_problem()
        print(f"{name:10} {'ok' if problem is None else problem}")
        if problem is not None and name in required:
            missing.append(f"{name} ({problem})")
    unknown = sorted(set(required) - set(ALL_BACKENDS))
    if unknown or missing:
        print(f"required backends missing: {', '.join(missing + [f'{u} (unknown backend)' for u in unknown])}",
              file=sys.stderr)
        return 1
    return 0


def _device(requested: str | None, require_gpus: int | None) -> int:
    import json

    from . import device as devices

    try:
        chosen = devices.select(requested)
    except devices.DeviceError as exc:
        print(f"harness device: {exc}", file=sys.stderr)
        return 4
    record = devices.record(chosen)
    print(devices.describe(record))
    print(json.dumps(record, sort_keys=True))
    if require_gpus is not None and (not chosen.cuda or chosen.gpus < require_gpus):
        print(f"harness device: {require_gpus} CUDA GPUs required, {chosen.gpus} usable here", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
