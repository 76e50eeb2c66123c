"""Train-step parity: the same batch from the same weights through a trainer backend and a plain torch step."""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness.checks import train
from harness.plan import is_moe
from harness.plugin import conclude
from harness.train_step import MICROBATCHES, STEPS
from harness.verdict import from_problems

SUITE = "train"


def _sequences(ref_dir: str) -> list[list[int]]:
    vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
    return prompt_sets(vocab)["padded_batch"]


def _reference(certify, model: str, dtype: str, warmup: int = 0, compute_dtype: str | None = None,
               replay: str | None = None, replay_name: str = "", attention: str | None = None,
               aux_microbatches: int = 0) -> dict:
    """The reference step in `dtype`'s recipe (bf16: fp32 master weights), computed in compute_dtype (default
    dtype); `replay`: a backend's train routing file, whose expert choices it follows (checks.train.REPLAY_RULE);
    `attention`: another of HF's attention kernels (eager, for the noise floor)."""
    ref_dir = certify.reference_dir(model, "float32")
    compute = compute_dtype or dtype
    name = f"train-ref-{dtype}-{compute}-w{warmup}-{attention or 'sdpa'}-aux{aux_microbatches}" + \
        (f"-replay-{replay_name}" if replay else "")
    return certify.call(model, "hf", "train_reference", dir=ref_dir, dtype=dtype, sequences=_sequences(ref_dir),
                        out_dir=str(certify.scratch(model) / name), steps=STEPS, warmup_zero_steps=warmup,
                        compute_dtype=compute, routing=replay, attention=attention, aux_microbatches=aux_microbatches)


def _aux_microbatches(certify, check) -> int:
    """Who adds the MoE load-balancing loss: megatron-core's schedule over its micro-batches; the DeepSpeed
    ranks train on the cross-entropy alone (0). A dense model has none: 0 for every trainer, so that their
    rows share one reference (at the 0.5B shape each reference run is minutes and 3.7 GB of scratch)."""
    return MICROBATCHES if check.backend == "megatron" and is_moe(certify.specs[check.model]) else 0


def _noise(certify, check, warmup: int, reference: dict, replay: str | None = None) -> list[tuple[dict, dict]]:
    """bf16: what rounding does to the recipe, HF's default attention beside its eager one (checks.train.FACTOR)."""
    def run(compute, attention=None):
        return _reference(certify, check.model, check.dtype, warmup, compute, replay,
                          check.short_id.replace("/", "-"), attention, _aux_microbatches(certify, check))

    exact = run("float32")
    return [(reference, exact), (run(None, "eager"), exact)]


def _backend_out_dir(certify, check) -> str:
    return str(certify.scratch(check.model) / check.short_id.replace("/", "-"))


def _run_backend(certify, check) -> dict:
    ref_dir = certify.reference_dir(check.model, "float32")
    out_dir = _backend_out_dir(certify, check)
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
    bf16 = check.dtype != "float32"
    aux = _aux_microbatches(certify, check)
    reference = _reference(certify, check.model, check.dtype, warmup, aux_microbatches=aux)
    noise = _noise(certify, check, warmup, reference) if bf16 else None
    own_routing = None
    if reference.get("routing"):  # MoE: the backend's routing is judged, and replayed in bf16
        own_routing = (noise[0][1]["routing"], [run["routing"] for run, _ in noise]) if bf16 else \
            (reference["routing"], None)
        if bf16 and result.get("routing"):
            reference = _reference(certify, check.model, check.dtype, warmup, None, result["routing"],
                                   check.short_id.replace("/", "-"), aux_microbatches=aux)
            noise = _noise(certify, check, warmup, reference, result["routing"])
    where = " ".join(p for p in (check.variant, check.layout, check.dtype) if p)
    verdict = train.evaluate(reference, result, check.dtype, certify.specs[check.model].tolerances, where, noise,
                             own_routing, _sequences(certify.reference_dir(check.model, "float32")))
    if warmup:
        verdict.metrics["reference_emulates"] = (
            f"{warmup} zero-gradient optimizer warm-up step(s) the backend takes before training "
            "(DeepSpeed FP16_UnfusedOptimizer.initialize_optimizer_states)")
    return verdict


def test_train(check, certify, request):
    with certify.judging(check) as box:
        box["verdict"] = _judge(certify, check, _run_backend(certify, check))
    certify.release(_backend_out_dir(certify, check))  # this row's own trainer output: no other check reads it
    conclude(request, certify, check, box["verdict"], box["seconds"])
