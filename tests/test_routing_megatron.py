"""Routing agreement through the Megatron ranks (gloo on CPU): the router decisions megatron-core's own
TopKRouter takes on the converted, sharded weights (harness/backends/megatron.py op_logprobs "routing")
against HF fp32's, judged by harness/checks/routing.py.

The correct qwen2_moe template routes every token of every MoE layer exactly as HF does (TP1 and PP2, the
stages' files joined); the planted tests/data/moe_rank_bugs.py qwen2_moe-experts-exchanged (experts 0 and 1
sent to each other's Megatron slot) leaves layer 0's routing intact -- its router is untouched -- and is
caught in layer 1, whose input the exchanged experts changed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fixtures.prompts import prompt_sets
from harness.checks import routing
from harness.workers import Worker

from .conftest import REPO

pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("megatron") is None, reason="megatron-core not installed")
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec")
    spec = yaml.safe_load((REPO / "model_specs" / "qwen2_moe.yaml").read_text())
    spec.pop("calibration", None)
    spec.update(name="moe-routing", dtypes=["float32"], plugins=[*spec["plugins"], str(DATA / "moe_rank_bugs.py")])
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    hf, mcore = Worker("hf", str(folder / "spec.yaml")), Worker("megatron", str(folder / "spec.yaml"))
    ref_dir = hf.call("materialize", {"model_type": "qwen2_moe", "overrides": spec["reference"]["config"],
                                      "seed": spec["reference"]["seed"], "dtype": "float32", "path": None})["dir"]
    prompts = prompt_sets(json.loads((Path(ref_dir) / "config.json").read_text())["vocab_size"])
    tmp = tmp_path_factory.mktemp("rig")
    truth = hf.call("routing", {"dir": ref_dir, "dtype": "float32", "prompts": prompts,
                                "out_path": str(tmp / "hf-routing.safetensors")})["path"]

    def judge(template: str, tp: int = 1, pp: int = 1):
        run = mcore.call("logprobs", {"dir": ref_dir, "dtypes": ["float32"], "tp": tp, "pp": pp, "prompts": prompts,
                                      "out_dir": str(tmp / f"{template}-{tp}-{pp}"), "template": template},
                         timeout=600)
        return routing.evaluate(truth, (run.get("routing") or {}).get("float32"), prompts, "float32", {},
                                f"tp{tp}pp{pp} float32", run["load_problems"])

    yield judge
    for worker in (hf, mcore):
        worker.close()


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)])
def test_megatron_routes_exactly_as_hf(rig, tp, pp):
    verdict = rig("qwen2_moe", tp, pp)
    assert verdict.status == "passed", verdict.reason
    assert all(row["routing_agreement"] == 1.0 for row in verdict.metrics["per_layer"].values())
    assert sorted(verdict.metrics["per_layer"]) == ["layers.0", "layers.1"]
    assert verdict.metrics["router_prob_diff"] < 1e-5


def test_experts_exchanged_by_the_template_fail_in_the_next_layer(rig):
    verdict = rig("qwen2_moe-experts-exchanged")
    assert verdict.status == "failed"
    layers = verdict.metrics["per_layer"]
    assert layers["layers.0"]["routing_agreement"] == 1.0  # the router itself converted correctly
    assert layers["layers.1"]["routing_agreement"] < 0.95
    assert "tp1pp1 float32 layers.1: routing_agreement" in verdict.reason
