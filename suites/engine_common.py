"""What the engine suites share: HF's greedy reference, the record comparison, and calibrated bounds."""
from __future__ import annotations

import functools

from harness import engine_record
from harness.checks import engine_logits, logits
from harness.tolerances import ENGINE_LOGIT_METRICS, calibrate

ENGINES = ("vllm", "sglang", "lmdeploy")
MAX_NEW_TOKENS = 8  # greedy continuation compared token for token with HF's
MAX_TOP_K = 512  # full vocabulary for tiny models; top-512 (plus the realized token) for real ones


def top_k(vocab: int) -> int:
    return min(vocab, MAX_TOP_K)


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict:
    """A reference file is judged against by several checks; read it once (paths are per-session scratch)."""
    from safetensors.torch import load_file

    return load_file(path)


def greedy_reference(certify, model: str, dtype: str, prompts: dict) -> dict:
    """HF's greedy continuation + full-vocab log-probs of the fp32 reference checkpoint run in `dtype`."""
    ref_dir = certify.reference_dir(model, "float32")
    out = certify.scratch(model) / f"hf-greedy-{dtype}.safetensors"
    path = certify.call(model, "hf", "greedy_reference", dir=ref_dir, dtype=dtype, prompts=prompts,
                        max_new_tokens=MAX_NEW_TOKENS, out_path=str(out))["path"]
    return _load(path)


def engine_tolerance(certify, check, prompts: dict, vocab: int):
    """fp32: the defaults; bf16: 2 x HF-bf16's own noise measured with the same metrics (spec values win)."""
    fp32 = certify.tolerance(check.__class__(**{**check.__dict__, "dtype": "float32"}), list(ENGINE_LOGIT_METRICS))
    if check.dtype == "float32":
        return fp32, None
    truth = greedy_reference(certify, check.model, "float32", prompts)
    noisy = engine_logits.record_from_reference(greedy_reference(certify, check.model, check.dtype, prompts),
                                                prompts, top_k(vocab))
    noise = logits.worst(engine_logits.compare(noisy, truth), engine_logits.ENGINE_BOUNDS)
    tolerance = calibrate(noise, fp32, engine_logits.ENGINE_BOUNDS)
    tolerance.update({k: v for k, v in certify.specs[check.model].tolerances.get(check.dtype, {}).items()
                      if k in tolerance})
    return tolerance, {"method": "2 x HF-bf16 vs HF-fp32 noise", "noise": noise}


def judge_record(certify, check, record_path: str, prompts: dict, vocab: int, where: str, problems=()):
    truth = greedy_reference(certify, check.model, "float32", prompts)
    per_set = engine_logits.compare(engine_record.load(record_path), truth)
    tolerance, calibration = engine_tolerance(certify, check, prompts, vocab)
    return logits.judge(per_set, tolerance, where, list(problems), calibration, engine_logits.ENGINE_BOUNDS)
