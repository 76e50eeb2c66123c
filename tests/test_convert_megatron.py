"""The converter against real megatron-core, through the real workers (HF materializes, Megatron round-trips).

Worker starts are the cost (~5 s each), so one HF worker and one Megatron worker are shared by the
module, and the negative control starts one more Megatron worker for its plugin spec.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import yaml

from harness.checks.roundtrip import judge_bit_exact, judge_consumption, judge_names_shapes
from harness.spec import load_spec
from harness.tolerances import resolve
from harness.workers import Worker

from .conftest import base_spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")

BAD_TEMPLATE = '''
"""qwen2 with the qkv bias op forgotten: Megatron's linear_qkv.bias is never produced."""
import copy

import harness.templates.qwen2  # noqa: F401
from harness.convert import QKVBiasConverOp, register_template, templates

base = templates["qwen2"]
register_template(
    "qwen2-bad",
    config_hf_to_mca=base.config_hf_to_mca,
    weight_converters=[copy.deepcopy(op) for op in base.weight_converters if not isinstance(op, QKVBiasConverOp)],
    hf_layer_prefix=base.hf_layer_prefix,
    constant_mca_config=base.constant_mca_config,
)
'''


def spec_with(name: str, dtypes=("float32",), **config) -> dict:
    spec = base_spec(name, dtypes=list(dtypes))
    spec["reference"] = copy.deepcopy(spec["reference"])
    spec["reference"]["config"].update(config)
    return spec


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One HF worker (hermetic model cache) and one Megatron worker on the stock qwen2 spec."""
    root = tmp_path_factory.mktemp("convert-megatron")
    spec_path = root / "qwen2.yaml"
    spec_path.write_text(yaml.safe_dump(base_spec("qwen2-shared"), sort_keys=False))
    env = {"HARNESS_CACHE_DIR": str(root / "cache")}
    workers: dict[str, Worker] = {}
    try:
        workers["hf"] = Worker("hf", str(spec_path), env=env)
        workers["megatron"] = Worker("megatron", str(spec_path))
        yield workers
    finally:
        for worker in workers.values():
            worker.close()


def materialize(hf: Worker, spec_path, dtype: str) -> str:
    spec = load_spec(spec_path)
    ref = spec.reference
    return hf.call("materialize", {"model_type": spec.hf_model_type, "overrides": ref.config, "seed": ref.seed,
                                   "dtype": dtype}, timeout=300)["dir"]


VARIATIONS = [  # (name, reference.config changes, dtype)
    ("tied", {"tie_word_embeddings": True}, "bfloat16"),
    ("mqa", {"num_key_value_heads": 1}, "float32"),
    ("mha", {"num_key_value_heads": 4}, "float32"),  # == num_attention_heads
]


def test_qwen2_variations_roundtrip_through_megatron(shared, make_spec):
    # One test, not parametrized: under pytest-xdist a parametrized set lands on both processes and each
    # would start its own pair of workers.
    for variation, config, dtype in VARIATIONS:
        spec_path = make_spec(spec_with(f"qwen2-{variation}", dtypes=[dtype], **config), filename=f"{variation}.yaml")
        assert load_spec(spec_path).template_name == "qwen2"  # the shared Megatron worker's template
        directory = materialize(shared["hf"], spec_path, dtype)

        m = shared["megatron"].call("roundtrip", {"dir": directory}, timeout=300)

        where = f"variation {variation} ({config}, {dtype})"
        shapes = judge_names_shapes(m["mca_shapes"], m["expected_shapes"])
        assert shapes.status == "passed", f"{where}: {shapes.reason}"
        exact = judge_bit_exact(m, resolve(dtype, None, ["roundtrip_max_abs_diff"]))
        assert exact.status == "passed", f"{where}: {exact.reason}"
        assert m["comparison"]["max_abs_diff"] == 0 and m["comparison"]["tensors"] > 0, where
        assert judge_consumption(m).status == "passed", where
        assert m["mca_dtypes"] == [f"torch.{dtype}"], where

        heads, hidden, ffn = 4, 128, 256
        groups = config.get("num_key_value_heads", 2)
        qkv = (heads + 2 * groups) * (hidden // heads)
        expected = m["expected_shapes"]
        assert expected["decoder.layers.0.self_attention.linear_qkv.weight"] == [qkv, hidden], where
        assert expected["decoder.layers.0.self_attention.linear_qkv.bias"] == [qkv], where
        assert expected["decoder.layers.0.mlp.linear_fc1.weight"] == [2 * ffn, hidden], where
        tied = config.get("tie_word_embeddings", False)
        assert ("output_layer.weight" in expected) is (not tied), where
        assert ("output_layer.weight" in m["mca_shapes"]) is (not tied), where


def test_plugin_template_missing_qkv_bias_is_named(shared, make_spec):
    spec = base_spec("qwen2-bad", plugins=["bad_template.py"], converter={"template": "qwen2-bad"},
                     dtypes=["float32"])
    spec_path = make_spec(spec, files={"bad_template.py": BAD_TEMPLATE})
    directory = materialize(shared["hf"], spec_path, "float32")

    worker = Worker("megatron", str(spec_path))
    try:
        m = worker.call("roundtrip", {"dir": directory}, timeout=300)
    finally:
        worker.close()

    shapes = judge_names_shapes(m["mca_shapes"], m["expected_shapes"])
    assert shapes.status == "failed"
    assert ("decoder.layers.0.self_attention.linear_qkv.bias: megatron-core expects this tensor, "
            "the template never produces it") in shapes.reason
    consumption = judge_consumption(m)
    assert consumption.status == "failed"
    assert "model.layers.0.self_attn.q_proj.bias: no converter op takes this HF tensor" in consumption.reason
    assert judge_bit_exact(m, resolve("float32", None, ["roundtrip_max_abs_diff"])).status == "failed"
