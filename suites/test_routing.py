"""Routing agreement of an MoE model: the experts each token is sent to, per MoE layer, against HF fp32.

Planned for MoE specs only (harness/plan.py is_moe): Megatron per parallel layout (its ranks write the
routing file beside the log-probs of the logits suite's very run, so the two share one measurement) and
the vLLM engine (read off its fused-MoE routers in-process). Judged by harness/checks/routing.py.
"""
import json
from pathlib import Path

from fixtures.prompts import prompt_sets
from harness.checks import routing
from harness.plugin import conclude
from suites.engine_common import noise_attentions
from suites.engine_common import routing_reference as reference

SUITE = "routing"


def _megatron(certify, check, spec, ref_dir: str, prompts: dict) -> tuple[list[str] | None, list[str]]:
    """The logits suite's Megatron run at this layout (memoised: the same call), and its routing files."""
    layout = next(lay for lay in spec.parallel if lay.id == check.layout)
    extra = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep}  # exactly suites/test_logits.py's call
    out_dir = str(certify.scratch(check.model) / f"{check.backend}-{check.variant}{check.layout}")
    run = certify.call(check.model, check.backend, "logprobs", dir=ref_dir, dtypes=certify.selected_dtypes(check.model),
                       prompts=prompts, out_dir=out_dir, **extra)
    paths = (run.get("routing") or {}).get(check.dtype)
    paths = [paths] if isinstance(paths, str) else paths
    return paths, list(run.get("load_problems") or [])


def _vllm(certify, check, ref_dir: str, prompts: dict) -> tuple[list[str], list[str]]:
    out = certify.scratch(check.model) / f"vllm-routing-{check.dtype}.safetensors"
    run = certify.call(check.model, "vllm", "routing", dir=ref_dir, dtype=check.dtype, prompts=prompts,
                       out_path=str(out))
    return [run["path"]], list(run["problems"])


def test_routing(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        ref_dir = certify.reference_dir(check.model, "float32")
        prompts = prompt_sets(json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"])
        if check.backend == "vllm":
            paths, problems = _vllm(certify, check, ref_dir, prompts)
        else:
            paths, problems = _megatron(certify, check, spec, ref_dir, prompts)
        noise = [reference(certify, check.model, check.dtype, prompts, attention) for attention in noise_attentions(certify, check.model)] \
            if check.dtype != "float32" else None
        where = " ".join(p for p in (check.layout, check.dtype) if p)
        box["verdict"] = routing.evaluate(reference(certify, check.model, "float32", prompts), paths, prompts,
                                          check.dtype, spec.tolerances, where, problems, noise)
    conclude(request, certify, check, box["verdict"], box["seconds"])
