"""Registration: the engine resolves the model's architecture to a model class the way its users register one."""
from harness.backends import backend_class
from harness.plugin import conclude
from harness.verdict import from_problems

SUITE = "registration"


def test_registration(check, certify, request):
    with certify.judging(check) as box:
        dtype = certify.first_dtype(check.model)  # an engine already running for this run's dtype
        reference = certify.reference_dir(check.model, "float32")
        extra = {"dtype": dtype} if backend_class(check.backend).worker_per_dtype else {}
        m = certify.call(check.model, check.backend, "registration", dir=reference, **extra)
        box["verdict"] = from_problems(m["problems"], {k: v for k, v in m.items() if k != "problems"},
                                       {"problems": 0}, what="registration problems")
    conclude(request, certify, check, box["verdict"], box["seconds"])
