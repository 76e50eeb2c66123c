"""Config parsing: every HF config key reaches the backend with the same meaning."""
from harness.checks import config_parsing
from harness.plugin import conclude
from harness.spec_plugins import resolve_template

SUITE = "config"


def test_config(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        reference = certify.reference_dir(check.model, spec.dtypes[0])
        measurement = certify.call(check.model, check.backend, "config", dir=reference)
        box["verdict"] = config_parsing.judge(measurement, spec.config_waivers, resolve_template(spec).hf_model_type)
    conclude(request, certify, check, box["verdict"], box["seconds"])
