"""Train-step parity: the same batch from the same weights through a trainer backend and a plain torch step."""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness.checks import train
from harness.plugin import conclude
from harness.train_step import STEPS
from harness.verdict import from_problems

SUITE = "train"


def _sequences(ref_dir: str) -> list[list[int]]:
    vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
    return prompt_sets(vocab)["padded_batch"]


def _reference(certify, model: str, dtype: str, warmup: int = 0, compute_dtype: str | None = None) -> dict:
    """The reference step in `dtype`'s recipe (bf16: fp32 master weights), computed in compute_dtype (default dtype)."""
    ref_dir = certify.reference_dir(model, "float32")
    compute = compute_dtype or dtype
    return certify.call(model, "hf", "train_reference", dir=ref_dir, dtype=dtype, sequences=_sequences(ref_dir),
                        out_dir=str(certify.scratch(model) / f"train-ref-{dtype}-{compute}-w{warmup}"), steps=STEPS,
                        warmup_zero_steps=warmup, compute_dtype=compute)


def _run_backend(certify, check) -> dict:
    ref_dir = certify.reference_dir(check.model, "float32")
    out_dir = str(certify.scratch(check.model) / check.short_id.replace("/", "-"))
    if check.backend == "deepspeed":
        stage, world = check.variant.removeprefix("zero").split("-ws")
        return certify.call(check.model, "deepspeed", "train", dir=ref_dir, stage=int(stage), dtype=check.dtype,
                            world=int(world), sequences=_sequences(ref_dir), steps=STEPS, out_dir=out_dir)
    layout = next(lay for lay in certify.specs[check.model].parallel if lay.id == check.layout)
    return certify.call(check.model, check.backend, "train", dir=ref_dir, dtype=check.dtype, tp=layout.tp,
                        pp=layout.pp, ep=layout.ep, sequences=_sequences(ref_dir), steps=STEPS, out_dir=out_dir)


def _judge(certify, check, result):
    if result.get("load_problems"):  # the converter produced shards megatron-core cannot load
        return from_problems(result["load_problems"], {}, {}, what="converted shards that do not load")
    if result.get("gather_problems"):  # the ranks' gradients/weights do not gather back into one model
        return from_problems(result["gather_problems"], {}, {}, what="rank results that do not gather back")
    # An optimizer that warms Adam up with zero-gradient steps is emulated in the reference, and said so.
    warmup = int(result.get("optimizer_warmup_steps", 0))
    # bf16: HF's emulation of the trainers' recipe (fp32 master weights, bf16 compute); the same recipe
    # computed in fp32 beside it calibrates the bounds (what bf16 rounding does to it)
    reference = _reference(certify, check.model, check.dtype, warmup)
    noise = (reference, _reference(certify, check.model, check.dtype, warmup, compute_dtype="float32")) \
        if check.dtype != "float32" else None
    where = " ".join(p for p in (check.variant, check.layout, check.dtype) if p)
    verdict = train.evaluate(reference, result, check.dtype, certify.specs[check.model].tolerances, where, noise)
    if warmup:
        verdict.metrics["reference_emulates"] = (
            f"{warmup} zero-gradient optimizer warm-up step(s) the backend takes before training "
            "(DeepSpeed FP16_UnfusedOptimizer.initialize_optimizer_states)")
    return verdict


def test_train(check, certify, request):
    with certify.judging(check) as box:
        box["verdict"] = _judge(certify, check, _run_backend(certify, check))
    conclude(request, certify, check, box["verdict"], box["seconds"])
