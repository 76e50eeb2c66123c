"""Weight sync (refit): a dummy-weight engine receives the trainer's weights and must then match HF."""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness import engine_record
from harness.checks import engine_logits, logits
from harness.plugin import conclude
from suites import engine_common

SUITE = "refit"


def test_refit(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        ref_dir = certify.reference_dir(check.model, "float32")
        vocab = json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"]
        prompts = prompt_sets(vocab)
        layout = next(lay for lay in spec.parallel if lay.id == check.layout)
        out = certify.scratch(check.model) / f"{check.backend}-refit-{check.dtype}-{check.layout}.json"
        run = certify.call(check.model, check.backend, "refit", dir=ref_dir, dtype=check.dtype, prompts=prompts,
                           top_k=engine_common.top_k(vocab), max_new_tokens=engine_common.MAX_NEW_TOKENS,
                           tp=layout.tp, pp=layout.pp, out_path=str(out))
        problems = [f"conversion: {p}" for p in run["conversion_problems"]]
        if run["not_loaded"]:
            problems.append(f"{len(run['not_loaded'])} engine parameters never received a weight: "
                            f"{', '.join(run['not_loaded'][:4])}")
        truth = engine_common.greedy_reference(certify, check.model, "float32", prompts)
        dummy = logits.worst(engine_logits.compare(engine_record.load(run["dummy_path"]), truth),
                             engine_logits.ENGINE_BOUNDS)
        verdict = engine_common.judge_record(certify, check, run["path"], prompts, vocab,
                                             f"after refit from {check.layout} {check.dtype}", problems)
        if dummy["max_abs_logprob"] <= verdict.tolerance["max_abs_logprob"]:  # the check would prove nothing
            verdict.status, verdict.reason = "error", "dummy weights already matched HF: the refit was not observable"
        verdict.metrics["refit"] = {"sent_tensors": run["sent_tensors"], "loaded_parameters": run["loaded"],
                                    "dummy_max_abs_logprob": dummy["max_abs_logprob"]}
        box["verdict"] = verdict
    conclude(request, certify, check, box["verdict"], box["seconds"])
