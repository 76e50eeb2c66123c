"""The engine checks' pure parts: record comparison, rollout scoring, the rollout grid (no engine needed)."""
from __future__ import annotations

import pytest
import torch

from harness.checks import engine_logits, rollout
from harness.spec import parse_spec
from suites.test_rollout import _cells

from .conftest import base_spec

VOCAB = 16


def _reference(prompts: dict, new: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A dense 'HF' reference: random log-probs along each prompt and a greedy continuation from them."""
    g = torch.Generator().manual_seed(seed)
    ref = {}
    for name, seqs in prompts.items():
        for i, prompt in enumerate(seqs):
            rows = torch.log_softmax(torch.randn(len(prompt) + new, VOCAB, generator=g) * 3, dim=-1)
            generated = [int(rows[len(prompt) - 1 + j].argmax()) for j in range(new)]
            ref[f"{name}/{i}"], ref[f"{name}/{i}/generated"] = rows, torch.tensor(generated)
    return ref


PROMPTS = {"a": [[1, 2, 3, 4, 5]], "b": [[7], [3, 9, 2]]}


def _compare(record: dict, ref: dict) -> dict:
    """fp32 judging: coverage first (a complete record here), decisive margins from the fp32 floor."""
    assert engine_logits.coverage(record, ref, PROMPTS) == []
    return engine_logits.compare(record, ref, engine_logits.row_margins(PROMPTS, ref, None, 2.0))


def test_a_record_of_the_reference_itself_is_exact():
    ref = _reference(PROMPTS)
    per_set = _compare(engine_logits.record_from_reference(ref, PROMPTS, VOCAB), ref)
    for m in per_set.values():
        assert m["max_abs_logprob"] == pytest.approx(0, abs=1e-6)
        assert m["greedy_sequence_equal"] == m["closeness"] == m["top1_agreement"] == 1.0


def test_dists_shifted_by_one_position_are_caught():
    """The classic prompt-logprob alignment bug (scoring token t with the distribution for t-1)."""
    ref = _reference(PROMPTS)
    record = engine_logits.record_from_reference(ref, PROMPTS, VOCAB)
    seq = record["sets"]["a"][0]
    seq["dists"] = [seq["dists"][0]] + seq["dists"][:-1]
    m = _compare(record, ref)["a"]
    assert m["max_abs_logprob"] > 1 and m["top1_agreement"] < 1


@pytest.mark.parametrize("rank, close", [(1, True), (VOCAB - 1, False)])
def test_closeness_is_mutual_top5_membership_at_the_first_divergence(rank, close):
    ref = _reference(PROMPTS)
    record = engine_logits.record_from_reference(ref, PROMPTS, VOCAB)
    seq = record["sets"]["a"][0]
    row = ref["a/0"][len(seq["prompt"]) - 1 + 2]  # diverge at the third generated token
    other = int(row.argsort(descending=True)[rank])
    seq["generated"][2] = other
    dist = seq["gen_dists"][2]
    dist[other], dist[int(row.argmax())] = dist[int(row.argmax())], dist[other]  # the engine preferred `other`
    m = _compare(record, ref)["a"]
    assert m["greedy_sequence_equal"] == 0.0
    assert m["closeness"] == (1.0 if close else 0.0)
    assert m["first_divergence"] == [2]


def test_raw_engine_logprobs_against_a_scaling_trainer_differ_only_away_from_t1():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 6, VOCAB, generator=g) * 2
    sample = {"cell": "c", "prompt": [1, 2, 3], "generated": [4, 5, 6]}
    ids = torch.tensor([sample["prompt"] + sample["generated"]])

    def scored(temperature, scales):
        return rollout.trainer_token_logprobs(rollout.realized_logprobs(logits, ids, temperature, scales), [sample])

    raw = scored(0.7, scales=False)
    assert raw == [torch.log_softmax(logits[0, 2:5], -1).double()[range(3), [4, 5, 6]].tolist()]  # token t+1 at t
    for temperature, expect_mismatch in ((1.0, False), (0.7, True)):
        trainer = scored(temperature, scales=True)
        m = rollout.compare([sample], raw, trainer)["c"]
        assert (m["max_abs_logprob"] > 1e-3) is expect_mismatch, (temperature, m)


def test_rollout_grid_is_larger_on_a_gpu_and_fits_the_model():
    spec = parse_spec(base_spec("grid"))
    config = {"vocab_size": 512, "max_position_embeddings": 512}
    cpu = _cells(spec, config, on_gpu=False)
    assert [(c["max_new_tokens"], c["n"]) for c in cpu] == [(8, 1), (8, 4), (32, 1), (32, 4)]
    gpu = _cells(spec, config, on_gpu=True)
    prompt = len(gpu[0]["prompt"])
    assert {c["n"] for c in gpu} == {1, 8, 32}
    assert max(c["max_new_tokens"] for c in gpu) == 512 - prompt  # 1024 asked, capped by the positions
