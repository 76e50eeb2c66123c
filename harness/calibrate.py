"""`python -m harness calibrate --model NAME`: measure the noise floor the logit bounds rest on.

Over a grid of reference checkpoints (seeds x initializer_range of the spec's reference config) it measures,
in the logit judge's own metrics (harness.checks.logits: same decisive margins, same worst-of-sets rule):
  - HF bf16 vs HF fp32 on the same fp32 checkpoint (what a certification run calibrates bf16 bounds on),
    per prompt set, so the prompt-length dependence shows;
  - Megatron TP1 vs HF fp32 (and bf16), where megatron-core imports and the spec claims it;
  - run-to-run nondeterminism: the same forward twice, per backend and dtype.
It writes model_specs/calibration/<name>.json (what specs and bound records cite as evidence) with suggested
bounds and the rule behind each, reads self-test results when there are some, and prints a table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .tolerances import BOUND_METRICS, LOGIT_METRICS

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_INIT_RANGES = (0.02, 0.1)
METRICS = {key: BOUND_METRICS[key] for key in LOGIT_METRICS}  # tolerance key -> (metric, upper)


def _numbers(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"harness calibrate: {what}: {text!r} is not a comma list of numbers") from None
    if not values:
        raise SystemExit(f"harness calibrate: {what}: empty list")
    return values


class Runner:
    """The backends as a certification run drives them: one worker per backend, on the run's device."""

    def __init__(self, spec, device, backends: list[str]):
        from .backends import backend_class
        from .workers import WorkerPool

        self.spec, self.device = spec, device
        self.pool = WorkerPool(device.kind, {"CUDA_VISIBLE_DEVICES": ""} if device.hide_gpus else None)
        self.tmp = tempfile.TemporaryDirectory(prefix="harness-calibrate-")
        self.skipped: dict[str, str] = {}
        for name in backends:
            cls = backend_class(name)
            why = None if cls is not None else "no such backend"
            if name == "megatron" and "megatron" not in spec.backends.train:
                why = "the spec does not claim megatron"
            why = why or cls.unavailable() or cls.device_unavailable(device.kind)
            if why:
                self.skipped[name] = why
        self.count = 0

    def call(self, backend: str, op: str, **args) -> dict[str, Any]:
        worker = self.pool.get(backend, str(self.spec.source))
        return worker.call(op, args, timeout=self.spec.worker_timeout_s)

    def path(self, name: str) -> str:
        self.count += 1
        return str(Path(self.tmp.name) / f"{self.count:03d}-{name}")

    def materialize(self, seed: int, init: float | None) -> str:
        ref = self.spec.reference
        overrides = dict(ref.config) if init is None else {**ref.config, "initializer_range": init}
        path = str(self.spec.resolve_relative(ref.path)) if ref.path else None
        return self.call("hf", "materialize", model_type=self.spec.hf_model_type, overrides=overrides, seed=seed,
                         dtype="float32", path=path)["dir"]

    def hf(self, ref_dir: str, dtype: str, prompts) -> str:
        return self.call("hf", "logprobs", dir=ref_dir, dtype=dtype, prompts=prompts,
                         out_path=self.path(f"hf-{dtype}.safetensors"))["path"]

    def megatron(self, ref_dir: str, prompts) -> dict[str, str]:
        run = self.call("megatron", "logprobs", dir=ref_dir, dtypes=["float32", "bfloat16"], tp=1, pp=1,
                        prompts=prompts, out_dir=self.path("megatron"))
        problems = run["conversion_problems"] + run["load_problems"]
        if problems:
            raise RuntimeError(f"megatron TP1 conversion/load problems: {problems[0]}")
        return run["files"]

    def close(self) -> None:
        self.pool.close()
        self.tmp.cleanup()


def _prompts(ref_dir: str) -> dict[str, list[list[int]]]:
    from fixtures.prompts import prompt_sets

    return prompt_sets(json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"])


def _set_summary(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("positions", "max_abs_logprob", "mean_abs_logprob", "mean_exp_abs_logprob", "top1_agreement",
            "decisive_positions", "worst_position", "per_position_max_abs")
    return {k: m[k] for k in keep}


def measure_variant(runner: Runner, seed: int, init: float | None) -> dict[str, Any]:
    """One grid checkpoint: HF bf16 noise per prompt set, and Megatron TP1 (fp32, bf16) against HF fp32."""
    from .checks import logits
    from .metrics import load
    from .tolerances import resolve

    ref_dir = runner.materialize(seed, init)
    prompts = _prompts(ref_dir)
    truth, noisy = load(runner.hf(ref_dir, "float32", prompts)), load(runner.hf(ref_dir, "bfloat16", prompts))
    margins = logits.min_margins(prompts, truth, noisy)
    per_set = logits.compare(truth, noisy, prompts, margins)
    calibration = logits.noise_calibration(truth, noisy, prompts, margins, "2 x HF-bf16 vs HF-fp32 noise, same prompts")
    out: dict[str, Any] = {"seed": seed, "initializer_range": init, "ref_dir": ref_dir, "prompts": prompts,
                           "noise": calibration.noise, "per_set": {n: _set_summary(m) for n, m in per_set.items()}}
    if "megatron" not in runner.skipped:
        files = runner.megatron(ref_dir, prompts)
        fp32 = logits.compare(truth, load(files["float32"]), prompts, logits.min_margins(prompts, truth, None))
        bf16 = logits.compare(truth, load(files["bfloat16"]), prompts, margins)
        bound = resolve("bfloat16", None, LOGIT_METRICS, calibration)  # the bound this run would judge by
        out["megatron_fp32"] = logits.worst(fp32)
        out["megatron_bf16"] = logits.worst(bf16)
        out["megatron_bf16_fraction"] = {key: out["megatron_bf16"][metric] / bound[key]
                                         for key, (metric, upper) in METRICS.items()
                                         if upper and out["megatron_bf16"][metric] is not None and bound[key] > 0}
        out["megatron_files"] = files
    out["hf_files"] = None  # filled by nondeterminism() for the spec's own checkpoint
    return out


def _max_diff(a: str, b: str) -> float:
    from .metrics import load

    first, second = load(a), load(b)
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)


def nondeterminism(runner: Runner, variant: dict[str, Any]) -> dict[str, Any]:
    """The same forward twice on the spec's own checkpoint: max |Δ| between the runs' log-probs."""
    out: dict[str, Any] = {"how": "the same forward twice on the spec's reference checkpoint, every prompt set; "
                                  "HF in one worker process, Megatron TP1 in fresh rank processes per run"}
    ref_dir, prompts = variant["ref_dir"], variant["prompts"]
    out["hf"] = {dtype: {"max_abs_diff": _max_diff(runner.hf(ref_dir, dtype, prompts),
                                                   runner.hf(ref_dir, dtype, prompts))}
                 for dtype in ("float32", "bfloat16")}
    if "megatron" in runner.skipped:
        out["megatron_tp1"] = {"not_run": runner.skipped["megatron"]}
    else:
        again = runner.megatron(ref_dir, prompts)
        out["megatron_tp1"] = {dtype: {"max_abs_diff": _max_diff(variant["megatron_files"][dtype], again[dtype])}
                               for dtype in ("float32", "bfloat16")}
    return out


def versions() -> dict[str, str]:
    import importlib.metadata

    from .backends import package_versions

    out = package_versions(("torch", "transformers", "safetensors", "megatron-core"))
    try:
        out["harness"] = importlib.metadata.version("certify-harness")
    except importlib.metadata.PackageNotFoundError:
        out["harness"] = "not installed"
    return out


def calibrate(spec, seeds: list[int], inits: list[float], backends: list[str], device, progress=print,
              selftest: Path | None = None, command: str = "") -> dict[str, Any]:
    from . import device as devices
    from .calibrate_summary import compose

    own = (spec.reference.seed, spec.reference.config.get("initializer_range"))
    if spec.reference.path is not None:  # a real checkpoint: one reference, nothing to vary
        grid = [(spec.reference.seed, None)]
    else:
        grid = list(dict.fromkeys([*itertools.product(seeds, inits), own]))
    runner = Runner(spec, device, backends)
    try:
        for name, why in runner.skipped.items():
            progress(f"[{spec.name}] {name}: not run ({why})")
        variants = []
        for seed, init in grid:
            variants.append(measure_variant(runner, seed, init))
            v = variants[-1]
            progress(f"[{spec.name}] seed {seed} initializer_range {init}: HF bf16 noise max |Δlogprob| "
                     f"{v['noise']['max_abs_logprob']:.4g}"
                     + (f", megatron TP1 fp32 {v['megatron_fp32']['max_abs_logprob']:.3g}" if "megatron_fp32" in v
                        else ""))
        spec_variant = variants[grid.index(own)] if own in grid else variants[-1]
        nondet = nondeterminism(runner, spec_variant)
    finally:
        runner.close()
    grid_info = {"seeds": sorted({s for s, _ in grid}),
                 "initializer_range": sorted({i for _, i in grid if i is not None}),
                 "variants": [{"seed": s, "initializer_range": i} for s, i in grid],
                 "spec_reference": {"seed": own[0], "initializer_range": own[1]},
                 "real_checkpoint": spec.reference.path is not None}
    return compose(spec, variants, spec_variant, nondet, grid_info, runner.skipped, selftest,
                   meta={"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "command": command, "versions": versions(), "device": devices.record(device)})


def main(argv: list[str] | None = None) -> int:
    from . import device as devices
    from .calibration import CALIBRATION_DIR, display_path
    from .calibrate_summary import table
    from .errors import SpecError, WorkerError
    from .spec import load_spec, spec_path_for

    parser = argparse.ArgumentParser(prog="python -m harness calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="model_specs/NAME.yaml")
    where.add_argument("--model-spec", type=Path, help="a spec file anywhere")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the JSON (default: model_specs/calibration/<name>.json)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma list (default 0-4)")
    parser.add_argument("--init-ranges", default=",".join(map(str, DEFAULT_INIT_RANGES)),
                        help="comma list of initializer_range values (default 0.02,0.1)")
    parser.add_argument("--backends", default="hf,megatron",
                        help="hf alone, or hf,megatron (default; megatron is skipped, saying why, where it cannot run)")
    parser.add_argument("--selftest", type=Path, default=None,
                        help="a self-test --out folder (default: reports/selftest/<name>/ when it exists)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="as pytest's --device")
    args = parser.parse_args(argv)
    seeds = _numbers(args.seeds, int, "--seeds")
    inits = _numbers(args.init_ranges, float, "--init-ranges")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "hf" not in backends or set(backends) - {"hf", "megatron"}:
        print(f"harness calibrate: --backends {args.backends!r}: hf is required, megatron optional", file=sys.stderr)
        return 2
    try:
        device = devices.select(args.device)
        spec = load_spec(args.model_spec or spec_path_for(args.model))
        out = args.out or CALIBRATION_DIR / f"{spec.name}.json"
        command = "python -m harness calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
        data = calibrate(spec, seeds, inits, backends, device, selftest=args.selftest, command=command.strip())
    except SpecError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 4
    except devices.DeviceError as exc:
        print(f"harness calibrate: {exc}", file=sys.stderr)
        return 4
    except WorkerError as exc:
        print(f"harness calibrate: a backend worker failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as exc:  # conversion problems, a malformed self-test results file
        print(f"harness calibrate: {exc}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    print(f"wrote {display_path(out)}")
    return 0
