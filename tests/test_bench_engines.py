"""bench/engines.py without vLLM: its CLI, the bare script's call plan, and the parsing of the harness's output.

The benchmark itself starts vLLM and takes minutes; it is run by hand, never here. These checks keep it in step
with the harness: the engine arguments of harness/backends/vllm.py, the checks harness.plan selects, the
plugin's progress and worker-summary lines.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections import Counter

import pytest

from fixtures.prompts import prompt_sets
from harness.plan import build_plan as harness_plan
from harness.spec import load_spec, spec_path_for

from .conftest import REPO

BENCH = REPO / "bench" / "engines.py"


@pytest.fixture(scope="module")
def bench():
    module_spec = importlib.util.spec_from_file_location("bench_engines", BENCH)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen2():
    return load_spec(spec_path_for("qwen2"))


def test_help_runs_without_harness_or_vllm():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--rounds" in proc.stdout and "bare" in proc.stdout


def test_show_plan_prints_the_harness_command_and_the_bare_calls():
    proc = subprocess.run([sys.executable, str(BENCH), "--show-plan"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["harness"][shown["harness"].index("-k") + 1] == "not /megatron-t"  # deepspeed scores as HF does
    assert [p["dtype"] for p in shown["bare"]] == ["float32"]


def test_bare_calls_are_the_vllm_calls_of_the_selected_checks(bench, qwen2):
    plans = bench.build_plan(qwen2, "float32", "/ref", 512)
    assert len(plans) == 1  # one engine: config/registration use the run's first selected dtype
    calls = plans[0]["calls"]
    # the checks pytest runs with the bench's -k: no trainer-scored rollout variants
    checks = [c for c in harness_plan(qwen2, ["vllm"], ["float32"])
              if not any(f"/{t}-t" in c.id for t in qwen2.backends.train)]
    by_suite = Counter(c.suite for c in checks)
    ops = Counter(c["op"] for c in calls)
    assert ops["config"] == by_suite["config"] == 1
    assert ops["registration"] == by_suite["registration"] == 1
    assert ops["logprobs"] == by_suite["logits"] == 1
    assert ops["refit"] == by_suite["refit"] == len(qwen2.parallel)
    # rollout samples are memoised per temperature: hf-t0.7 and megatron-t0.7 share one engine call
    assert ops["sample"] == len({c.variant.rpartition("-t")[2] for c in checks if c.suite == "rollout"}) == 2
    assert [c["label"] for c in calls if c["op"] == "refit"] == [
        f"refit(dtype=float32, tp={lay.tp}, pp={lay.pp})" for lay in qwen2.parallel]
    logits = next(c for c in calls if c["op"] == "logprobs")
    assert logits["prompts"] == prompt_sets(512) and logits["top_k"] == 512 and logits["max_new_tokens"] == 8
    samples = [c for c in calls if c["op"] == "sample"]
    assert [c["temperature"] for c in samples] == [0.7, 1.0]
    assert {(c["n"], c["max_new_tokens"]) for c in samples[0]["cells"]} == {(1, 8), (4, 8), (1, 32), (4, 32)}
    assert all(c["prompt"] == prompt_sets(512)["medium"][0] for c in samples[0]["cells"])


def test_a_bfloat16_run_needs_one_engine_too(bench, qwen2):
    plans = bench.build_plan(qwen2, "bfloat16", "/ref", 512)
    assert [(p["dtype"], sorted({c["op"] for c in p["calls"]})) for p in plans] == [
        ("bfloat16", ["config", "logprobs", "refit", "registration", "sample"])]


def test_engine_arguments_match_the_backend(bench, qwen2):
    """The bare LLM(...) gets the same keyword arguments as VLLMBackend._engine (read from its source)."""
    tree = ast.parse((REPO / "harness" / "backends" / "vllm.py").read_text())
    llm_call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and getattr(node.func, "id", None) == "LLM")
    # `**self._device_kwargs()` adds nothing on CPU (the bench runs there); on a GPU it sizes the engine's memory
    backend = {kw.arg: kw.value for kw in llm_call.keywords if kw.arg is not None}
    engine = bench.build_plan(qwen2, "float32", "/ref", 512)[0]["engine"]
    assert set(backend) - {"model", "dtype"} == set(engine)
    for key, node in backend.items():
        if isinstance(node, ast.Constant):
            assert engine[key] == node.value, key
    assert engine["logprobs_mode"] == f"{qwen2.rollout.engine_logprobs}_logprobs"


def test_bare_script_compiles(bench):
    compile(bench.CHILD, "<bare vLLM script>", "exec")


def test_parses_the_plugin_output(bench):
    text = ("suites/test_config.py::test_config[qwen2/config/vllm] \n"
            "[qwen2] starting the hf worker\n"
            "[qwen2] hf.materialize(dtype=float32) 6.0s\n"
            "[qwen2] vllm.refit(dtype=float32, tp=2, pp=1) 3.6s\n"
            "suites/test_refit.py::test_refit[qwen2/refit/vllm/float32/tp2pp1] PASSED [ 44%]\n"
            "  worker hf         start 4.3s, 4 calls, 13.4s busy\n"
            "  worker vllm       start 3.4s, 9 calls, 40.2s busy\n")
    progress = [(m["backend"], m["op"], m["args"], m["s"]) for m in bench.PROGRESS.finditer(text)]
    assert progress == [("hf", "materialize", "dtype=float32", "6.0"),
                        ("vllm", "refit", "dtype=float32, tp=2, pp=1", "3.6")]
    assert bench._label("refit", "float32", tp=2, pp=1) == "refit(dtype=float32, tp=2, pp=1)"
    workers = {m["backend"]: (m["start"], m["calls"], m["busy"]) for m in bench.WORKER.finditer(text)}
    assert workers == {"hf": ("4.3", "4", "13.4"), "vllm": ("3.4", "9", "40.2")}
    assert len(bench.RESULT.findall(text)) == 1
