"""Trainer <-> engine parity: the engine samples, a trainer backend scores the same tokens."""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness.checks import rollout
from harness.plan import parse_rollout_variant
from harness.plugin import conclude
from suites import engine_common, localization

SUITE = "rollout"


def _cells(spec, config: dict, on_gpu: bool) -> list[dict]:
    """The seq-len x batch grid (NeMo-RL's, scaled to the machine): `batch` samples of one fixed prompt.

    Generated lengths are capped so that prompt + continuation fits the model's positions."""
    prompt = prompt_sets(config["vocab_size"])["medium"][0]
    room = int(config.get("max_position_embeddings") or 10**9) - len(prompt)
    lengths = spec.rollout.gpu_max_new_tokens if on_gpu else spec.rollout.max_new_tokens
    batches = spec.rollout.gpu_batch_sizes if on_gpu else spec.rollout.batch_sizes
    return [{"cell": f"new{min(n, room)}-batch{b}", "prompt": prompt, "n": b, "max_new_tokens": min(n, room)}
            for n in dict.fromkeys(lengths) for b in batches]


def _scores(certify, model: str, trainer: str, dtype: str, samples: list[dict], temperature: float, tag: str,
            attention: str | None = None) -> list[list[float]]:
    """The trainer's log-probs of the sampled tokens under the spec's convention (the worker returns only the
    realized tokens' scores, never [batch, seq, vocab]); `attention`: another of HF's kernels, a second noise run."""
    from safetensors.torch import load_file

    spec = certify.specs[model]
    ref_dir = certify.reference_dir(model, "float32")
    prompts = {"rollout": [s["prompt"] + s["generated"] for s in samples]}
    realized = {"temperature": temperature, "scales": spec.rollout.trainer_scales_by_temperature}
    out = certify.scratch(model) / f"rollout-{trainer}-{dtype}-{tag}"
    if trainer == "hf":
        suffix, extra = engine_common.kernel(attention)
        path = certify.call(model, "hf", "logprobs", dir=ref_dir, dtype=dtype, prompts=prompts, realized=realized,
                            out_path=f"{out}{suffix}.safetensors", **extra)["path"]
    else:
        extra = {"tp": spec.parallel[0].tp, "pp": spec.parallel[0].pp} if trainer == "megatron" else {}
        run = certify.call(model, trainer, "logprobs", dir=ref_dir, dtypes=[dtype], prompts=prompts,
                           realized=realized, out_dir=str(out), **extra)
        if run.get("load_problems"):
            raise RuntimeError(f"{trainer} could not load the model: {run['load_problems'][:3]}")
        path = run["files"][dtype]
    return rollout.trainer_token_logprobs(load_file(path)["rollout"], samples)


def test_rollout(check, certify, request):
    spec = certify.specs[check.model]
    trainer, temperature = parse_rollout_variant(check.variant)
    with certify.judging(check) as box:
        ref_dir = certify.reference_dir(check.model, "float32")
        config = json.loads((Path(ref_dir) / "config.json").read_text())
        out = certify.scratch(check.model) / f"{check.backend}-samples-{check.dtype}-t{temperature:g}.json"
        cells = _cells(spec, config, certify.device.cuda)  # the engine runs where the session's device is
        run = certify.call(check.model, check.backend, "sample", dir=ref_dir, dtype=check.dtype, cells=cells,
                           temperature=temperature, seed=spec.rollout.seed, out_path=str(out))
        payload = json.loads(Path(run["path"]).read_text())
        samples = payload["samples"]
        problems = []
        if payload.get("logprobs_mode") != spec.rollout.engine_logprobs:  # the engine could not honour the spec
            problems.append(f"the engine returned {payload.get('logprobs_mode')!r} logprobs, the spec's "
                            f"rollout.engine_logprobs is {spec.rollout.engine_logprobs!r}")
        tag = f"{check.backend}-t{temperature:g}"
        scales = spec.rollout.trainer_scales_by_temperature

        def score(who, dtype, attention=None):
            return _scores(certify, check.model, who, dtype, samples, temperature, tag, attention)

        bf16 = check.dtype != "float32"
        where = (f"{trainer} vs {check.backend} at T={temperature:g} {check.dtype} (engine logprobs: "
                 f"{spec.rollout.engine_logprobs}, trainer scales by T: {scales})")
        box["verdict"] = rollout.evaluate(
            cells, samples, [s.get("logprobs", []) for s in samples], score(trainer, check.dtype), check.dtype,
            spec.tolerances, where, problems, hf_truth=score("hf", "float32") if bf16 else None,
            hf_noisy=[score("hf", check.dtype, attention) for attention in engine_common.noise_attentions(
                certify, check.model)] if bf16 else None)
        localization.elsewhere(check, box["verdict"])
    conclude(request, certify, check, box["verdict"], box["seconds"])
