"""Logit parity backend vs HF reference. No backend implements it in this version: planned checks are not_run."""
from harness.plugin import conclude
from harness.verdict import Verdict

SUITE = "logits"


def test_logits(check, certify, request):
    # Reached only if a backend claims the suite without an implementation here: never a pass.
    conclude(request, certify, check, Verdict("error", "logits suite has no implementation for this backend"))
