"""After a failed logit check: capture both sides on the worst prompt set and localize the first divergence.

The judging is harness.checks.localize; this only asks the backends for their captures. The result goes
on the row (`localization`) and its one-line summary onto the failure message.
"""
from __future__ import annotations

from harness.checks import localize
from harness.errors import WorkerError

# backends with a capture op: Megatron (gloo/NCCL ranks), DeepSpeed and vLLM (the engine runs in-process, so
# forward hooks reach its model); SGLang and lmdeploy run out of process: their failures say so
CAPTURING = ("megatron", "deepspeed", "vllm")
NOT_CAPTURING = "the engine runs in its own process here: no forward hook reaches its model"


def _hf_capture(certify, model: str, ref_dir: str, dtype: str, sequences, set_name: str) -> str:
    out = certify.scratch(model) / f"capture-hf-{set_name}-{dtype}.safetensors"
    if not out.exists():
        certify.call(model, "hf", "capture", dir=ref_dir, dtype=dtype, sequences=sequences, out_path=str(out))
    return str(out)


def attach(certify, check, verdict, ref_dir: str, prompts: dict, backend_args: dict):
    """`verdict` with its localization when it failed on numbers, non-finite ones included (a structural failure
    has nothing to capture)."""
    if verdict.status != "failed":
        return verdict
    if check.backend not in CAPTURING:
        verdict.localization = {"status": "not_run", "reason": NOT_CAPTURING}
        return verdict
    # the worst set by |Δlogprob|, else one where the backend returned NaN/inf (numbers, though no metric)
    set_name = (localize.worst_prompt_set(verdict.metrics.get("per_set") or {})
                or next(iter(verdict.metrics.get("non_finite_sets") or []), None))
    if set_name is None:
        return verdict
    sequences = prompts[set_name]
    out_dir = certify.scratch(check.model) / f"capture-{check.short_id.replace('/', '-')}"
    try:
        truth = _hf_capture(certify, check.model, ref_dir, "float32", sequences, set_name)
        noise = (_hf_capture(certify, check.model, ref_dir, check.dtype, sequences, set_name)
                 if check.dtype != "float32" else None)
        run = certify.call(check.model, check.backend, "capture", dir=ref_dir, dtypes=[check.dtype],
                           sequences=sequences, out_dir=str(out_dir), **backend_args)
        if run["load_problems"]:
            result = {"status": "not_run", "reason": "the converted shards do not load: nothing to capture"}
        else:
            result = localize.evaluate(truth, run["files"].get(check.dtype), sequences, run["num_layers"],
                                       run["origin"], noise)
    except WorkerError as exc:  # the check's verdict stands; the localization says why it has none
        result = {"status": "error", "reason": str(exc).splitlines()[0]}
    verdict.localization = {**result, "prompt_set": set_name, "sequences": len(sequences)}
    if result.get("summary"):
        verdict.reason = f"{verdict.reason} | {result['summary']}"
    return verdict


# Suites whose failures are not localized by capturing one forward: why, and where to look instead
ELSEWHERE = {
    "refit": "a refit failure compares the engine after a weight sync with the trainer after its step, not a "
             "model with HF: a converter fault shows (and is localized) in this layout's logits row; a sync fault "
             "(a lost bucket, stale weights) is named in the reason",
    "rollout": "a rollout failure is in how log-probs are read or scaled over sampled tokens (the forward "
               "itself is the logits rows' subject, localized there)",
}


def elsewhere(check, verdict):
    """A failed refit/rollout row: localization not_run, with where the cause is localized instead."""
    if verdict.status == "failed" and check.suite in ELSEWHERE:
        verdict.localization = {"status": "not_run", "reason": ELSEWHERE[check.suite]}
    return verdict
