"""Train-step parity vs a torch reference. No backend implements it in this version: planned checks are not_run."""
from harness.plugin import conclude
from harness.verdict import Verdict

SUITE = "train"


def test_train(check, certify, request):
    # Reached only if a backend claims the suite without an implementation here: never a pass.
    conclude(request, certify, check, Verdict("error", "train suite has no implementation for this backend"))
