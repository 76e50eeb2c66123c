"""Logit parity of a backend against the HF fp32 reference, per dtype and parallel layout."""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness.checks import logits
from harness.plugin import conclude
from suites import engine_common, localization

SUITE = "logits"


def _prompts(ref_dir: str) -> dict:
    vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
    return prompt_sets(vocab)


def test_logits(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        ref_dir = certify.reference_dir(check.model, "float32")
        prompts = _prompts(ref_dir)
        if check.backend in engine_common.ENGINES:
            box["verdict"] = engine_common.judge_engine_logits(certify, check, ref_dir, prompts)
        else:
            box["verdict"] = _trainer_logits(certify, check, spec, ref_dir, prompts)
    conclude(request, certify, check, box["verdict"], box["seconds"])


def _trainer_logits(certify, check, spec, ref_dir: str, prompts: dict):
    """A trainer backend (per parallel layout): full-vocabulary log-probs against HF's."""
    dtypes = certify.selected_dtypes(check.model)
    out_dir = str(certify.scratch(check.model) / f"{check.backend}-{check.variant}{check.layout}")
    extra = {}
    if check.layout:  # a parallel layout of a trainer backend
        layout = next(lay for lay in spec.parallel if lay.id == check.layout)
        extra = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep}
    run = certify.call(check.model, check.backend, "logprobs", dir=ref_dir, dtypes=dtypes, prompts=prompts,
                       out_dir=out_dir, **extra)
    where = " ".join(p for p in (check.variant, check.layout, check.dtype) if p)
    noise = [engine_common.hf_logprobs(certify, check.model, check.dtype, prompts, attention)
             for attention in engine_common.noise_attentions(certify, check.model)] if check.dtype != "float32" else None
    ties = engine_common.routing_ties(certify, check.model, check.dtype, prompts)
    truth = engine_common.hf_logprobs(certify, check.model, "float32", prompts)
    verdict = logits.evaluate(truth, run["files"].get(check.dtype), prompts, check.dtype, spec.tolerances, where,
                              run["load_problems"], noise, routing_ties=ties)
    verdict = engine_common.with_tie_count(verdict, ties)
    return localization.attach(certify, check, verdict, ref_dir, prompts, extra)
