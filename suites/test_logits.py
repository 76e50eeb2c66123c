"""Logit parity of a backend against the HF fp32 reference, per dtype and parallel layout."""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness.checks import logits
from harness.metrics import compare_files
from harness.plugin import conclude
from harness.tolerances import LOGIT_METRICS, calibrate
from suites import engine_common

SUITE = "logits"


def _reference(certify, model: str, dtype: str) -> str:
    """HF log-probs of the fp32 reference checkpoint run in `dtype` (fp32 = truth, bf16 = noise)."""
    ref_dir = certify.reference_dir(model, "float32")
    out = certify.scratch(model) / f"hf-{dtype}.safetensors"
    return certify.call(model, "hf", "logprobs", dir=ref_dir, dtype=dtype, prompts=_prompts(ref_dir),
                        out_path=str(out))["path"]


def _prompts(ref_dir: str) -> dict:
    vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
    return prompt_sets(vocab)


def _tolerance(certify, check, prompts):
    fp32 = certify.tolerance(check.__class__(**{**check.__dict__, "dtype": "float32"}), list(LOGIT_METRICS))
    if check.dtype == "float32":
        return fp32, None
    noise_sets = compare_files(_reference(certify, check.model, "float32"),
                               _reference(certify, check.model, check.dtype), prompts)
    noise = logits.worst(noise_sets)
    tolerance = calibrate(noise, fp32, logits.BOUNDS)
    tolerance.update(certify.specs[check.model].tolerances.get(check.dtype, {}))  # an explicit spec value wins
    return {k: tolerance[k] for k in LOGIT_METRICS}, {"method": "2 x HF-bf16 vs HF-fp32 noise", "noise": noise}


def _engine_logits(certify, check, ref_dir: str, prompts: dict):
    """A rollout engine: prompt log-probs and a greedy continuation, against HF's."""
    vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
    out = certify.scratch(check.model) / f"{check.backend}-logits-{check.dtype}.json"
    run = certify.call(check.model, check.backend, "logprobs", dir=ref_dir, dtype=check.dtype, prompts=prompts,
                       top_k=engine_common.top_k(vocab), max_new_tokens=engine_common.MAX_NEW_TOKENS,
                       out_path=str(out))
    return engine_common.judge_record(certify, check, run["path"], prompts, vocab, check.dtype)


def test_logits(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        ref_dir = certify.reference_dir(check.model, "float32")
        prompts = _prompts(ref_dir)
        if check.backend in engine_common.ENGINES:
            box["verdict"] = _engine_logits(certify, check, ref_dir, prompts)
        else:
            box["verdict"] = _trainer_logits(certify, check, spec, ref_dir, prompts)
    conclude(request, certify, check, box["verdict"], box["seconds"])


def _trainer_logits(certify, check, spec, ref_dir: str, prompts: dict):
    """A trainer backend (per parallel layout): full-vocabulary log-probs against HF's."""
    reference = _reference(certify, check.model, "float32")
    dtypes = certify.selected_dtypes(check.model)
    out_dir = str(certify.scratch(check.model) / f"{check.backend}-{check.variant}{check.layout}")
    extra = {}
    if check.layout:  # a parallel layout of a trainer backend
        layout = next(lay for lay in spec.parallel if lay.id == check.layout)
        extra = {"tp": layout.tp, "pp": layout.pp}
    run = certify.call(check.model, check.backend, "logprobs", dir=ref_dir, dtypes=dtypes, prompts=prompts,
                       out_dir=out_dir, **extra)
    tolerance, calibration = _tolerance(certify, check, prompts)
    per_set = {} if run["load_problems"] else compare_files(reference, run["files"][check.dtype], prompts)
    where = " ".join(p for p in (check.variant, check.layout, check.dtype) if p)
    return logits.judge(per_set, tolerance, where, run["load_problems"], calibration)
