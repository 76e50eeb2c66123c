"""Config parsing: every HF config key reaches the backend with the same meaning."""
from harness.checks import config_parsing
from harness.backends import backend_class
from harness.plugin import conclude
from harness.spec_plugins import resolve_template

SUITE = "config"


def test_config(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        engine = backend_class(check.backend).worker_per_dtype
        reference = certify.reference_dir(check.model, "float32" if engine else spec.dtypes[0])
        # an engine fixed to one dtype per worker: the one this run starts anyway
        extra = {"dtype": certify.first_dtype(check.model)} if engine else {}
        measurement = certify.call(check.model, check.backend, "config", dir=reference, **extra)
        # a template named by converter.template is registered under its own key ("qwen2-bad-rope"), not
        # under the model type it serves; that model type is then the spec's hf_model_type. Only megatron's
        # config goes through a template: an engine's is judged against the spec's model type (a spec with
        # no trainer may have no template at all)
        uses_template = check.backend == "megatron" and not spec.converter.template
        model_type = resolve_template(spec).hf_model_type if uses_template else spec.hf_model_type
        box["verdict"] = config_parsing.judge(measurement, spec.config_waivers, model_type)
    conclude(request, certify, check, box["verdict"], box["seconds"])
