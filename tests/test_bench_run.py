"""bench/run.py's logic on tiny inputs: goals judged the right way round, results appended with the machine,
the conversion bench's cache/fsync regimes really run, the test-suite timing runs pytest. Not the real
measurements (those take an hour and are run by hand: python bench/run.py)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

RUN = REPO / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench():
    module_spec = importlib.util.spec_from_file_location("bench_run", RUN)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["bench_run"] = module  # its dataclasses resolve annotations through sys.modules
    module_spec.loader.exec_module(module)
    return module


def test_help_and_a_bad_selection_are_one_line_answers():
    proc = subprocess.run([sys.executable, str(RUN), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--full-tests" in proc.stdout and "(d) Ray executor" in proc.stdout
    proc = subprocess.run([sys.executable, str(RUN), "--only", "a,x", "--no-append"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "bench/run.py: --only: expected a comma list of a, b, c, d, got 'a,x'"]


def test_goals_are_judged_as_ceilings_or_floors_and_nothing_measured_is_never_met(bench):
    assert bench.Figure("b", "t", 1.49, 1.5).met == "yes"
    assert bench.Figure("b", "t", 1.51, 1.5).met == "no"
    assert bench.Figure("c", "t", 1.7, 1.6, at_least=True).met == "yes"
    assert bench.Figure("c", "t", 1.2, 1.6, at_least=True).met == "no"
    assert bench.Figure("a", "t", None, 1.3).met == "not measured"
    # speed-up = serial / parallel wall, one figure per parallel mode
    walls = {"-n 0": [100.0, 90.0, 120.0], "-n 2 --dist load": [80.0], "-n 2 --dist worksteal": [50.0]}  # medians
    figures = bench.test_figures(walls, "subset", {m: "3 passed" for m in walls})
    assert [(f.name, round(f.value, 2), f.met) for f in figures] == [
        ("subset: -n 0 / -n 2 --dist load", 1.25, "no"), ("subset: -n 0 / -n 2 --dist worksteal", 2.0, "yes")]


def test_results_are_appended_with_the_machine_under_one_header(bench, tmp_path):
    path = tmp_path / "results.md"
    described = bench.machine()
    assert "cores" in described and "GiB RAM" in described and "load average" in described
    figures = [bench.Figure("d", "ray / local", 1.1, 1.2, regime="cold"),
               bench.Figure("b", "moe", None, 1.5, note="not measured: a | b")]
    for _ in range(2):
        bench.append_results(bench.markdown(figures, "python bench/run.py --only d", described, 90.0), path)
    text = path.read_text()
    assert text.count("# Benchmark results") == 1 and text.count("`python bench/run.py --only d`") == 2
    assert "| (d) | ray / local | 1.10x | <= 1.2x | yes | cold |" in text
    assert "| (b) | moe | — | <= 1.5x | not measured |  | not measured: a / b |" in text


def test_a_moe_conversion_that_fails_is_not_measured_with_its_error(bench, tmp_path):
    class Failing:
        def regime(self, cache, fsync):
            return cache

        def measure(self, src, rounds, layout, cache, fsync):
            raise RuntimeError(f"convert exited 1\nConvertError: {src}/model.safetensors: mlp.experts unmapped")

    [figure] = bench.bench_moe(Failing(), 1, print, tmp_path)
    assert figure.value is None and figure.note == f"not measured: ConvertError: {tmp_path}/model.safetensors: " \
                                                   "mlp.experts unmapped"


def test_conversion_bench_runs_cold_and_fsyncd_on_a_tiny_checkpoint(bench):
    """The real child processes on a tiny qwen2 at TP2xPP2: the regime reaches them and both sides write."""
    from fixtures.tiny_models import materialize

    src = materialize("qwen2", {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "tie_word_embeddings": False}, 0, "float32")
    convert = bench.load_convert()
    m = convert.measure(Path(src), 1, "2x2", "cold", True)
    assert m["cache"] == "cold" and m["fsync"] and m["layout"] == "2x2"
    for mode in ("baseline", "convert"):
        [run] = m["runs"][mode]
        assert run["rc"] == 0 and run["out_bytes"] > 0 and run["work_s"] > 0
    figures = bench.convert_figures(m, "tiny")
    assert [f.name for f in figures] == ["tiny convert / load+save, work time",
                                         "tiny convert peak RSS / (3 x largest tensor + 1 GiB)"]
    assert figures[0].regime == "cold source cache, fsync'd output (write-back timed)"
    assert figures[1].value < 1.0  # a tiny model is far under 1 GiB + 3 x its largest tensor


def test_the_test_suite_timing_runs_pytest_with_the_mode_given(bench, tmp_path):
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    result = bench.run_tests([str(tmp_path)], ["-n", "0"])
    assert result["rc"] == 0 and "2 passed" in result["summary"] and result["wall_s"] > 0
    assert bench.test_command(["tests"], bench.TEST_MODES["-n 2 --dist worksteal"])[-4:] == [
        "-n", "2", "--dist", "worksteal"]
    assert all(Path(REPO / p).is_file() for p in bench.SUBSET)


def test_the_bare_replay_makes_the_logged_calls_and_computes_the_same_thing(run_certify, tmp_path, monkeypatch):
    """bench (a)'s baseline: CERTIFY_CALL_LOG records a certification's worker calls, bench/bare.py replays them
    without the harness; its Megatron log-probs must be HF's (a baseline that computed less would flatter us)."""
    import json

    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CERTIFY_CALL_LOG", str(log))
    run = run_certify("--model", "qwen2", "--backend", "megatron", "--dtype", "float32", "-k",
                      "logits and tp2pp1", timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(c["backend"], c["op"]) for c in calls} == {("hf", "materialize"), ("megatron", "logprobs"),
                                                       ("hf", "logprobs")}
    assert all(c["status"] == "ok" and c["seconds"] > 0 for c in calls)
    out = tmp_path / "bare.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bare.py"), str(log), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert sorted((r["backend"], r["op"]) for r in result["calls"]) == [("hf", "logprobs"), ("megatron", "logprobs")]
    assert [s["op"] for s in result["skipped"]] == ["materialize"]  # the cached checkpoint is not rebuilt
    assert result["sanity"]["megatron_logprobs_vs_hf"]["max_abs_diff"] < 1e-4, result["sanity"]
    assert result["wall_s"] > 0 and result["backends"]["megatron"]["busy_s"] > 0
