"""Logit parity of a backend against the HF fp32 reference, per dtype and parallel layout."""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness.checks import logits
from harness.metrics import compare_files
from harness.plugin import conclude
from harness.tolerances import LOGIT_METRICS, calibrate

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
    tolerance = calibrate(noise, fp32)
    tolerance.update(certify.specs[check.model].tolerances.get(check.dtype, {}))  # an explicit spec value wins
    return {k: tolerance[k] for k in LOGIT_METRICS}, {"method": "2 x HF-bf16 vs HF-fp32 noise", "noise": noise}


def test_logits(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        ref_dir = certify.reference_dir(check.model, "float32")
        prompts = _prompts(ref_dir)
        reference = _reference(certify, check.model, "float32")
        dtypes = [d for d in spec.dtypes if not certify.dtypes or d in certify.dtypes]
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
        box["verdict"] = logits.judge(per_set, tolerance, where, run["load_problems"],
                                      calibration)
    conclude(request, certify, check, box["verdict"], box["seconds"])
