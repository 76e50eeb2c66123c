"""Every benchmark of the harness in one command: the ratios measured side by side in one run, printed and
appended to bench/results.md with a description of the machine.

    .venv/bin/python bench/run.py [--only a,b,c,d] [--rounds 1] [--convert-rounds 3] [--full-tests] [--a-full-only]
                                  [--a-keep-report DIR] [--no-append]

(a) harness / bare backend scripts, goal <= 1.3x: bench/engines.py's comparison (the vLLM checks of the qwen2
    CPU certification through pytest against a bare vLLM script making the same engine calls; wall, vLLM worker
    busy and CPU ratios), then the whole qwen2 CPU certification against the sum of bare scripts making the same
    calls (bench/bare.py replays the run's HF, Megatron and DeepSpeed calls from CERTIFY_CALL_LOG; the bare vLLM
    script makes the vLLM ones).
(b) streaming HF -> Megatron conversion / a plain safetensors load + save of the same bytes, goal <= 1.5x on
    work time and peak RSS <= 3 x largest tensor + 1 GiB: bench/convert.py on the Qwen2-0.5B-shaped bf16
    checkpoint at TP1 and TP2xPP2, each in two regimes (warm source cache with the output left in the page
    cache; cold source cache with fsync'd output), and on an MoE shape (qwen2_moe) where the harness converts one.
(c) the harness's own tests at -n 2 vs -n 0, goal >= 1.6x on 2 cores: by default SUBSET (stated below),
    at -n 0, -n 2 --dist load and -n 2 --dist worksteal; --full-tests runs the whole tests/ folder instead
    (~27 min at -n 2 and ~50 min at -n 0 on a 2-core machine).
(d) Ray executor / local executor on the same Megatron TP2xPP2 job, goal <= 1.2x wall, start-up included:
    bench/ray_executor.py (cold = worker start + first job).
Timings are as measured on a possibly shared machine, never asserted; the load average is recorded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
RESULTS = BENCH / "results.md"
GiB = 1 << 30

# (c)'s default subset: fast unit modules beside module-fixture ones that certify for real (test_verify,
# test_resources: a pytest-in-pytest HF certification each) and a megatron conversion module, so that both
# the per-test overhead of xdist and the balancing of a few slow tests show. ~2-3 min at -n 0 on 2 cores.
SUBSET = ("tests/test_spec_errors.py", "tests/test_tolerances.py", "tests/test_config_parsing.py",
          "tests/test_ci_select.py", "tests/test_report_html.py", "tests/test_verify.py", "tests/test_resources.py",
          "tests/test_convert.py")
TEST_MODES = {"-n 0": ["-n", "0"], "-n 2 --dist load": ["-n", "2", "--dist", "load"],
              "-n 2 --dist worksteal": ["-n", "2", "--dist", "worksteal"]}

# A Qwen2-MoE shape for (b): the 0.5B's attention and vocabulary, 16 experts of 896 and a shared expert.
MOE_CONFIG = dict(hidden_size=896, num_hidden_layers=8, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, moe_intermediate_size=896, shared_expert_intermediate_size=2432,
                  num_experts=16, num_experts_per_tok=4, vocab_size=151936, tie_word_embeddings=False,
                  max_position_embeddings=32768, decoder_sparse_step=1, mlp_only_layers=[])


def load(name: str):
    """One of bench/'s scripts as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@dataclass
class Figure:
    """One measured ratio (or a reason it was not measured) against its goal."""

    item: str
    name: str
    value: float | None  # None: not measured (see note)
    goal: float
    at_least: bool = False  # the goal is a floor (speed-ups), else a ceiling
    regime: str = ""
    note: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def met(self) -> str:
        if self.value is None:
            return "not measured"
        return "yes" if (self.value >= self.goal if self.at_least else self.value <= self.goal) else "no"

    @property
    def goal_text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.goal:g}x"

    @property
    def value_text(self) -> str:
        return "—" if self.value is None else f"{self.value:.2f}x"


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


# ---------------------------------------------------------------- (a)


def bench_a(rounds: int, echo, full_only: bool = False, keep_report: Path | None = None) -> list[Figure]:
    engines = load("engines")
    if full_only:  # --a-full-only: the whole-certification figure alone (the vLLM slice is ~7 min more)
        return bench_a_full(engines, echo, keep_report=keep_report)
    work = Path(tempfile.mkdtemp(prefix="bench-run-a-"))
    try:
        spec, plans, cmd, ref_dir = engines.plan_for("qwen2", "float32", False, work)
        runs = engines.measure(spec, "qwen2", "float32", plans, cmd, work, rounds, True, ref_dir, echo)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    figures = []
    for name, harness, bare in engines.ratios(runs):
        h, b = statistics.median(harness), statistics.median(bare)
        figures.append(Figure("a", f"vLLM slice of the qwen2 CPU certification, {name[4:]}", ratio(h, b),
                              engines.GOAL, regime=f"median of {rounds} round(s), fp32",
                              note=f"{h:.1f} s harness vs {b:.1f} s bare"))
    figures += bench_a_full(engines, echo, keep_report=keep_report)
    return figures


def bench_a_full(engines, echo, model: str = "qwen2", keep_report: Path | None = None) -> list[Figure]:
    """The whole CPU certification (`pytest --model qwen2`, every backend) / the sum of the bare scripts making the
    same calls: bench/bare.py replays the run's own call log (CERTIFY_CALL_LOG) for HF, Megatron and DeepSpeed,
    bench/engines.py's bare vLLM script makes the vLLM calls, one engine per dtype as the harness starts them."""
    import shutil

    label = f"full {model} CPU certification / sum of bare backend scripts"
    work = Path(tempfile.mkdtemp(prefix="bench-run-a-full-"))
    try:
        log = work / "calls.jsonl"
        cmd = [sys.executable, "-m", "pytest", "--model", model, "-p", "no:cacheprovider", "--color=no", "-q",
               "--report-dir", str(work / "reports")]
        echo(f"(a) harness: {shlex.join(['python', *cmd[1:]])} (CERTIFY_CALL_LOG={log})")
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "CERTIFY_CALL_LOG": str(log)}, capture_output=True,
                              text=True)
        harness_s = time.perf_counter() - started
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        echo(f"    {harness_s:.0f} s, exit {proc.returncode}: {tail}")
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if keep_report is not None and (work / "reports" / model).is_dir():  # the timed run's certificate
            shutil.copytree(work / "reports" / model, keep_report, dirs_exist_ok=True)
            echo(f"    its certificate: {keep_report}")
        if proc.returncode not in (0, 1) or not calls:
            return [Figure("a", label, None, engines.GOAL, note=f"not measured: the harness run exited "
                                                                f"{proc.returncode} with {len(calls)} calls logged")]
        echo("(a) bare HF, Megatron and DeepSpeed: bench/bare.py on the same calls")
        bare = subprocess.run([sys.executable, str(BENCH / "bare.py"), str(log), "--out", str(work / "bare.json")],
                              cwd=REPO, capture_output=True, text=True)
        if bare.returncode:
            return [Figure("a", label, None, engines.GOAL,
                           note=f"not measured: bench/bare.py exited {bare.returncode}: "
                                f"{(bare.stderr.strip().splitlines() or [''])[-1][:300]}")]
        replay = json.loads((work / "bare.json").read_text())
        trainers_s = replay["wall_s"]  # its replay, the backends' worker starts included (its sanity check not)
        sanity = replay.get("sanity", {})
        echo(f"    {trainers_s:.0f} s; sanity {json.dumps(sanity)}")
        printed = bare.stdout.splitlines()
        table = next((i for i, line in enumerate(printed) if line.startswith("backend.op")), len(printed))
        echo("\n".join("    " + line for line in printed[table:] if line and not line.startswith("wall ")))
        # where the gap is: each backend's busy time, bare vs harness (the same calls)
        gaps = ", ".join(f"{b} {replay['backends'][b]['busy_s']:.0f} vs {replay['harness_backends'][b]['busy_s']:.0f} s"
                         for b in sorted(replay["backends"]) if b in replay.get("harness_backends", {}))
        spec, plans, _, ref_dir = engines.plan_for(model, "float32", True, work)
        for dtype in spec.dtypes[1:]:  # config and registration run once, on the first dtype's engine
            extra = engines.build_plan(spec, dtype, ref_dir, spec_vocab(ref_dir))
            plans += [{**plan, "calls": [c for c in plan["calls"] if c["op"] not in ("config", "registration")]}
                      for plan in extra]
        echo(f"(a) bare vLLM: {sum(len(p['calls']) for p in plans)} calls on {len(plans)} engine(s)")
        vllm_s = engines.run_bare(plans, work, engines.engine_env())["wall_s"]
        echo(f"    {vllm_s:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bare_s = trainers_s + vllm_s
    by_backend: dict[str, float] = {}
    for call in calls:
        by_backend[call["backend"]] = by_backend.get(call["backend"], 0.0) + call["seconds"]
    busy = ", ".join(f"{b} {s:.0f} s" for b, s in sorted(by_backend.items()))
    return [Figure("a", label, ratio(harness_s, bare_s), engines.GOAL, regime="wall, one round, both dtypes",
                   note=f"{harness_s:.0f} s harness ({len(calls)} worker calls; busy: {busy}) vs {bare_s:.0f} s bare "
                        f"(HF + Megatron + DeepSpeed {trainers_s:.0f} s, vLLM {vllm_s:.0f} s; busy bare vs harness: "
                        f"{gaps}); {tail}",
                   detail={"sanity": sanity})]


def spec_vocab(ref_dir: str) -> int:
    return json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]


# ---------------------------------------------------------------- (b)

REGIMES = (("warm", False), ("cold", True))


def convert_figures(m: dict, label: str, goal_time: float = 1.5) -> list[Figure]:
    """The time and memory figures of one bench/convert.py measurement."""
    conv, base = m["median"]["convert"], m["median"]["baseline"]
    regime = load_convert().regime(m["cache"], m["fsync"])
    limit = 3 * m["largest"] + GiB
    rounds = len(m["runs"]["convert"])
    return [
        Figure("b", f"{label} convert / load+save, work time", ratio(conv["work_s"], base["work_s"]), goal_time,
               regime=regime, note=f"{conv['work_s']:.2f} s vs {base['work_s']:.2f} s, median of {rounds}; wall "
                                   f"{conv['wall_s']:.2f} s vs {base['wall_s']:.2f} s"),
        Figure("b", f"{label} convert peak RSS / (3 x largest tensor + 1 GiB)", conv["maxrss"] / limit, 1.0,
               regime=regime, note=f"{conv['maxrss'] / 2**20:.0f} MiB vs {limit / 2**20:.0f} MiB "
                                   f"(largest {m['largest_name']}, {m['largest'] / 2**20:.0f} MiB)"),
    ]


def load_convert():
    if not hasattr(load_convert, "module"):
        load_convert.module = load("convert")
    return load_convert.module


def moe_checkpoint(target: Path) -> Path:
    """A random qwen2_moe-shaped checkpoint (bf16), built once through transformers' own save_pretrained."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2_moe", **MOE_CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = target.with_name(target.name + ".tmp")
    model.save_pretrained(staging)
    del model
    staging.rename(target)
    return target


def bench_b(rounds: int, echo) -> list[Figure]:
    convert = load_convert()
    src = convert.build(convert.cache_dir())
    figures = []
    for layout in ("1x1", "2x2"):
        for cache, fsync in REGIMES:
            echo(f"(b) qwen2-0.5B shape TP{layout[0]}xPP{layout[2]}: {convert.regime(cache, fsync)}")
            m = convert.measure(src, rounds, layout, cache, fsync)
            figures += convert_figures(m, f"qwen2-0.5B shape bf16 TP{layout[0]}xPP{layout[2]}")
    return figures + bench_moe(convert, rounds, echo)


def bench_moe(convert, rounds: int, echo, checkpoint: Path | None = None) -> list[Figure]:
    """(b) on the MoE shape (`checkpoint`: default the cached random qwen2_moe one); a conversion that fails is
    a finding, shown as not measured with the error."""
    label = "qwen2_moe shape bf16 TP1"
    figures = []
    try:
        moe = checkpoint or moe_checkpoint(convert.cache_dir().with_name("qwen2-moe-shaped-bf16"))
        for cache, fsync in REGIMES:
            echo(f"(b) {label}: {convert.regime(cache, fsync)}")
            figures += convert_figures(convert.measure(moe, rounds, "1x1", cache, fsync), label)
    except Exception as exc:  # noqa: BLE001 - a conversion the harness cannot do yet is a finding, not a crash
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        figures.append(Figure("b", f"{label} convert / load+save", None, 1.5, note=f"not measured: {lines[-1][:300]}"))
    return figures


# ---------------------------------------------------------------- (c)


def test_command(paths: list[str], mode: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", *mode]


def run_tests(paths: list[str], mode: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    started = time.perf_counter()
    proc = subprocess.run(test_command(paths, mode), cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"rc": proc.returncode, "wall_s": wall, "summary": tail}


def test_figures(walls: dict[str, list[float]], scope: str, summaries: dict[str, str]) -> list[Figure]:
    serial = statistics.median(walls["-n 0"])
    rounds = len(walls["-n 0"])
    figures = []
    for mode in walls:
        if mode == "-n 0":
            continue
        parallel = statistics.median(walls[mode])
        figures.append(Figure("c", f"{scope}: -n 0 / {mode}", ratio(serial, parallel), 1.6, at_least=True,
                              regime=f"wall time, whole pytest run, median of {rounds} round(s) after an untimed "
                                     "warm-up run, modes in rotated order",
                              note=f"{serial:.0f} s vs {parallel:.0f} s; {summaries[mode]}"))
    return figures


def bench_c(full: bool, echo, rounds: int = 1) -> list[Figure]:
    """Each mode `rounds` times, the order rotated every round, after one untimed -n 2 run: the first run on a
    machine builds DeepSpeed's CPU comm op and vLLM's inductor cache, which would otherwise be charged to
    whichever mode ran first (on 2026-12-02 -n 0 ran first and "worksteal" came out 5.2x on 2 cores)."""
    paths = ["tests"] if full else list(SUBSET)
    scope = "whole tests/" if full else f"subset of {len(SUBSET)} modules"
    echo(f"(c) warm-up, untimed: {shlex.join(['pytest', *paths, '-n', '2'])}")
    run_tests(paths, ["-n", "2"])
    walls: dict[str, list[float]] = {mode: [] for mode in TEST_MODES}
    summaries = {}
    modes = list(TEST_MODES)
    for round_ in range(rounds):
        for mode in modes[round_ % len(modes):] + modes[:round_ % len(modes)]:
            echo(f"(c) round {round_ + 1}: {shlex.join(['pytest', *paths, *TEST_MODES[mode]])}")
            result = run_tests(paths, TEST_MODES[mode])
            walls[mode].append(result["wall_s"])
            summaries[mode] = result["summary"]
            echo(f"    {result['wall_s']:.0f} s, exit {result['rc']}: {result['summary']}")
    return test_figures(walls, scope, summaries)


# ---------------------------------------------------------------- (d)


def bench_d(rounds: int, echo) -> list[Figure]:
    ray = load("ray_executor")
    try:
        import ray as _  # noqa: F401
    except ImportError:
        return [Figure("d", "ray / local, TP2xPP2 logprobs", None, 1.2, note="not measured: ray is not installed")]
    median = ray.medians(ray.measure("logprobs", rounds, echo))
    return [Figure("d", f"ray / local, Megatron TP2xPP2 logprobs, {kind}",
                   ratio(median["ray"][i], median["local"][i]), 1.2, regime=f"median of {rounds} round(s)",
                   note=f"{median['ray'][i]:.1f} s vs {median['local'][i]:.1f} s")
            for i, kind in enumerate(("cold: worker start + first job", "warm: the job again"))]


# ---------------------------------------------------------------- results


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    load1, load5, _ = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores, {mem / GiB:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; load average {load1:.1f} / {load5:.1f} (1 / 5 min) at start")


def markdown(figures: list[Figure], command: str, described: str, seconds: float) -> str:
    lines = [f"## {datetime.now(timezone.utc).isoformat(timespec='seconds')}: `{command}`", "",
             f"machine: {described}; the run took {seconds / 60:.1f} min", "",
             "| item | figure | measured | goal | met | regime | note |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        lines.append(f"| ({f.item}) | {f.name} | {f.value_text} | {f.goal_text} | {f.met} | {f.regime} | "
                     f"{f.note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def append_results(text: str, path: Path = RESULTS) -> None:
    header = "# Benchmark results\n\nAppended by `python bench/run.py`, newest last; see its docstring.\n"
    existing = path.read_text() if path.is_file() else header
    path.write_text(existing.rstrip("\n") + "\n\n" + text)


def parse_only(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(items) - set("abcd"))
    if unknown or not items:
        raise SystemExit(f"bench/run.py: --only: expected a comma list of a, b, c, d, got {text!r}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="a,b,c,d", help="comma list of the items to run (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per side for (a) and (d) (default 1)")
    parser.add_argument("--convert-rounds", type=int, default=3,
                        help="rounds per side for (b), seconds each: medians of 3 by default")
    parser.add_argument("--test-rounds", type=int, default=1, help="rounds per mode for (c) (default 1)")
    parser.add_argument("--full-tests", action="store_true", help="(c): the whole tests/ folder, not the subset")
    parser.add_argument("--a-full-only", action="store_true",
                        help="(a): only the whole-certification figure, not the vLLM slice beside it")
    parser.add_argument("--a-keep-report", type=Path, default=None, metavar="DIR",
                        help="(a): keep the timed certification's report folder (certificate, pages) in DIR")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file appended to")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    items = parse_only(args.only)

    def echo(line: str) -> None:
        print(line, flush=True)

    described, started = machine(), time.perf_counter()
    echo(f"machine: {described}")
    figures: list[Figure] = []
    for item in items:
        t = time.perf_counter()
        if item == "a":
            figures += bench_a(args.rounds, echo, args.a_full_only, args.a_keep_report)
        elif item == "b":
            figures += bench_b(args.convert_rounds, echo)
        elif item == "c":
            figures += bench_c(args.full_tests, echo, args.test_rounds)
        else:
            figures += bench_d(args.rounds, echo)
        echo(f"({item}) done in {time.perf_counter() - t:.0f} s")
    command = shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(figures, command, described, time.perf_counter() - started)
    print("\n" + text)
    if not args.no_append:
        append_results(text, args.results)
        echo(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
