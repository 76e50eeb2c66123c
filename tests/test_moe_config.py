"""MoE config semantics and conversion (Mixtral, Qwen2-MoE, Qwen3-MoE), in-process and quick.

The built-in templates and ROLL's own (tests/data/roll_<family>_template.py, imports changed only) are judged on
the MoE specs' reference checkpoints by the Megatron backend's own config and round-trip operations (the
TransformerConfig megatron-core really builds); the planted bugs of tests/data/moe_bugs.py must fail naming the
key or tensor they break. The tiny references must also route: every expert chosen, no tied top-k.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from fixtures.tiny_models import materialize
from harness.checks import config_parsing
from harness.checks.roundtrip import judge_bit_exact, judge_consumption, judge_names_shapes
from harness.convert import templates

from .conftest import REPO

DATA = Path(__file__).resolve().parent / "data"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _reference(family: str, **overrides) -> Path:
    spec = yaml.safe_load((REPO / "model_specs" / f"{family}.yaml").read_text())
    config = {**spec["reference"]["config"], **overrides}
    return materialize(spec["hf_model_type"], config, spec["reference"].get("seed", 0), "float32")


@pytest.fixture(scope="module")
def megatron():
    from harness.backends.megatron import MegatronBackend

    import harness.templates.mixtral  # noqa: F401 - registers the built-in templates
    import harness.templates.qwen2_moe  # noqa: F401
    import harness.templates.qwen3_moe  # noqa: F401
    import tests.data.moe_bugs  # noqa: F401 - registers the planted bugs

    backend = MegatronBackend()
    backend.setup()  # a one-rank gloo group: names-shapes builds megatron-core's GPTModel
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def roll_templates():
    """ROLL's templates register under the family names: load each, keep it, and put the built-in one back."""
    import harness.templates.mixtral  # noqa: F401
    import harness.templates.qwen2_moe  # noqa: F401
    import harness.templates.qwen3_moe  # noqa: F401

    loaded = {}
    for family in FAMILIES:
        builtin = templates[family]
        spec = importlib.util.spec_from_file_location(f"roll_{family}_template", DATA / f"roll_{family}_template.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        loaded[family] = templates[family]
        templates[f"roll-{family}"] = templates[family]
        templates[family] = builtin
    return loaded


def _config(megatron, family: str, template: str, **overrides):
    measurement = megatron.op_config(str(_reference(family, **overrides)), template)
    return config_parsing.judge(measurement, {}, family), measurement["keys"]


def _roundtrip(megatron, family: str, template: str, **overrides):
    """consumption, bit-exact and names-shapes verdicts, from the Megatron backend's own roundtrip operation."""
    m = megatron.op_roundtrip(str(_reference(family, **overrides)), template)
    verdicts = (judge_consumption(m), judge_bit_exact(m, {"roundtrip_max_abs_diff": 0.0}),
                judge_names_shapes(m["mca_shapes"], m["expected_shapes"]))
    return (*verdicts, m)


@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_moe_template_passes_config_and_roundtrip(megatron, family):
    verdict, keys = _config(megatron, family, family)
    assert verdict.status == "passed", verdict.reason
    experts = keys.get("num_experts", keys.get("num_local_experts"))
    assert experts["state"] == "mapped"
    consumption, exact, shapes, m = _roundtrip(megatron, family, family)
    assert consumption.status == "passed", consumption.reason
    assert exact.status == "passed" and m["comparison"]["max_abs_diff"] == 0.0, exact.reason
    assert shapes.status == "passed", shapes.reason
    experts_n = (experts["hf"] if isinstance(experts["hf"], int) else experts["hf"]["experts"])
    fc1 = [n for n in m["mca_shapes"] if ".mlp.experts.local_experts." in n and n.endswith("linear_fc1.weight")]
    sparse = sum(keys["decoder_sparse_step"]["hf"]) if "decoder_sparse_step" in keys else 2
    assert len(fc1) == experts_n * sparse  # one stacked [gate; up] per expert per sparse layer


def test_semantic_rows_name_what_megatron_builds(megatron):
    _, keys = _config(megatron, "qwen3_moe", "qwen3_moe")
    # HF sparse layers are (i + 1) % step == 0: layer 1 of 2; the dense layer 0 keeps intermediate_size
    assert keys["decoder_sparse_step"]["backend"] == [0, 1]
    assert keys["intermediate_size"]["backend"] == [256, "sparse"]
    assert keys["norm_topk_prob"]["backend"].startswith("softmax over the top-k")
    _, keys = _config(megatron, "qwen2_moe", "qwen2_moe")
    assert keys["shared_expert_intermediate_size"]["backend"] == {"size": 128, "gate": "sigmoid"}
    assert keys["norm_topk_prob"]["backend"] == "softmax over all experts, top-k values kept"
    assert keys["intermediate_size"]["state"] == "inactive"  # every layer sparse: the dense width is unused
    _, keys = _config(megatron, "mixtral", "mixtral")
    assert keys["output_router_logits"]["state"] == "ignored"
    assert keys["router_jitter_noise"]["state"] == "inactive"


def test_active_router_jitter_is_never_matched(megatron):
    # Mixtral jitters the router's AND experts' input in training; megatron-core's jitter only the router's
    verdict, keys = _config(megatron, "mixtral", "mixtral", router_jitter_noise=0.01)
    assert verdict.status == "failed" and "router_jitter_noise" in verdict.reason


# ---------------------------------------------------------------- planted bugs


def test_flipped_pre_softmax_fails_config(megatron):
    verdict, keys = _config(megatron, "mixtral", "mixtral-pre-softmax-flipped")
    assert verdict.status == "failed"
    assert "num_experts_per_tok" in verdict.reason and "softmax over all experts" in verdict.reason
    assert [k for k, r in keys.items() if r["state"] in ("mismatch", "unmapped")] == ["num_experts_per_tok"]


def test_unmapped_norm_topk_prob_fails_config_naming_it(megatron):
    verdict, keys = _config(megatron, "qwen2_moe", "qwen2_moe-norm-topk-unmapped")
    assert verdict.status == "failed" and "norm_topk_prob" in verdict.reason
    assert [k for k, r in keys.items() if r["state"] in ("mismatch", "unmapped")] == ["norm_topk_prob"]


def test_dropped_shared_expert_gate_fails_config_and_roundtrip(megatron):
    verdict, keys = _config(megatron, "qwen2_moe", "qwen2_moe-shared-gate-dropped")
    assert verdict.status == "failed" and "shared_expert_intermediate_size" in verdict.reason
    assert keys["shared_expert_intermediate_size"]["backend"]["gate"] is None
    consumption, _, _, _ = _roundtrip(megatron, "qwen2_moe", "qwen2_moe-shared-gate-dropped")
    assert consumption.status == "failed" and "mlp.shared_expert_gate.weight" in consumption.reason


def test_experts_written_over_one_tensor_fail_conversion(megatron):
    consumption, _, _, _ = _roundtrip(megatron, "mixtral", "mixtral-experts-fused")
    assert consumption.status == "failed"
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight: produced more than once" in consumption.reason


# ---------------------------------------------------------------- ROLL's own MoE templates


def test_roll_mixtral_passes_config_and_roundtrip(megatron, roll_templates):
    verdict, keys = _config(megatron, "mixtral", "roll-mixtral")
    assert verdict.status == "passed", verdict.reason
    verdicts = _roundtrip(megatron, "mixtral", "roll-mixtral")[:3]
    assert all(v.status == "passed" for v in verdicts), [v.reason for v in verdicts]


def test_roll_qwen3_moe_passes_on_an_all_sparse_config(megatron, roll_templates):
    # every released Qwen3-MoE: decoder_sparse_step 1, no mlp_only_layers
    verdict, _ = _config(megatron, "qwen3_moe", "roll-qwen3_moe", decoder_sparse_step=1)
    assert verdict.status == "passed", verdict.reason
    verdicts = _roundtrip(megatron, "qwen3_moe", "roll-qwen3_moe", decoder_sparse_step=1)[:3]
    assert all(v.status == "passed" for v in verdicts), [v.reason for v in verdicts]


def test_roll_qwen3_moe_renames_decoder_sparse_step_off_by_one(megatron, roll_templates):
    # ROLL maps decoder_sparse_step -> moe_layer_freq: HF makes layer 1 sparse, megatron-core layer 0
    verdict, keys = _config(megatron, "qwen3_moe", "roll-qwen3_moe")
    assert verdict.status == "failed"
    assert "decoder_sparse_step: hf=[0, 1] but backend=[1, 0]" in verdict.reason


def test_roll_qwen2_moe_loses_the_shared_expert_gate_on_megatron_core_016(megatron, roll_templates):
    # ROLL sets McaModelConfig's moe_use_shared_expert_gate; megatron-core 0.16 reads moe_shared_expert_gate
    verdict, keys = _config(megatron, "qwen2_moe", "roll-qwen2_moe")
    assert verdict.status == "failed"
    assert "template sets 'moe_use_shared_expert_gate', which the backend does not read" in verdict.reason
    assert keys["shared_expert_intermediate_size"]["state"] == "mismatch"
    consumption, exact, shapes, _ = _roundtrip(megatron, "qwen2_moe", "roll-qwen2_moe")
    assert consumption.status == "passed" and exact.status == "passed"  # the weights themselves convert ...
    # ... into a gate_weight the GPTModel megatron-core builds from that config does not have
    assert shapes.status == "failed"
    assert "decoder.layers.0.mlp.shared_experts.gate_weight: produced by the template" in shapes.reason


# ---------------------------------------------------------------- the references route


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_reference_routing_is_spread_and_untied(family):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_reference(family), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    experts, k = logits[0].shape[-1], model.config.num_experts_per_tok
    assert logits, "no router logits"
    for layer in logits:
        top = layer.topk(k + 1, dim=-1).values
        assert float((top[:, k - 1] - top[:, k]).min()) > 1e-4  # the k-th and (k+1)-th never tie
        counts = torch.bincount(layer.topk(k, dim=-1).indices.reshape(-1), minlength=experts)
        # every expert takes a share of the 128 x k assignments: at least a fifth of a uniform one (measured:
        # the least-chosen expert gets 0.25 x (qwen3_moe) to 0.77 x a uniform share; top-k gaps >= 7e-4)
        assert float(counts.min()) >= 0.2 * float(counts.sum()) / experts, counts.tolist()


# ---------------------------------------------------------------- the reference's aux-loss objective


def test_reference_aux_loss_is_megatron_cores_definition():
    import torch
    from megatron.core.transformer.moe.moe_utils import (compute_routing_scores_for_aux_loss,
                                                         switch_load_balancing_loss_func)

    from harness.train_step import switch_aux_losses

    logits = torch.randn(2 * 24, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, 15:] = False  # a right-padded second row
    for mask in (None, valid):
        padding = None if mask is None else ~mask.reshape(-1)
        routing_map, scores = compute_routing_scores_for_aux_loss(logits, 2, "softmax", padding_mask=padding)
        total = logits.shape[0] if mask is None else int(mask.sum())
        expected = switch_load_balancing_loss_func(scores, routing_map.sum(0), total, 2, 8, 1.0)
        ours = switch_aux_losses([logits], 2, mask)[0]
        assert torch.allclose(ours, expected, rtol=1e-6, atol=0), (float(ours), float(expected))


def test_reference_step_adds_the_aux_terms_when_the_coefficient_is_set():
    import torch
    from transformers import AutoModelForCausalLM

    from harness.train_step import loss_sum_and_count, make_batch, reference_step

    batch = make_batch([list(range(3, 19)), list(range(40, 50))])

    def run(coefficient, aux_microbatches):
        model = AutoModelForCausalLM.from_pretrained(_reference("mixtral"), dtype=torch.float32)
        model.config.router_aux_loss_coef = coefficient
        return reference_step(model, batch, steps=1, aux_microbatches=aux_microbatches)

    model = AutoModelForCausalLM.from_pretrained(_reference("mixtral"), dtype=torch.float32)
    with torch.no_grad():
        ce_sum, count = loss_sum_and_count(model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"])
    plain = run(0.05, 0)  # no trainer adds it (DeepSpeed's HF model): the cross-entropy alone
    assert "aux_losses" not in plain
    assert "aux_losses" not in run(0.0, 2)  # a coefficient of 0: nothing to add
    result = run(0.05, 2)  # megatron-core's schedule over 2 micro-batches
    assert sorted(result["aux_losses"]) == ["layers.0", "layers.1"]
    assert all(v >= 1.0 for v in result["aux_losses"].values())  # the balanced minimum is 1
    # logged as the trainers log it (the cross-entropy), trained on with the load-balancing term
    assert abs(result["losses"][0] - float(ce_sum) / count) < 1e-5 and abs(plain["losses"][0] - result["losses"][0]) < 1e-6
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    assert (result["grads"][gate] - plain["grads"][gate]).abs().max() > 1e-4
    # grads and weights by checkpoint name: per expert, as save_pretrained writes them
    assert "model.layers.0.block_sparse_moe.experts.7.w1.weight" in result["grads"]
    assert not any("gate_up_proj" in name for name in result["weights"])


def test_flipped_pre_softmax_fails_logit_parity(megatron, tmp_path):
    """megatron-core (one gloo rank) on the converted weights vs HF fp32: the correct Mixtral template agrees,
    the flipped router's unrenormalised weights do not (a certify run, TP1 fp32: max |dlogprob| 8.1e-6 vs 2.90)."""
    import torch
    from safetensors.torch import load_file

    from harness.backends.hf import HFBackend

    directory = str(_reference("mixtral"))
    prompts = {"batch": [list(range(5, 29)), list(range(100, 112))]}
    HFBackend().op_logprobs(directory, "float32", prompts, str(tmp_path / "hf.safetensors"))
    hf = load_file(str(tmp_path / "hf.safetensors"))["batch"]
    valid = torch.zeros(hf.shape[:2], dtype=torch.bool)
    valid[0, :24], valid[1, :12] = True, True
    worst = {}
    for template in ("mixtral", "mixtral-pre-softmax-flipped"):
        out = megatron.op_logprobs(directory, ["float32"], 1, 1, prompts, str(tmp_path / template), template)
        assert not out["conversion_problems"] and not out["load_problems"]
        mca = load_file(out["files"]["float32"])["batch"]
        worst[template] = float((mca - hf).abs()[valid].max())
    assert worst["mixtral"] < 1e-4 and worst["mixtral-pre-softmax-flipped"] > 0.1, worst


def test_qwen2_moe_dense_layer_from_mlp_only_layers(megatron, roll_templates):
    """mlp_only_layers [1]: layer 1 is a dense MLP of intermediate_size. The built-in template places and sizes it;
    ROLL's (moe_intermediate_size -> ffn_hidden_size, mlp_only_layers unmapped) builds layer 1 sparse."""
    verdict, keys = _config(megatron, "qwen2_moe", "qwen2_moe", mlp_only_layers=[1])
    assert verdict.status == "passed", verdict.reason
    assert keys["mlp_only_layers"]["backend"] == [1, 0] and keys["intermediate_size"]["backend"] == ["sparse", 256]
    verdicts = _roundtrip(megatron, "qwen2_moe", "qwen2_moe", mlp_only_layers=[1])[:3]
    assert all(v.status == "passed" for v in verdicts), [v.reason for v in verdicts]
    verdict, _ = _config(megatron, "qwen2_moe", "roll-qwen2_moe", mlp_only_layers=[1])
    assert "mlp_only_layers: hf=[1, 0] but backend=[1, 1]" in verdict.reason
    assert "intermediate_size: hf=['sparse', 256] but backend=['sparse', 'sparse']" in verdict.reason
