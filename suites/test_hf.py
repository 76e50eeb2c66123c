"""ROLL's DeepSpeed prerequisites: AutoModelForCausalLM loads it cleanly, it is a PreTrainedModel, save->load is exact."""
from harness.checks import hf_checks
from harness.plugin import conclude

SUITE = "hf"


def test_hf(check, certify, request):
    with certify.judging(check) as box:
        reference = certify.reference_dir(check.model, check.dtype)
        if check.variant == "load":
            box["verdict"] = hf_checks.judge_load(certify.call(check.model, "hf", "load", dir=reference, dtype=check.dtype))
        elif check.variant == "save-load":
            measurement = certify.call(check.model, "hf", "save_load", dir=reference, dtype=check.dtype)
            box["verdict"] = hf_checks.judge_save_load(measurement, certify.tolerance(check, ["save_load_max_abs_diff"]))
    conclude(request, certify, check, box["verdict"], box["seconds"])
