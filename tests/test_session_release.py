"""A judged measurement's files can be released: deleted, and made again if a later check asks for them."""
from __future__ import annotations

from pathlib import Path

from harness.session import CertifySession
from harness.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


class _CountingWorker:
    start_seconds, versions = 0.0, {}

    def __init__(self):
        self.calls = 0

    def call(self, op, args, timeout):
        self.calls += 1
        Path(args["out_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(args["out_dir"]) / "grads.safetensors").write_bytes(b"x" * 16)
        return {"grads": str(Path(args["out_dir"]) / "grads.safetensors")}


def test_a_released_measurement_is_deleted_and_made_again_when_asked(tmp_path):
    session = CertifySession([load_spec(REPO / "model_specs" / "qwen2.yaml")], device=None)
    worker = _CountingWorker()
    session.pool.get = lambda *a, **k: worker
    out, other = str(tmp_path / "row"), str(tmp_path / "shared")
    first = session.call("qwen2", "megatron", "train", dir="d", out_dir=out)
    session.call("qwen2", "hf", "train_reference", dir="d", out_dir=other)
    assert session.call("qwen2", "megatron", "train", dir="d", out_dir=out) == first and worker.calls == 2  # memo
    session.release(out)
    assert not Path(out).exists() and Path(other, "grads.safetensors").exists()  # only the released one
    session.call("qwen2", "megatron", "train", dir="d", out_dir=out)
    assert worker.calls == 3 and Path(first["grads"]).exists()  # made again, not served from the memo
