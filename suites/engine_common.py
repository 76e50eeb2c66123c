"""What the engine suites share: HF's greedy reference and the engine-record judge's inputs."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from harness import engine_record
from harness.checks import engine_logits, routing
from harness.plan import is_moe
from suites import localization

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


def hf_logprobs(certify, model: str, dtype: str, prompts: dict, attention: str | None = None) -> str:
    """HF's full-vocabulary prompt log-probs of the fp32 reference checkpoint run in `dtype` (fp32 = truth, bf16 =
    noise; `attention`: another of HF's kernels, a second noise run), once per session: the path."""
    ref_dir = certify.reference_dir(model, "float32")
    suffix, extra = kernel(attention)
    out = certify.scratch(model) / f"hf-{dtype}{suffix}.safetensors"
    return certify.call(model, "hf", "logprobs", dir=ref_dir, dtype=dtype, prompts=prompts, out_path=str(out),
                        **extra)["path"]


def routing_reference(certify, model: str, dtype: str, prompts: dict, attention: str | None = None) -> str:
    """HF's routing of the fp32 reference checkpoint run in `dtype` (fp32 = truth, bf16 = noise), once."""
    ref_dir = certify.reference_dir(model, "float32")
    suffix, extra = kernel(attention)
    out = certify.scratch(model) / f"hf-routing-{dtype}{suffix}.safetensors"
    return certify.call(model, "hf", "routing", dir=ref_dir, dtype=dtype, prompts=prompts, out_path=str(out),
                        **extra)["path"]


def kernel(attention: str | None) -> tuple[str, dict]:
    """(file-name suffix, call arguments) of an HF run with another attention kernel than its default."""
    return (f"-{attention}", {"attention": attention}) if attention else ("", {})


def noise_attentions(certify, model: str) -> tuple[str | None, ...]:
    """HF's bf16 noise runs: its default attention, and for an MoE model eager as well (logits.NOISE_RUNS_RULE)."""
    return (None, "eager") if is_moe(certify.specs[model]) else (None,)


def routing_ties(certify, model: str, dtype: str, prompts: dict):
    """An MoE model in bf16: HF's routing near-tie tokens per prompt set (logits.MARGIN_RULE); else None."""
    if dtype == "float32" or not is_moe(certify.specs[model]):
        return None
    paths = (routing_reference(certify, model, "float32", prompts), routing_reference(certify, model, dtype, prompts))
    return _near_ties(*paths, json.dumps(prompts, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _near_ties(truth_path: str, noisy_path: str, prompts_json: str):
    """Every bf16 row of a model asks for the same two files' near-ties (paths are per-session scratch)."""
    truth, _ = routing.load(truth_path, "reference")
    noisy, _ = routing.load(noisy_path, "HF-bf16")
    return routing.near_tie_tokens(truth, noisy, json.loads(prompts_json))


def with_tie_count(verdict, ties):
    """The verdict, with how many tokens were judged as routing near-ties (when any rule applied)."""
    if ties is not None:
        verdict.metrics["routing_near_tie_tokens"] = int(sum(int(t.sum()) for t in ties.values()))
    return verdict


def greedy_reference(certify, model: str, dtype: str, prompts: dict, attention: str | None = None) -> dict:
    """HF's greedy continuation + full-vocab log-probs of the fp32 reference checkpoint run in `dtype`
    (`attention`: another of HF's kernels, a second noise run)."""
    ref_dir = certify.reference_dir(model, "float32")
    suffix, extra = kernel(attention)
    out = certify.scratch(model) / f"hf-greedy-{dtype}{suffix}.safetensors"
    path = certify.call(model, "hf", "greedy_reference", dir=ref_dir, dtype=dtype, prompts=prompts,
                        max_new_tokens=MAX_NEW_TOKENS, out_path=str(out), **extra)["path"]
    return _load(path)


def judge_record(certify, check, record_path: str, prompts: dict, where: str, problems=()):
    """An engine record against HF fp32's greedy reference (bf16: calibrated on HF's own bf16 run)."""
    truth = greedy_reference(certify, check.model, "float32", prompts)
    noisy = [greedy_reference(certify, check.model, check.dtype, prompts, attention)
             for attention in noise_attentions(certify, check.model)] if check.dtype != "float32" else None
    ties = routing_ties(certify, check.model, check.dtype, prompts)
    return with_tie_count(engine_logits.evaluate(truth, noisy, engine_record.load(record_path), prompts, check.dtype,
                                                 certify.specs[check.model].tolerances, where, list(problems),
                                                 routing_ties=ties), ties)


def judge_engine_logits(certify, check, ref_dir: str, prompts: dict):
    """A rollout engine: prompt log-probs and a greedy continuation, against HF's."""
    vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
    out = certify.scratch(check.model) / f"{check.backend}-logits-{check.dtype}.json"
    run = certify.call(check.model, check.backend, "logprobs", dir=ref_dir, dtype=check.dtype, prompts=prompts,
                       top_k=top_k(vocab), max_new_tokens=MAX_NEW_TOKENS, out_path=str(out))
    verdict = judge_record(certify, check, run["path"], prompts, check.dtype)
    return localization.attach(certify, check, verdict, ref_dir, prompts, {})

