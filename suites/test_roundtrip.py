"""Weight conversion round trip HF -> Megatron-core -> HF through the spec's template."""
from harness.checks import roundtrip
from harness.plugin import conclude

SUITE = "roundtrip"


def test_roundtrip(check, certify, request):
    spec = certify.specs[check.model]
    with certify.judging(check) as box:
        dtype = check.dtype or spec.dtypes[0]
        measurement = certify.call(check.model, check.backend, "roundtrip", dir=certify.reference_dir(check.model, dtype))
        if check.variant == "bit-exact":
            box["verdict"] = roundtrip.judge_bit_exact(measurement, certify.tolerance(check, ["roundtrip_max_abs_diff"]))
        elif check.variant == "consumption":
            box["verdict"] = roundtrip.judge_consumption(measurement)
        elif check.variant == "names-shapes":
            box["verdict"] = roundtrip.judge_names_shapes(measurement["mca_shapes"], measurement["expected_shapes"])
    conclude(request, certify, check, box["verdict"], box["seconds"])
