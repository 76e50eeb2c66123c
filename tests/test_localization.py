"""Divergence localization: a failing parity check names the first divergent layer, sub-module and weights.

Planted bugs (tests/data/buggy_templates.py, the self-test's PP layer-shift plugin, a DeepSpeed model-provider
bug) must localize where the issue says; correct templates must localize nothing (no false pointer), in fp32
and bf16 and at another init scale.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures.prompts import prompt_sets
from harness.checks import localize, train
from harness.workers import Worker

from .conftest import REPO, base_spec

DATA = REPO / "tests" / "data"
needs_megatron = pytest.mark.skipif(__import__("importlib.util").util.find_spec("megatron") is None,
                                    reason="megatron-core not installed")


# ---- the judge on synthetic captures (fast) ----
def _captures(layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(2, 5, 8, generator=g) for p in localize.point_order(layers)}


def test_first_divergence_is_the_first_point_beyond_the_bound():
    ref = _captures()
    test = {k: v.clone() for k, v in ref.items()}
    for point in localize.point_order(2)[localize.point_order(2).index("layers.1.mlp.activation"):]:
        test[point] = test[point] + 1.0
    test["layers.0.attention"] += 1e-7  # fp32-level noise is not a divergence
    result = localize.localize(ref, test, [5, 3], 2, {})
    assert result["status"] == "localized"
    assert result["first_divergence"]["point"] == "layers.1.mlp.activation"
    assert result["first_divergence"]["layer"] == 1 and result["first_divergence"]["submodule"] == "MLP"


def test_padding_positions_are_not_judged_and_nan_diverges():
    ref = _captures(1)
    test = {k: v.clone() for k, v in ref.items()}
    test["embedding"][1, 3:] += 100.0  # sequence 1 has 3 tokens: positions 3, 4 are padding
    assert localize.localize(ref, test, [5, 3], 1, {})["status"] == "not_localized"
    test["layers.0.input_norm"][0, 0, 0] = math.nan
    assert localize.localize(ref, test, [5, 3], 1, {})["first_divergence"]["point"] == "layers.0.input_norm"


def test_a_point_the_backend_did_not_capture_is_named():
    ref = _captures(1)
    test = {k: v for k, v in ref.items() if k != "layers.0.attention.context"}
    result = localize.localize(ref, test, [5, 5], 1, {})
    assert any("layers.0.attention.context" in m for m in result["missing"])
    assert localize.localize(ref, {}, [5, 5], 1, {})["status"] == "not_localized"


def test_bf16_bound_follows_hf_own_noise():
    ref = _captures(1)
    noise = {k: v + 0.01 * torch.randn_like(v) for k, v in ref.items()}
    near = {k: v + 0.02 * torch.randn_like(v) for k, v in ref.items()}  # within 4 x HF's own bf16 difference
    assert localize.localize(ref, near, [5, 5], 1, {}, noise)["status"] == "not_localized"
    far = dict(near, **{"layers.0.mlp": ref["layers.0.mlp"] * 1.5})
    assert localize.localize(ref, far, [5, 5], 1, {}, noise)["first_divergence"]["point"] == "layers.0.mlp"


def test_explanation_names_weights_op_and_unmapped_config():
    origin = {"produced_from": {"decoder.layers.0.input_layernorm.weight": {
                  "op": "RenameConverOp(['.input_layernorm.weight'] <-> [...])",
                  "sources": ["model.layers.0.input_layernorm.weight"]}},
              "megatron_names": ["decoder.layers.0.input_layernorm.weight"],
              "config_states": {"rms_norm_eps": "unmapped"}, "config_hf_to_mca": {}}
    ref = _captures(1)
    test = dict(ref, **{"layers.0.input_norm": ref["layers.0.input_norm"] * 1.01})
    found = localize.localize(ref, test, [5, 5], 1, origin)
    assert found["first_divergence"]["hf_weights"] == ["model.layers.0.input_layernorm.weight"]
    assert "RenameConverOp" in found["summary"] and "does not map rms_norm_eps" in found["summary"]


def test_worst_prompt_set_and_train_gradient_order():
    assert localize.worst_prompt_set({"a": {"max_abs_logprob": 0.1}, "b": {"max_abs_logprob": 3.0}}) == "b"
    assert localize.worst_prompt_set({}) is None
    order = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    diffs = {"model.embed_tokens.weight": 1.0, "model.layers.0.mlp.down_proj.weight": 1.0, "lm_head.weight": 0.0}
    found = localize.first_diverging_gradient(diffs, 1e-5, order)
    assert found["parameter"] == "model.layers.0.mlp.down_proj.weight" and found["position_in_backward"] == 1
    assert localize.first_diverging_gradient({"x": 0.0}, 1e-5, ["x"]) is None


def test_a_check_failed_on_non_finite_values_is_localized_on_that_set(tmp_path):
    """No per-set metric (coverage stopped at the NaN), yet the capture runs on the set the NaN came from."""
    from types import SimpleNamespace

    from harness.errors import WorkerError
    from harness.verdict import Verdict
    from suites import localization

    asked = []

    def call(model, backend, op, **kw):
        asked.append((backend, kw["sequences"]))
        raise WorkerError("capture refused in this test")

    certify = SimpleNamespace(scratch=lambda model: tmp_path, call=call)
    check = SimpleNamespace(backend="vllm", model="m", dtype="float32", short_id="logits/vllm/float32")
    verdict = Verdict("failed", "non-finite log-probs", metrics={"non_finite_sets": ["b"]})
    out = localization.attach(certify, check, verdict, str(tmp_path), {"a": [[1]], "b": [[2, 3]]}, {})
    assert asked == [("hf", [[2, 3]])] and out.localization["prompt_set"] == "b", out.localization
    assert out.localization["status"] == "error"


def test_a_failed_train_step_names_its_first_diverging_gradient():
    m = {"structural": [], "loss_diffs": [0.0, 0.5], "loss_curve": {"reference": [1.0, 1.0], "backend": [1.0, 1.5]},
         "grad_diffs": {"lm_head.weight": 0.0, "model.norm.weight": 0.2, "model.embed_tokens.weight": 0.3},
         "weight_diffs": {"lm_head.weight": 0.0}, "noise_gradient_weight_diffs": {}, "noise_gradient_elements": 0}
    tol = {"max_loss_diff": 1e-5, "max_grad_diff": 1e-5, "max_weight_diff": 1e-5}
    verdict = train.judge(m, tol, "w", forward_order=["model.embed_tokens.weight", "model.norm.weight",
                                                       "lm_head.weight"])
    assert verdict.status == "failed"
    assert verdict.localization["first_divergence"]["parameter"] == "model.norm.weight"
    assert "first diverging gradient in backward order: model.norm.weight" in verdict.reason
    assert "localization" in verdict.as_dict()
    m["loss_diffs"] = [0.5, 0.5]  # the forward itself differs: the gradient walk would only name the head
    forward = train.judge(m, tol, "w", forward_order=["model.embed_tokens.weight", "lm_head.weight"])
    assert forward.localization["status"] == "not_localized" and "logits row" in forward.localization["reason"]


# ---- the six cases of the issue, through the real backends ----
class Rig:
    def __init__(self, spec: Path, tmp: Path, overrides: dict | None = None):
        self.tmp, self.spec = tmp, spec
        self.hf, self.workers = Worker("hf", str(spec)), {}
        config = dict(base_spec()["reference"]["config"], **(overrides or {}))
        self.ref_dir = self.hf.call("materialize", {"model_type": "qwen2", "overrides": config, "seed": 0,
                                                    "dtype": "float32", "path": None})["dir"]
        vocab = json.loads((Path(self.ref_dir) / "config.json").read_text())["vocab_size"]
        self.seqs = prompt_sets(vocab)["long"]
        self.hf_caps = {}

    def _hf(self, dtype: str) -> str:
        if dtype not in self.hf_caps:
            self.hf_caps[dtype] = self.hf.call("capture", {"dir": self.ref_dir, "dtype": dtype, "sequences": self.seqs,
                                                           "out_path": str(self.tmp / f"hf-{dtype}.st")})["path"]
        return self.hf_caps[dtype]

    def localize(self, backend: str, dtype: str = "float32", **args) -> dict:
        worker = self.workers.get(backend) or self.workers.setdefault(backend, Worker(backend, str(self.spec)))
        out = self.tmp / f"{backend}-{dtype}-{'-'.join(map(str, args.values()))}"
        run = worker.call("capture", {"dir": self.ref_dir, "dtypes": [dtype], "sequences": self.seqs,
                                      "out_dir": str(out), **args}, timeout=600)
        assert not run["load_problems"]
        return localize.evaluate(self._hf("float32"), run["files"][dtype], self.seqs, run["num_layers"],
                                 run["origin"], self._hf(dtype) if dtype != "float32" else None)

    def close(self):
        for w in [self.hf, *self.workers.values()]:
            w.close()


def _spec(tmp_path_factory, plugins: list[str]) -> Path:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec("loc", plugins=["harness.templates.qwen2", *plugins])))
    return path


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(_spec(tmp_path_factory, [str(DATA / "buggy_templates.py")]), tmp_path_factory.mktemp("rig"))
    yield r
    r.close()


CASES = [  # template, tp, dtype -> point, sub-module, a Megatron weight named, an op named / a config key named
    ("qwen2-qkv-concat", 1, "float32", "layers.0.attention.q_pre_rope", "linear_qkv.weight", "PlainQKVConcat"),
    ("qwen2-qkv-concat", 2, "float32", "layers.0.attention.q_pre_rope", "linear_qkv.weight", "PlainQKVConcat"),
    ("qwen2-up-gate", 1, "float32", "layers.0.mlp.activation", "linear_fc1.weight", "StackConverOp"),
    ("qwen2-up-gate", 1, "bfloat16", "layers.0.mlp.activation", "linear_fc1.weight", "StackConverOp"),
    ("qwen2-transposed-proj", 1, "float32", "layers.0.attention", "linear_proj.weight", "Transposed"),
    ("qwen2-rope-unmapped", 1, "float32", "layers.0.attention.q", "linear_qkv.weight", "rope_parameters"),
    ("qwen2-eps-unmapped", 1, "float32", "layers.0.input_norm", "input_layernorm.weight", "rms_norm_eps"),
]


@needs_megatron
@pytest.mark.parametrize("template,tp,dtype,point,weight,cause", CASES, ids=[f"{c[0]}-tp{c[1]}-{c[2]}" for c in CASES])
def test_planted_bug_localizes(rig, template, tp, dtype, point, weight, cause):
    result = rig.localize("megatron", dtype, tp=tp, pp=1, template=template)
    found = result["first_divergence"]
    assert found["point"] == point, result["summary"]
    assert any(n.endswith(weight) for n in found["megatron_weights"]) and found["hf_weights"]
    assert cause in result["summary"]


@needs_megatron
@pytest.mark.parametrize("tp,dtype", [(2, "float32"), (2, "bfloat16")])
def test_correct_template_localizes_nothing(rig, tp, dtype):
    result = rig.localize("megatron", dtype, tp=tp, pp=1, template="qwen2")
    assert result["status"] == "not_localized", result.get("summary")
    assert max(r["rel_l2"] / r["bound"] for r in result["points"]) < 0.5


@needs_megatron
def test_pp_layer_shift_localizes_to_the_first_layer_of_stage_1(tmp_path_factory):
    # stage 1 runs stage 0's layers (the converter ignores the stage offset)
    r = Rig(_spec(tmp_path_factory, [str(DATA / "pp_offset_ignored.py")]), tmp_path_factory.mktemp("shift"))
    try:
        found = r.localize("megatron", "float32", tp=1, pp=2)["first_divergence"]
        assert found["layer"] == 1, found  # 2 layers at PP2: stage 1 starts at layer 1
        assert all(".layers.1." in n for n in found["megatron_weights"])
    finally:
        r.close()


@needs_megatron
def test_no_false_pointer_at_another_init_scale(tmp_path_factory):
    r = Rig(_spec(tmp_path_factory, []), tmp_path_factory.mktemp("init"), {"initializer_range": 0.02})
    try:
        for dtype, tp, pp in (("bfloat16", 1, 2), ("float32", 2, 1)):
            result = r.localize("megatron", dtype, tp=tp, pp=pp)
            assert result["status"] == "not_localized", (dtype, tp, pp, result.get("summary"))
    finally:
        r.close()


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_provider_bug_localizes_to_the_zeroed_bias(tmp_path_factory):
    r = Rig(_spec(tmp_path_factory, [str(DATA / "train_bugs" / "dropped_bias.py")]), tmp_path_factory.mktemp("ds"))
    try:
        result = r.localize("deepspeed", "float32")
        found = result["first_divergence"]
        assert found["point"] == "layers.0.attention.q_pre_rope", result["summary"]
        assert "model.layers.0.self_attn.q_proj.bias" in found["hf_weights"]
    finally:
        r.close()


@needs_megatron
def test_certificate_and_page_carry_the_localization(run_certify, make_spec):
    spec = base_spec("locbug", plugins=["harness.templates.qwen2", str(DATA / "buggy_templates.py")],
                     converter={"template": "qwen2-transposed-proj"}, backends={"train": ["megatron"], "infer": ["hf"]},
                     dtypes=["float32"], parallel=[{"tp": 1, "pp": 1}])
    spec.pop("refit", None)
    run = run_certify("--model-spec", str(make_spec(spec)), "-k", "logits")
    cert = json.loads((run.report_dir / "locbug" / "certificate.json").read_text())
    row = next(r for r in cert["checks"] if r["id"] == "locbug/logits/megatron/float32/tp1pp1")
    assert row["status"] == "failed" and row["localization"]["status"] == "localized"
    assert "first divergence at layer 0 attention" in row["reason"] and "linear_proj.weight" in row["reason"]
    page = (run.report_dir / "locbug" / "index.html").read_text()
    assert "first divergence: layers.0.attention" in page and "divergence localization" in page
    from harness import verify

    verify.verify(run.report_dir / "locbug" / "certificate.json")  # raises verify.Invalid if it does not verify
