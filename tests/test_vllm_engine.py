"""vLLM certification end to end (a real CPU engine) and its negative controls.

Each run starts one engine per dtype (20-60 s on CPU), so runs are few, fp32 only, one parallel layout,
and HF as the only trainer scoring rollouts; every planted bug must fail its own check and leave the
checks it does not touch passing:
  the repo's qwen2 + a template whose Megatron->HF direction skips the per-group q/k/v de-interleave
      (the Megatron trainer at tp2 takes a step and syncs through it)
      + an engine read with raw logprobs against a trainer that scales by the rollout temperature
      -> refit fails; rollout fails at T=0.7 and passes at T=1; logits, config, registration pass
  (the refit sync's own faults, a lost bucket and a stale pre-step sync: tests/test_refit_sync.py)
  llama + an out-of-tree class rotating GPT-J style          -> logits fail, registration says out-of-tree
  qwen2 + an out-of-tree class that skips q/k/v biases on load -> logits fail
  mixtral (fp32 and bf16) + an out-of-tree class exchanging layer 0's experts 0 and 1 -> logits fail in both,
      while the correct mixtral passes logits and routing in both (bf16: logits.NOISE_RUNS_RULE)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.backends.vllm import VLLMBackend

from .conftest import REPO, base_spec

pytestmark = pytest.mark.skipif(VLLMBackend.unavailable() is not None, reason=str(VLLMBackend.unavailable()))
BUGS = Path(__file__).resolve().parent / "data" / "engine_bugs"
ENGINE_ONLY = {"dtypes": ["float32"], "parallel": [{"tp": 2, "pp": 1}],
               "backends": {"train": [], "infer": ["hf", "vllm"]},
               "rollout": {"temperature": 0.7, "max_new_tokens": [8], "batch_sizes": [1, 4]}}
VLLM = ("--backend", "vllm")


def _statuses(run, model: str) -> dict[str, tuple[str, str]]:
    return {c["id"].removeprefix(f"{model}/"): (c["status"], c["reason"])
            for c in run.certificate(model)["checks"] if c["backend"] == "vllm"}


def test_refit_without_deinterleave_and_raw_engine_logprobs_fail_their_checks(make_spec, run_certify):
    spec = base_spec("vllm-bugs", plugins=["harness.templates.qwen2", "qkv_plain_split_back.py"],
                     converter={"template": "qwen2-qkv-plain-back"}, **ENGINE_ONLY)
    spec["backends"] = {"train": ["megatron"], "infer": ["hf", "vllm"]}  # refit syncs from a Megatron trainer
    spec["rollout"]["engine_logprobs"] = "raw"
    path = make_spec(spec, files={"qkv_plain_split_back.py": (BUGS / "qkv_plain_split_back.py").read_text()})
    run = run_certify("--model-spec", str(path), *VLLM, "-k", "not /megatron-t", timeout=900)
    got = _statuses(run, "vllm-bugs")
    assert got["refit/vllm/float32/tp2pp1"][0] == "failed", got
    assert "after refit from tp2pp1" in got["refit/vllm/float32/tp2pp1"][1]
    assert got["rollout/vllm/hf-t0.7/float32"][0] == "failed", got
    assert "engine logprobs: raw" in got["rollout/vllm/hf-t0.7/float32"][1]
    for passing in ("rollout/vllm/hf-t1/float32", "logits/vllm/float32", "config/vllm", "registration/vllm"):
        assert got[passing][0] == "passed", (passing, got[passing])
    assert run.returncode == 1


def test_out_of_tree_class_with_gptj_rope_fails_logits(make_spec, run_certify):
    spec = yaml.safe_load((REPO / "model_specs" / "llama.yaml").read_text())
    spec.pop("calibration", None)  # a renamed copy in another folder cites no calibration file
    spec.update(name="llama-gptj", engines={"vllm": {"plugins": ["vllm_gptj_rope.py"]}}, **ENGINE_ONLY)
    path = make_spec(spec, files={"vllm_gptj_rope.py": (BUGS / "vllm_gptj_rope.py").read_text()})
    run = run_certify("--model-spec", str(path), *VLLM, "-k", "logits or registration", timeout=900)
    got = _statuses(run, "llama-gptj")
    assert got["logits/vllm/float32"][0] == "failed", got
    assert "top1_agreement" in got["logits/vllm/float32"][1]
    assert got["registration/vllm"][0] == "passed", got
    registration = next(c for c in run.certificate("llama-gptj")["checks"] if c["id"] == "llama-gptj/registration/vllm")
    assert registration["metrics"]["resolved_class"].endswith("GPTJRopeLlama")
    assert registration["metrics"]["source"] == "out-of-tree"
    # localized through forward hooks in the in-process engine: q/k agree before rope, not after it
    logits_row = next(c for c in run.certificate("llama-gptj")["checks"] if c["id"] == "llama-gptj/logits/vllm/float32")
    assert logits_row["localization"]["first_divergence"]["point"] == "layers.0.attention.q", logits_row["localization"]
    assert "first divergence at layer 0 attention (q after rope" in logits_row["reason"]


def test_out_of_tree_class_dropping_qkv_bias_fails_logits(make_spec, run_certify):
    spec = base_spec("qwen2-nobias", engines={"vllm": {"plugins": ["vllm_dropped_qkv_bias.py"]}}, **ENGINE_ONLY)
    path = make_spec(spec, files={"vllm_dropped_qkv_bias.py": (BUGS / "vllm_dropped_qkv_bias.py").read_text()})
    run = run_certify("--model-spec", str(path), *VLLM, "-k", "logits", timeout=900)
    got = _statuses(run, "qwen2-nobias")
    assert got["logits/vllm/float32"][0] == "failed", got
    row = next(c for c in run.certificate("qwen2-nobias")["checks"] if c["id"] == "qwen2-nobias/logits/vllm/float32")
    assert "localization" in row, row["reason"][:1500]
    found = row["localization"]["first_divergence"]
    assert found["point"] == "layers.0.attention.q_pre_rope" and "model.layers.0.self_attn.q_proj.bias" in found["hf_weights"]


def test_a_crashed_engine_is_an_error_with_its_stderr_and_leaves_nothing_behind(make_spec, tmp_path):
    import os
    import subprocess
    import sys
    import uuid

    from .test_no_orphans import _tagged

    spec = base_spec("qwen2-crash", engines={"vllm": {"plugins": ["vllm_crashing_class.py"]}}, **ENGINE_ONLY)
    path = make_spec(spec, files={"vllm_crashing_class.py": (BUGS / "vllm_crashing_class.py").read_text()})
    probe = uuid.uuid4().hex
    env = {**os.environ, "HARNESS_ORPHAN_PROBE": probe}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--model-spec", str(path), *VLLM,
           "--report-dir", str(tmp_path), "-k", "logits"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:]
    import json

    checks = {c["id"]: c for c in json.loads((tmp_path / "qwen2-crash" / "certificate.json").read_text())["checks"]}
    row = checks["qwen2-crash/logits/vllm/float32"]
    assert row["status"] == "error", row
    assert "crashed" in row["reason"] and "planted crash" in row["reason"], row["reason"][:500]
    assert _tagged(probe) == [], "processes from the run are still alive"


@pytest.mark.parametrize("plugin, check, expected", [
    ("vllm_hardcoded_eps.py", "config/vllm", "rms_norm_eps: hf=1e-05 but backend=1e-06"),
    ("vllm_misnamed_arch.py", "registration/vllm", "the out-of-tree registration did not take effect"),
])
def test_out_of_tree_class_config_and_registration_bugs(make_spec, run_certify, plugin, check, expected):
    spec = yaml.safe_load((REPO / "model_specs" / "llama.yaml").read_text())
    spec.pop("calibration", None)  # a renamed copy in another folder cites no calibration file
    spec.update(name="llama-oot", engines={"vllm": {"plugins": [plugin]}}, **ENGINE_ONLY)
    path = make_spec(spec, files={plugin: (BUGS / plugin).read_text()})
    run = run_certify("--model-spec", str(path), *VLLM, "-k", check.split("/")[0], timeout=900)
    got = _statuses(run, "llama-oot")
    assert got[check][0] == "failed", got
    assert expected in got[check][1], got[check][1]


MULTIPROCESS_PROBE = """
import os, sys
from vllm import LLM
from probe import loaded_class

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
              max_num_seqs=2)
    print("LOADED", llm.apply_model(loaded_class)[0], "PARENT", os.getpid())
"""


def test_general_plugins_entry_point_registers_spec_classes_in_a_multiprocess_engine(make_spec, tmp_path):
    """vLLM's documented route for engines that run the model in another process: our `vllm.general_plugins`
    entry point imports engines.vllm.plugins there. The parent process never imports the plugin."""
    import os
    import subprocess
    import sys

    from fixtures.tiny_models import materialize
    from harness.spec import load_spec

    plugin = ("from vllm import ModelRegistry\nfrom vllm.model_executor.models.qwen2 import Qwen2ForCausalLM\n\n\n"
              "class MarkedQwen2(Qwen2ForCausalLM):\n    pass\n\n\n"
              "ModelRegistry.register_model('Qwen2ForCausalLM', MarkedQwen2)\n")
    path = make_spec(base_spec("qwen2-mp", engines={"vllm": {"plugins": ["marked.py"]}}), files={"marked.py": plugin})
    (tmp_path / "probe.py").write_text("import os\n\n\ndef loaded_class(model):\n"
                                       "    return f'{type(model).__name__}@{os.getpid()}'\n")
    spec = load_spec(path)
    checkpoint = materialize(spec.hf_model_type, spec.reference.config, spec.reference.seed, "float32")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HARNESS_SPEC_PATH": str(path),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", MULTIPROCESS_PROBE, str(checkpoint)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    _, loaded, _, parent = line.split()
    name, pid = loaded.split("@")
    assert name == "MarkedQwen2" and pid != parent, line


def test_an_moe_engine_class_exchanging_two_experts_fails_logits_in_fp32_and_bf16(make_spec, run_certify):
    """bf16 MoE bounds take the worst of HF's sdpa and eager runs (logits.NOISE_RUNS_RULE): the correct mixtral
    passes both dtypes (also its routing), and an engine that computes expert 1 where its router picks expert 0
    still fails logits in both."""
    mixtral = yaml.safe_load((REPO / "model_specs" / "mixtral.yaml").read_text())
    common = {"hf_model_type": "mixtral", "plugins": mixtral["plugins"], "reference": mixtral["reference"],
              "dtypes": ["float32", "bfloat16"], "backends": {"train": [], "infer": ["hf", "vllm"]}}
    good = make_spec(base_spec("mixtral-good", **common), filename="good.yaml")
    bad = make_spec(base_spec("mixtral-exchanged", engines={"vllm": {"plugins": ["vllm_mixtral_experts_exchanged.py"]}},
                              **common), files={"vllm_mixtral_experts_exchanged.py":
                                                (BUGS / "vllm_mixtral_experts_exchanged.py").read_text()},
                    filename="bad.yaml")
    run = run_certify("--model-spec", str(good), "--model-spec", str(bad), *VLLM, "-k", "logits or routing",
                      timeout=1200)
    ok, broken = _statuses(run, "mixtral-good"), _statuses(run, "mixtral-exchanged")
    for dtype in ("float32", "bfloat16"):
        assert ok[f"logits/vllm/{dtype}"][0] == "passed", ok
        assert ok[f"routing/vllm/{dtype}"][0] == "passed", ok
        assert broken[f"logits/vllm/{dtype}"][0] == "failed", broken
    row = next(c for c in run.certificate("mixtral-good")["checks"] if c["id"] == "mixtral-good/logits/vllm/bfloat16")
    method = row["tolerance"]["mean_abs_logprob"]["calibration"]["method"]
    assert "eager" in method, method
