"""The SGLang backend without SGLang: its meta_info -> engine-record parsing, logprob-mode switch, registration
judgement and generated external-model package, and that every SGLang check is not_run (never passed) here.

meta_info below is built by hand in the shape SGLang's sources produce (sgl-project/sglang, commit 001067ff,
python/sglang/srt/managers/tokenizer_manager.py):
  - TokenizerManager.add_logprob_to_meta_info writes meta_info["input_token_logprobs"], ["output_token_logprobs"],
    ["input_top_logprobs"], ["output_top_logprobs"];
  - detokenize_logprob_tokens turns each (value, id) pair into a tuple (logprob, token_id, None) when no text is
    asked for; detokenize_top_logprobs_tokens maps a position with no top-k values to None;
and the prompt side is shifted by the scheduler (python/sglang/srt/managers/scheduler_output_processor_mixin.py,
_process_input_token_logprobs / _process_input_top_logprobs in the newest stored version; older ones do the same
inline in add_input_logprob_return_values): values are [None] + computed[:-1] (the last computed row predicts the
first generated token and moves to the output side), ids are origin_input_ids[logprob_start_len:] with
ids >= vocab_size - 1 clipped to 0, and the top-k rows start with None.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from harness import engine_record
from harness.backends import backend_class
from harness.backends.sglang import (
    LOGPROB_SWITCHES,
    SGLangBackend,
    cells_from_prompts,
    engine_kwargs,
    entry_classes_of,
    expand_cells,
    logprob_env,
    mode_in_effect,
    output_ids_of,
    registration_problems,
    sample_params,
    sampled_logprobs,
    sequence_from_meta,
)
from harness.plan import build_plan
from harness.session import CertifySession
from harness.spec import load_spec

from .conftest import QWEN2_SPEC, REPO, base_spec

VOCAB = 16
PROMPT = [5, 9, 2, 7]
GENERATED = [6, 6]


def _meta(prompt=PROMPT, generated=GENERATED) -> dict:
    """What SGLang returns for PROMPT with logprob_start_len=0, top_logprobs_num=2 and a greedy 2-token
    continuation (text None: skip_tokenizer_init). Row i of the prompt side predicts prompt[i]."""
    return {
        "input_token_logprobs": [(None, prompt[0], None), (-1.1, prompt[1], None), (-0.7, prompt[2], None),
                                 (-2.0, prompt[3], None)],
        "input_top_logprobs": [None,
                               [(-0.5, 3, None), (-1.1, 9, None)],   # predicts prompt[1] = 9
                               [(-0.7, 2, None), (-0.9, 4, None)],   # predicts prompt[2] = 2
                               [(-0.2, 1, None), (-1.5, 8, None)]],  # predicts prompt[3] = 7 (not in top-2)
        "output_token_logprobs": [(-0.3, generated[0], None), (-0.4, generated[1], None)],
        "output_top_logprobs": [[(-0.3, 6, None), (-1.6, 0, None)], [(-0.4, 6, None), (-1.2, 3, None)]],
        "output_token_logprobs_length": 2,
    }


# ---------------------------------------------------------------- meta_info -> engine record


def test_record_aligns_sglang_prompt_logprobs_onto_the_position_before():
    seq = sequence_from_meta(PROMPT, GENERATED, _meta(), VOCAB)
    assert seq["prompt"] == PROMPT and seq["generated"] == GENERATED
    assert seq["dists"] == [
        {3: -0.5, 9: -1.1},           # after position 0: SGLang's row 1
        {2: -0.7, 4: -0.9},           # after position 1: row 2
        {1: -0.2, 8: -1.5, 7: -2.0},  # after position 2: row 3, plus the realized prompt token 7
        {6: -0.3, 0: -1.6},           # after the last prompt token: the first generation step
    ]
    assert seq["gen_dists"] == [{6: -0.3, 0: -1.6}, {6: -0.4, 3: -1.2}]
    assert seq["dists"][-1] == seq["gen_dists"][0]


def test_every_dist_holds_the_realized_token_with_sglangs_own_logprob():
    seq = sequence_from_meta(PROMPT, GENERATED, _meta(), VOCAB)
    for t, dist in enumerate(seq["dists"][:-1]):
        assert dist[PROMPT[t + 1]] == _meta()["input_token_logprobs"][t + 1][0]
    for j, dist in enumerate(seq["gen_dists"]):
        assert dist[GENERATED[j]] == _meta()["output_token_logprobs"][j][0]


def test_a_record_shifted_by_one_is_rejected():
    """Rows taken as "after t" without the shift: position 0's None row or a token mismatch must not pass."""
    meta = _meta()
    shifted = {**meta, "input_top_logprobs": meta["input_top_logprobs"][1:] + [meta["output_top_logprobs"][0]],
               "input_token_logprobs": meta["input_token_logprobs"][1:] + [meta["output_token_logprobs"][0]]}
    with pytest.raises(ValueError, match="shifted|misaligned"):
        sequence_from_meta(PROMPT, GENERATED, shifted, VOCAB)


def test_logprobs_of_another_prompt_are_rejected():
    meta = _meta(prompt=[5, 9, 3, 7])  # same length, one token differs
    with pytest.raises(ValueError, match="misaligned"):
        sequence_from_meta(PROMPT, GENERATED, meta, VOCAB)
    with pytest.raises(ValueError, match="prompt has 5"):
        sequence_from_meta(PROMPT + [1], GENERATED, _meta(), VOCAB)


def test_the_last_vocabulary_id_clipped_to_0_by_sglang_is_accepted_only_for_that_id():
    prompt = [5, VOCAB - 1, 2, 7]
    meta = _meta(prompt=prompt)
    meta["input_token_logprobs"][1] = (-1.1, 0, None)  # SGLang reports id vocab_size - 1 as 0
    seq = sequence_from_meta(prompt, GENERATED, meta, VOCAB)
    assert seq["dists"][0][VOCAB - 1] == -1.1 and 0 not in seq["dists"][0]
    meta = _meta()
    meta["input_token_logprobs"][1] = (-1.1, 0, None)  # 0 where the prompt has 9 < vocab_size - 1: wrong
    with pytest.raises(ValueError, match="misaligned"):
        sequence_from_meta(PROMPT, GENERATED, meta, VOCAB)


def test_missing_pieces_are_named():
    meta = _meta()
    del meta["input_top_logprobs"]
    with pytest.raises(ValueError, match="input_top_logprobs"):
        sequence_from_meta(PROMPT, GENERATED, meta, VOCAB)
    meta = _meta()
    meta["input_top_logprobs"][2] = None
    with pytest.raises(ValueError, match=r"input_top_logprobs\[2\].*no top logprobs"):
        sequence_from_meta(PROMPT, GENERATED, meta, VOCAB)
    with pytest.raises(ValueError, match="disagree"):
        sequence_from_meta(PROMPT, [6, 1], _meta(), VOCAB)


def test_a_one_token_prompt_has_only_the_generation_step():
    meta = {"input_token_logprobs": [(None, 4, None)], "input_top_logprobs": [None],
            "output_token_logprobs": [(-0.3, 6, None)], "output_top_logprobs": [[(-0.3, 6, None), (-2.0, 1, None)]]}
    seq = sequence_from_meta([4], [6], meta, VOCAB)
    assert seq["dists"] == [{6: -0.3, 1: -2.0}] == seq["gen_dists"]


def test_records_survive_the_record_file_round_trip(tmp_path):
    seq = sequence_from_meta(PROMPT, GENERATED, _meta(), VOCAB)
    path = engine_record.save(tmp_path / "r.json", {"top_k": 2, "sets": {"short": [seq]}})
    assert engine_record.load(path)["sets"]["short"][0] == seq


def test_list_shaped_entries_parse_like_tuples():
    """Results that went through JSON (an HTTP server, a log) carry lists instead of tuples."""
    meta = json.loads(json.dumps(_meta()))
    assert sequence_from_meta(PROMPT, GENERATED, meta, VOCAB) == sequence_from_meta(PROMPT, GENERATED, _meta(), VOCAB)


def test_sampled_logprobs_and_output_ids():
    result = {"output_ids": GENERATED, "meta_info": _meta()}
    assert output_ids_of(result) == GENERATED
    assert output_ids_of({"token_ids": [1, 2], "meta_info": {}}) == [1, 2]
    assert sampled_logprobs(output_ids_of(result), result["meta_info"]) == (GENERATED, [-0.3, -0.4])
    with pytest.raises(ValueError, match="disagree"):
        sampled_logprobs([6, 2], _meta())


# ---------------------------------------------------------------- logprob mode, engine and sampling arguments


def test_logprob_mode_maps_onto_sglangs_environment_switch():
    assert logprob_env("raw") == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "RETURN_ORIGINAL_LOGPROB": "1"}
    assert logprob_env("processed") == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "0", "RETURN_ORIGINAL_LOGPROB": "0"}
    with pytest.raises(ValueError):
        logprob_env("processed_logprobs")


def test_mode_in_effect_reads_the_loaded_sampler():
    class Sampler:  # the module attribute sglang/srt/layers/sampler.py sets from the environment at import
        pass

    for name in LOGPROB_SWITCHES:
        module = Sampler()
        setattr(module, name, True)
        assert mode_in_effect(module) == "raw"
        setattr(module, name, False)
        assert mode_in_effect(module) == "processed"
    with pytest.raises(RuntimeError, match="no SGLANG_RETURN_ORIGINAL_LOGPROB"):
        mode_in_effect(Sampler())


def test_engine_and_sampling_arguments():
    kwargs = engine_kwargs("/m", "float32", 3, 0.25, None)
    assert kwargs["skip_tokenizer_init"] is True and kwargs["random_seed"] == 3 and kwargs["dtype"] == "float32"
    assert kwargs["disable_radix_cache"] is True and kwargs["attention_backend"] == "torch_native"
    assert "attention_backend" not in engine_kwargs("/m", "bfloat16", 0, 0.25, None)
    assert engine_kwargs("/m", "bfloat16", 0, 0.25, "triton")["attention_backend"] == "triton"
    params = sample_params(8, 0.7, 11)
    assert params["temperature"] == 0.7 and params["sampling_seed"] == 11 and params["ignore_eos"] is True
    assert params["top_p"] == 1.0 and params["top_k"] == -1  # no truncation: processed = log_softmax(logits / T)
    assert "sampling_seed" not in sample_params(8, 0.7, None)


def test_cells_expand_to_one_request_per_sample():
    cells = [{"cell": "new8-batch2", "prompt": [1, 2], "n": 2, "max_new_tokens": 8},
             {"cell": "new4-batch1", "prompt": [3], "n": 1, "max_new_tokens": 4}]
    assert [(r["cell"], r["max_new_tokens"]) for r in expand_cells(cells)] == [
        ("new8-batch2", 8), ("new8-batch2", 8), ("new4-batch1", 4)]
    assert len(expand_cells(cells_from_prompts([[1], [2]], 8, 3))) == 6


# ---------------------------------------------------------------- registration


def test_registration_problems():
    plugin = {"Qwen2ForCausalLM": "my_plugin.Qwen2ForCausalLM"}
    archs = ["Qwen2ForCausalLM"]
    assert registration_problems(archs, "Qwen2ForCausalLM", "sglang.srt.models.qwen2.Qwen2ForCausalLM", None, {}) == []
    assert registration_problems(archs, "Qwen2ForCausalLM", "my_plugin.Qwen2ForCausalLM", None, plugin) == []
    [problem] = registration_problems(archs, "Qwen2ForCausalLM", "sglang.srt.models.qwen2.Qwen2ForCausalLM", None,
                                      plugin)
    assert "did not take effect" in problem
    [problem] = registration_problems(["NewForCausalLM"], "TransformersForCausalLM", "x.TransformersForCausalLM",
                                      None, {})
    assert "fallback" in problem
    [problem] = registration_problems(["NewForCausalLM"], None, None, "not supported", {})
    assert "cannot resolve" in problem
    [problem] = registration_problems(archs, "Qwen2ForCausalLM", "a.B", None, {"QwenForCausalLM": "p.QwenForCausalLM"})
    assert "class name" in problem
    assert registration_problems([], None, None, None, {}) == [
        "config.json names no architectures: SGLang resolves its model class from them"]


PLUGIN = '''
class NewLMForCausalLM:  # stands in for an SGLang model class (the real one subclasses torch.nn.Module)
    pass

EntryClass = NewLMForCausalLM
'''


def test_worker_start_points_sglang_at_the_specs_plugins(make_spec):
    """start() (no sglang needed) sets the logprob switch and SGLANG_EXTERNAL_MODEL_PACKAGE to a generated package
    whose module re-exports the plugin's EntryClass: the very class object the worker imported."""
    spec_path = make_spec(base_spec("sg", engines={"sglang": {"plugins": ["sglang_model.py"]}},
                                    rollout={"engine_logprobs": "raw"}), files={"sglang_model.py": PLUGIN})
    saved_env, saved_path = dict(os.environ), list(sys.path)
    backend = SGLangBackend()
    try:
        backend.start(str(spec_path))
        assert all(os.environ[name] == "1" for name in LOGPROB_SWITCHES)
        package = os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"]
        assert str(backend._package_dir) in os.environ["PYTHONPATH"].split(os.pathsep)
        # SGLang's registry scans the package's modules for EntryClass (registry.py, import_model_classes)
        import importlib

        [cls] = entry_classes_of(importlib.import_module(package))
        assert cls.__name__ == "NewLMForCausalLM"
        assert backend._plugin_classes() == {"NewLMForCausalLM": f"{cls.__module__}.NewLMForCausalLM"}
        package_dir = backend._package_dir
    finally:
        backend.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        for name in [m for m in sys.modules if m.startswith("harness_sglang_models_")]:
            del sys.modules[name]
    assert not package_dir.exists()


def test_worker_start_without_plugins_leaves_the_external_package_alone(make_spec, monkeypatch):
    monkeypatch.setenv("SGLANG_EXTERNAL_MODEL_PACKAGE", "users_own_models")
    for name in LOGPROB_SWITCHES:
        monkeypatch.setenv(name, "1")
    backend = SGLangBackend()
    backend.start(str(make_spec(base_spec("sg"))))
    try:
        assert os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] == "users_own_models"
        assert all(os.environ[name] == "0" for name in LOGPROB_SWITCHES)  # the spec default: processed
        assert backend._package_dir is None
    finally:
        backend.stop()


# ---------------------------------------------------------------- not run here, never passed

CAN_RUN = SGLangBackend.unavailable() is None
needs_no_sglang = pytest.mark.skipif(CAN_RUN, reason="sglang and a CUDA GPU are present: its checks run here")


def _expected_reason(reason: str) -> bool:
    return "sglang is not installed" in reason or "CUDA" in reason


def test_backend_is_registered_and_declares_its_contract():
    cls = backend_class("sglang")
    assert cls is SGLangBackend and cls.name == "sglang" and cls.needs_gpu and cls.packages == ("sglang",)
    assert set(cls.suites) == {"registration", "logits", "rollout"}


@needs_no_sglang
def test_every_sglang_check_of_the_plan_is_unavailable_with_the_reason():
    session = CertifySession([load_spec(QWEN2_SPEC)], backends=["sglang"])
    try:
        checks = [c for c in session.plans["qwen2"] if c.backend == "sglang"]
        assert {c.suite for c in checks} == {"registration", "logits", "rollout"}
        for check in checks:
            reason = session.unavailable(check)
            assert reason == SGLangBackend.suite_unavailable(check.suite) and _expected_reason(reason), reason
    finally:
        session.close()


@needs_no_sglang
def test_a_certification_run_reports_every_sglang_row_not_run(run_certify):
    run = run_certify("--model", "qwen2", "--backend", "sglang")
    assert run.returncode == 0, run.output[-3000:]
    cert = run.certificate("qwen2")
    rows = [c for c in cert["checks"] if c["backend"] == "sglang"]
    planned = [c.id for c in build_plan(load_spec(QWEN2_SPEC)) if c.backend == "sglang"]
    assert [r["id"] for r in rows] == planned
    reason = SGLangBackend.unavailable()
    for row in rows:
        assert row["status"] == "not_run", (row["id"], row["status"], row["reason"])
        if (REPO / "suites" / f"test_{row['suite']}.py").exists():  # a suite the harness has: its gate ran
            assert row["reason"] == reason, (row["id"], row["reason"])
    assert cert["verdict"] == "incomplete"
