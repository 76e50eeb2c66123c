"""Benchmark (bench item d): the same Megatron TP2xPP2 job through the local executor and through Ray.

    .venv/bin/python bench/ray_executor.py [--job logprobs|train] [--rounds 1]

The tiny qwen2 spec's reference (fp32) is materialised first (not timed). Then, interleaved for
--rounds rounds, each executor gets a fresh Megatron worker and runs the job twice:
  cold: worker start + the first job (Ray: ray.init of a local instance, placement group, 4 actors),
  warm: the same job again in the same worker (Ray: the instance reused, fresh actors).
Printed side by side with the Ray / local ratio. The machine may be shared: every round is shown.
Not a test; CI does not run it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPEC = REPO / "model_specs" / "qwen2.yaml"


def _job(worker, job: str, ref_dir: str, sets: dict, out: str) -> None:
    from harness.train_step import STEPS

    if job == "train":
        worker.call("train", {"dir": ref_dir, "dtype": "float32", "tp": 2, "pp": 2, "steps": STEPS,
                              "sequences": sets["padded_batch"], "out_dir": out}, timeout=900)
    else:
        worker.call("logprobs", {"dir": ref_dir, "dtypes": ["float32"], "tp": 2, "pp": 2, "prompts": sets,
                                 "out_dir": out}, timeout=900)


def _measure(executor: str, job: str, ref_dir: str, sets: dict, tmp: str) -> tuple[float, float]:
    from harness.workers import Worker

    started = time.perf_counter()
    worker = Worker("megatron", str(SPEC), env={"CERTIFY_EXECUTOR": executor})
    try:
        _job(worker, job, ref_dir, sets, f"{tmp}/{executor}-cold")
        cold = time.perf_counter() - started
        started = time.perf_counter()
        _job(worker, job, ref_dir, sets, f"{tmp}/{executor}-warm")
        return cold, time.perf_counter() - started
    finally:
        worker.close()


def reference_dir() -> str:
    """The tiny qwen2 spec's fp32 reference, materialised by a real HF worker (not timed)."""
    from harness.spec import load_spec
    from harness.workers import Worker

    spec = load_spec(SPEC)
    hf = Worker("hf", str(SPEC))
    try:
        return hf.call("materialize", {"model_type": spec.hf_model_type, "overrides": spec.reference.config,
                                       "seed": spec.reference.seed, "dtype": "float32", "path": None})["dir"]
    finally:
        hf.close()


def measure(job: str = "logprobs", rounds: int = 1, echo=print) -> dict[str, list[tuple[float, float]]]:
    """(cold, warm) seconds per round for each executor, interleaved; `echo` gets one line per run."""
    from fixtures.prompts import prompt_sets
    from harness.spec import load_spec

    ref_dir = reference_dir()
    sets = prompt_sets(load_spec(SPEC).reference.config["vocab_size"])
    times: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    echo(f"megatron {job} TP2xPP2 fp32, tiny qwen2; seconds (cold = worker start + first job)")
    echo(f"{'round':>5} {'executor':>8} {'cold':>8} {'warm':>8}")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for round_ in range(rounds):
            for executor in times:
                cold, warm = _measure(executor, job, ref_dir, sets, f"{tmp}/{round_}")
                times[executor].append((cold, warm))
                echo(f"{round_:>5} {executor:>8} {cold:>8.1f} {warm:>8.1f}")
    return times


def medians(times: dict[str, list[tuple[float, float]]]) -> dict[str, list[float]]:
    """executor -> [median cold, median warm]."""
    return {e: [statistics.median(t[i] for t in rows) for i in (0, 1)] for e, rows in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("logprobs", "train"), default="logprobs")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    median = medians(measure(args.job, args.rounds, lambda line: print(line, flush=True)))
    print(f"median   local {median['local'][0]:.1f}s / {median['local'][1]:.1f}s, "
          f"ray {median['ray'][0]:.1f}s / {median['ray'][1]:.1f}s (cold / warm)")
    print(f"ratio ray/local: cold {median['ray'][0] / median['local'][0]:.2f}x, "
          f"warm {median['ray'][1] / median['local'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
