"""Registration: the engine resolves the model's architecture to a model class the way its users register one."""
from harness.plugin import conclude
from harness.verdict import from_problems

SUITE = "registration"


def test_registration(check, certify, request):
    with certify.judging(check) as box:
        reference = certify.reference_dir(check.model, certify.specs[check.model].dtypes[0])
        m = certify.call(check.model, check.backend, "registration", dir=reference)
        box["verdict"] = from_problems(m["problems"], {k: v for k, v in m.items() if k != "problems"},
                                       {"problems": 0}, what="registration problems")
    conclude(request, certify, check, box["verdict"], box["seconds"])
