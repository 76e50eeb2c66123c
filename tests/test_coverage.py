"""Every judge first checks that the backend returned everything the reference has, and names what is missing.

Negative controls on the judges themselves (no backend needed): a backend that drops a prompt set, a
sequence, a position, the last generated token, one rollout sample, one train step or one gradient
tensor fails its check with a message naming the gap; no metric is computed from empty input.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from harness.checks import engine_logits, logits, rollout, train
from harness.tolerances import LOGIT_METRICS, resolve

VOCAB = 16
PROMPTS = {"single": [[3]], "a": [[1, 2, 3, 4, 5]], "b": [[7, 1], [3, 9, 2]]}


def _full(prompts=PROMPTS, seed=0) -> dict[str, torch.Tensor]:
    """Full-vocabulary log-probs per set [sequences, positions, vocab], right padded, sharp enough to be decisive."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.log_softmax(torch.randn(len(seqs), max(map(len, seqs)), VOCAB, generator=g) * 4, dim=-1)
            for name, seqs in prompts.items()}


def _evaluate(tmp_path, test: dict[str, torch.Tensor], dtype="float32", noisy=None, truth=None):
    truth = _full() if truth is None else truth
    save_file(truth, tmp_path / "truth.safetensors")
    save_file({k: v.contiguous() for k, v in test.items()}, tmp_path / "test.safetensors")
    noise_path = None
    if noisy is not None:
        save_file(noisy, tmp_path / "noise.safetensors")
        noise_path = str(tmp_path / "noise.safetensors")
    return logits.evaluate(str(tmp_path / "truth.safetensors"), str(tmp_path / "test.safetensors"), PROMPTS,
                           dtype, {}, "tp1pp1 " + dtype, noise_path=noise_path)


def test_a_complete_exact_copy_passes(tmp_path):
    verdict = _evaluate(tmp_path, _full())
    assert verdict.status == "passed", verdict.reason
    assert verdict.metrics["top1_agreement"] == 1.0 and verdict.metrics["max_abs_logprob"] == 0.0


@pytest.mark.parametrize("drop, named", [
    (lambda t: t.pop("b"), "prompt set 'b': missing from the backend's output"),
    (lambda t: t.__setitem__("b", t["b"][:1]), "prompt set 'b': the backend returned 1 sequences, the reference has 2"),
    (lambda t: t.__setitem__("a", t["a"][:, :4]), "prompt set 'a': the backend returned 4 positions"),
    (lambda t: t.__setitem__("a", t["a"][..., :8]), "prompt set 'a': the backend returned 8 vocabulary entries"),
    (lambda t: t["a"].__setitem__((0, 2, 3), float("nan")), "prompt set 'a': 1 non-finite log-probs"),
    (lambda t: t.__setitem__("extra", t["a"].clone()), "prompt set 'extra': returned by the backend but never asked for"),
])
def test_logits_judge_names_what_the_backend_did_not_return(tmp_path, drop, named):
    test = _full()
    drop(test)
    verdict = _evaluate(tmp_path, test)
    assert verdict.status == "failed" and named in verdict.reason, verdict.reason
    assert "max_abs_logprob" not in verdict.metrics  # no metric computed from incomplete data


def test_no_metric_has_a_default_for_empty_input():
    assert logits.pooled({"a": {"top1_agreement": 1.0, "decisive_positions": 0}}, "top1_agreement") is None
    with pytest.raises(ValueError):
        logits.worst({})
    verdict = logits.judge({}, resolve("float32", {}, LOGIT_METRICS), "tp1pp1")
    assert verdict.status == "failed" and "no prompt set was measured" in verdict.reason


def test_bf16_near_ties_are_reported_not_judged_and_decisive_flips_fail(tmp_path):
    truth = _full()
    first, second = truth["a"][0, 1].topk(2).indices.tolist()
    truth["a"][0, 1, second] = truth["a"][0, 1, first] - 0.01  # a near-tie in the reference
    g = torch.Generator().manual_seed(1)
    noisy = {k: (v + 0.05 * torch.rand(v.shape, generator=g)).contiguous() for k, v in truth.items()}  # HF's bf16
    test = {k: v.clone() for k, v in truth.items()}
    test["a"][0, 1, first], test["a"][0, 1, second] = truth["a"][0, 1, second], truth["a"][0, 1, first]
    verdict = _evaluate(tmp_path, test, "bfloat16", noisy, truth)
    assert verdict.status == "passed", verdict.reason  # a flipped near-tie is what bf16 rounding does
    assert verdict.metrics["near_tie_positions"] >= 1 and verdict.metrics["top1_agreement"] == 1.0
    # the argmax moved to a far-off entry at a decisive position: no rounding does that
    test = {k: v.clone() for k, v in truth.items()}
    row = test["b"][1, 2]
    top, low = int(row.argmax()), int(row.argmin())
    row[top], row[low] = float(truth["b"][1, 2, low]), float(truth["b"][1, 2, top])
    verdict = _evaluate(tmp_path, test, "bfloat16", noisy, truth)
    assert verdict.status == "failed" and "top1_agreement" in verdict.reason, verdict.reason


# ---- engine records ----

def _greedy_reference(new=3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ref = {}
    for name, seqs in PROMPTS.items():
        for i, prompt in enumerate(seqs):
            rows = torch.log_softmax(torch.randn(len(prompt) + new, VOCAB, generator=g) * 4, dim=-1)
            ref[f"{name}/{i}"] = rows
            ref[f"{name}/{i}/generated"] = torch.tensor([int(rows[len(prompt) - 1 + j].argmax()) for j in range(new)])
    return ref


def _engine(record, ref):
    return engine_logits.evaluate(ref, None, record, PROMPTS, "float32", {}, "vllm float32")


def test_engine_record_of_the_reference_passes():
    ref = _greedy_reference()
    verdict = _engine(engine_logits.record_from_reference(ref, PROMPTS, VOCAB), ref)
    assert verdict.status == "passed", verdict.reason


def _drop_last_token(seq):
    seq["generated"].pop()
    seq["gen_dists"].pop()


@pytest.mark.parametrize("edit, named", [
    (lambda r: r["sets"].pop("b"), "prompt set 'b': missing from the engine's record"),
    (lambda r: r["sets"]["b"].pop(), "prompt set 'b': 1 sequences returned for 2 sent"),
    (lambda r: _drop_last_token(r["sets"]["a"][0]), "prompt set 'a' sequence 0: 2 generated tokens of 3 asked for"),
    (lambda r: r["sets"]["a"][0]["dists"].pop(), "prompt set 'a' sequence 0: 4 prompt positions scored of 5"),
    (lambda r: r["sets"]["a"][0]["dists"][1].pop(3), "prompt set 'a' sequence 0 position 1:"),
    (lambda r: r["sets"]["a"][0]["prompt"].__setitem__(0, 9), "scored a different prompt than the one sent"),
])
def test_engine_judge_names_what_the_engine_did_not_return(edit, named):
    ref = _greedy_reference()
    record = engine_logits.record_from_reference(ref, PROMPTS, VOCAB)
    edit(record)
    verdict = _engine(record, ref)
    assert verdict.status == "failed" and named in verdict.reason, verdict.reason


# ---- rollout samples ----

CELLS = [{"cell": "new3-batch2", "prompt": [1, 2], "n": 2, "max_new_tokens": 3}]


def _samples():
    return [{"cell": "new3-batch2", "prompt": [1, 2], "generated": [4, 5, 6], "logprobs": [-1.0, -2.0, -0.5]},
            {"cell": "new3-batch2", "prompt": [1, 2], "generated": [7, 8, 9], "logprobs": [-0.1, -0.2, -0.3]}]


def _rollout(samples, engine, trainer):
    return rollout.evaluate(CELLS, samples, engine, trainer, "float32", {}, "hf vs vllm")


def test_rollout_complete_and_equal_passes():
    samples = _samples()
    lps = [s["logprobs"] for s in samples]
    assert _rollout(samples, lps, copy.deepcopy(lps)).status == "passed"


def test_rollout_judge_names_a_missing_sample_and_a_short_one():
    samples = _samples()
    lps = [s["logprobs"] for s in samples]
    verdict = _rollout(samples[:1], lps[:1], lps[:1])
    assert verdict.status == "failed" and "cell new3-batch2: 1 samples returned of 2 asked for" in verdict.reason
    short = _samples()
    short[1]["generated"].pop()
    short[1]["logprobs"].pop()
    lps = [s["logprobs"] for s in short]
    verdict = _rollout(short, lps, lps)
    assert verdict.status == "failed" and "sample 1: 2 generated tokens of 3" in verdict.reason
    verdict = _rollout(_samples(), [s["logprobs"] for s in _samples()], [[-1.0, -2.0, -0.5], [-0.1]])
    assert verdict.status == "failed" and "1 trainer log-probs for 3 tokens" in verdict.reason


def test_trainer_that_scored_fewer_sequences_is_named():
    ids = torch.randint(0, VOCAB, (1, 5))  # one sequence scored of two
    scores = rollout.trainer_token_logprobs(rollout.realized_logprobs(torch.randn(1, 5, VOCAB), ids, 1.0, True),
                                            _samples())
    verdict = _rollout(_samples(), [s["logprobs"] for s in _samples()], scores)
    assert verdict.status == "failed" and "0 trainer log-probs for 3 tokens" in verdict.reason


# ---- train steps ----

def _train_files(tmp_path, name, grads, weights, losses):
    save_file(grads, tmp_path / f"{name}-g.safetensors")
    save_file(weights, tmp_path / f"{name}-w.safetensors")
    return {"grads": str(tmp_path / f"{name}-g.safetensors"), "weights": str(tmp_path / f"{name}-w.safetensors"),
            "losses": losses}


def test_train_judge_names_a_missing_step_and_a_missing_gradient(tmp_path):
    grads = {"a.weight": torch.ones(2, 2), "b.weight": torch.full((2,), 0.5)}
    weights = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2)}
    ref = _train_files(tmp_path, "ref", grads, weights, [2.0, 1.5, 1.2])
    same = _train_files(tmp_path, "same", grads, weights, [2.0, 1.5, 1.2])
    tol = resolve("float32", {}, train.TRAIN_METRICS)
    assert train.judge(train.measure(ref, same), tol, "zero0-ws1").status == "passed"
    fewer = _train_files(tmp_path, "fewer", grads, weights, [2.0, 1.5])
    verdict = train.judge(train.measure(ref, fewer), tol, "zero0-ws1")
    assert verdict.status == "failed" and "step 2: the backend's loss is missing" in verdict.reason
    dropped = _train_files(tmp_path, "dropped", {"a.weight": grads["a.weight"]}, weights, [2.0, 1.5, 1.2])
    verdict = train.judge(train.measure(ref, dropped), tol, "zero0-ws1")
    assert verdict.status == "failed" and "grad b.weight: no value from the backend" in verdict.reason
    empty = _train_files(tmp_path, "empty", {}, {}, [])
    verdict = train.judge(train.measure(empty, empty), tol, "zero0-ws1")
    assert verdict.status == "failed" and "nothing to compare" in verdict.reason


def test_non_finite_values_fail_coverage_and_name_their_set_for_localization(tmp_path):
    """NaN/inf is numeric evidence (an uninitialised parameter), not a gap: the set is kept for the localizer."""
    test = _full()
    test["b"][1, 2, 5] = float("inf")
    verdict = _evaluate(tmp_path, test)
    assert verdict.status == "failed" and verdict.metrics["non_finite_sets"] == ["b"], verdict.metrics
    ref = _greedy_reference()
    record = engine_logits.record_from_reference(ref, PROMPTS, VOCAB)
    first = next(iter(record["sets"]["a"][0]["dists"][2]))
    record["sets"]["a"][0]["dists"][2][first] = float("nan")
    verdict = _engine(record, ref)
    assert verdict.status == "failed" and "non-finite log-probs" in verdict.reason
    assert verdict.metrics["non_finite_sets"] == ["a"]


def test_a_routing_near_tie_token_is_judged_at_the_largest_noise_of_any_set():
    """MoE bf16 (logits.MARGIN_RULE): which near-tie tokens flip is each implementation's own; every other
    token keeps its own noise."""
    truth = _full()
    noisy = {k: v.clone() for k, v in truth.items()}
    noisy["a"][0, 1] += 0.5  # HF-bf16's largest noise, in another set than the tie
    noisy["b"][1, 0] += 0.01
    ties = {name: torch.zeros(t.shape[:2], dtype=torch.bool) for name, t in truth.items()}
    ties["b"][1, 2] = True
    plain = logits.min_margins(PROMPTS, truth, noisy)
    routed = logits.min_margins(PROMPTS, truth, noisy, routing_ties=ties)
    assert float(routed["b"][1, 2]) == pytest.approx(2 * 2 * 0.5) and float(plain["b"][1, 2]) < 1e-3
    untouched = ~ties["b"]
    assert torch.equal(routed["b"][untouched], plain["b"][untouched]) and torch.equal(routed["a"], plain["a"])


def test_an_moe_models_bf16_bounds_are_the_worst_of_hfs_noise_runs():
    """logits.NOISE_RUNS_RULE: which near-tie tokens flip is each bf16 run's own, so an MoE model calibrates on
    HF's sdpa and eager runs; each metric takes its worst run, and the margins come from the first."""
    truth = _full()
    sdpa, eager = ({k: v.clone() for k, v in truth.items()} for _ in range(2))
    sdpa["a"][0, 1] += 0.01
    eager["b"][1, 2] += 0.3  # a flip only the eager run has
    margins = logits.min_margins(PROMPTS, truth, sdpa)
    one = logits.noise_calibration(truth, sdpa, PROMPTS, margins, "m")
    both = logits.noise_calibration(truth, [sdpa, eager], PROMPTS, margins, "m")
    assert both.noise["max_abs_logprob"] == pytest.approx(0.3, rel=1e-5)
    assert one.noise["max_abs_logprob"] == pytest.approx(0.01, rel=1e-4)
    assert logits.NOISE_RUNS_RULE in both.method and logits.NOISE_RUNS_RULE not in one.method
    lower = logits.worst_of_runs([{"top1_agreement": 0.9, "max_abs_logprob": None},
                                  {"top1_agreement": 0.8, "max_abs_logprob": 0.2}])
    assert lower["top1_agreement"] == 0.8 and lower["max_abs_logprob"] == 0.2  # a run with no value does not count
    with pytest.raises(ValueError, match="no noise run"):
        logits.worst_of_runs([])
