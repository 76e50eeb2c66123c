"""lmdeploy backend on CPU: config parsing, registration (module map, custom_module_map, model checker).

Most tests call LmdeployBackend in-process (its CPU ops take a second once lmdeploy is imported).
lmdeploy's ConfigBuilder registry and CUSTOM_MODULE_MAP are process-global, so `lmdeploy_state`
restores them after each test; a certification run gets a fresh worker process anyway, and one
such run checks the certificate rows end to end. The logits suite needs CUDA: not run here.
"""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("lmdeploy", reason="lmdeploy is not installed (pip install --no-deps lmdeploy==0.18.0 "
                                       "mmengine-lite)")

from harness.backends.lmdeploy import LmdeployBackend  # noqa: E402
from harness.backends.lmdeploy_reads import scan  # noqa: E402
from harness.checks import config_parsing  # noqa: E402
from harness.errors import SpecError  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.spec_plugins import validate_environment  # noqa: E402

from .conftest import REPO, base_spec  # noqa: E402

# A ConfigBuilder the way lmdeploy's "add a new model" guide writes one, with one planted bug: KV heads
# taken from the query heads. (0.18 calls build(hf_config, model_path, tp=..., ...): **kwargs is needed.)
BAD_KV_BUILDER = """
from lmdeploy.pytorch.config import ModelConfig
from lmdeploy.pytorch.configurations.builder import AutoModelConfigBuilder


class BadKVQwen2Builder(AutoModelConfigBuilder):
    @classmethod
    def condition(cls, hf_config):
        return hf_config.model_type == "qwen2"

    @classmethod
    def build(cls, hf_config, model_path=None, **kwargs):
        return ModelConfig(hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
                           num_attention_heads=hf_config.num_attention_heads,
                           num_key_value_heads=hf_config.num_attention_heads,  # the bug
                           bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                           head_dim=hf_config.hidden_size // hf_config.num_attention_heads,
                           vocab_size=hf_config.vocab_size)
"""


@pytest.fixture
def lmdeploy_state():
    """Restore lmdeploy's global registries (and what update_custom_module_map adds) after a test;
    yields the restore function for a test that needs it earlier."""
    from lmdeploy.pytorch.configurations.builder import AutoModelConfigBuilder
    from lmdeploy.pytorch.models.module_map import CUSTOM_MODULE_MAP

    builders, custom, path, modules = list(AutoModelConfigBuilder._sub_classes), dict(CUSTOM_MODULE_MAP), \
        list(sys.path), set(sys.modules)

    def restore():
        AutoModelConfigBuilder._sub_classes[:] = builders
        CUSTOM_MODULE_MAP.clear()
        CUSTOM_MODULE_MAP.update(custom)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name.startswith(("_harness_plugin_", "map_mod", "lmdeploy.pytorch.models._custom_mod")):
                del sys.modules[name]

    yield restore
    restore()


@pytest.fixture(scope="module")
def references():
    """model name -> its fp32 reference checkpoint (cached on disk by the fixtures)."""
    from fixtures.tiny_models import materialize

    out = {}
    for name in ("qwen2", "llama"):
        spec = load_spec(REPO / "model_specs" / f"{name}.yaml")
        out[name] = str(materialize(spec.hf_model_type, spec.reference.config, spec.reference.seed, "float32"))
    return out


def _backend(spec_path) -> LmdeployBackend:
    backend = LmdeployBackend()
    backend.start(str(spec_path))  # imports the spec's plugins and engines.lmdeploy.plugins, as a worker does
    return backend


def _qwen2_spec(make_spec, files: dict[str, str], **lmdeploy) -> str:
    return make_spec(base_spec("lmd-case", engines={"lmdeploy": lmdeploy}), files)


@pytest.mark.parametrize("model", ["qwen2", "llama"])
def test_config_passes_for_reference_models(model, references, lmdeploy_state):
    m = _backend(REPO / "model_specs" / f"{model}.yaml").op_config(references[model])
    verdict = config_parsing.judge(m, {}, model)
    assert verdict.status == "passed", verdict.reason
    states = {key: row["state"] for key, row in m["keys"].items()}
    for key in ("vocab_size", "num_key_value_heads", "rms_norm_eps", "rope_parameters", "intermediate_size",
                "tie_word_embeddings", "max_position_embeddings"):
        assert states[key] == "mapped", (key, m["keys"][key])
    assert states["hidden_act"] == "derived"  # lmdeploy's classes hard-code SiluAndMul
    assert states["attention_dropout"] == "ignored"
    assert m["keys"]["rope_parameters"]["backend"]["rope_theta"] == {"qwen2": 1e6, "llama": 5e5}[model]
    assert m["builder"].endswith({"qwen2": "DefaultModelConfigBuilder", "llama": "LlamaModelConfigBuilder"}[model])


@pytest.mark.parametrize("model", ["qwen2", "llama"])
def test_registration_through_module_map(model, references, lmdeploy_state):
    r = _backend(REPO / "model_specs" / f"{model}.yaml").op_registration(references[model])
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model]
    assert r["problems"] == []
    assert (r["architecture"], r["source"], r["importable"]) == (arch, "module_map", True)
    assert r["resolved_class"] == f"lmdeploy.pytorch.models.{model}.{arch}"
    assert r["checker"]["passed"] is True


def test_config_builder_plugin_with_planted_kv_heads_bug_fails(make_spec, references, lmdeploy_state):
    spec = _qwen2_spec(make_spec, {"bad_builder.py": BAD_KV_BUILDER}, plugins=["bad_builder.py"])
    m = _backend(spec).op_config(references["qwen2"])
    verdict = config_parsing.judge(m, {}, "qwen2")
    assert verdict.status == "failed"
    assert "num_key_value_heads" in verdict.reason
    assert m["builder"].endswith("BadKVQwen2Builder")
    # the engine's ModelConfig says 4 KV heads while the model class still reads 2: both shown
    assert m["keys"]["num_key_value_heads"]["backend"] == {"model_config": 4, "model_class": 2}
    assert [k for k, row in m["keys"].items() if row["state"] == "mismatch"] == ["num_key_value_heads"]


def test_builder_plugin_does_not_outlive_its_test(make_spec, references, lmdeploy_state):
    """lmdeploy registers every AutoModelConfigBuilder subclass globally; the restored registry builds
    qwen2 with the default builder again (a certification worker is its own process anyway)."""
    _backend(_qwen2_spec(make_spec, {"bad_builder.py": BAD_KV_BUILDER}, plugins=["bad_builder.py"]))
    lmdeploy_state()
    m = _backend(REPO / "model_specs" / "qwen2.yaml").op_config(references["qwen2"])
    assert m["builder"].endswith("DefaultModelConfigBuilder")
    assert m["keys"]["num_key_value_heads"]["state"] == "mapped"


RAISING_BUILDER = """
from lmdeploy.pytorch.configurations.builder import AutoModelConfigBuilder


class NeedsExpertsBuilder(AutoModelConfigBuilder):
    @classmethod
    def condition(cls, hf_config):
        return hf_config.model_type == "qwen2"

    @classmethod
    def build(cls, hf_config, model_path=None, **kwargs):
        raise KeyError("num_experts")
"""


def test_model_checker_failure_is_caught_and_named(make_spec, references, lmdeploy_state):
    """lmdeploy's checker exit(1)s when ModelConfig cannot be built: a registration problem, not a dead worker."""
    spec = _qwen2_spec(make_spec, {"raising_builder.py": RAISING_BUILDER}, plugins=["raising_builder.py"])
    r = _backend(spec).op_registration(references["qwen2"])
    assert r["checker"]["passed"] is False and r["source"] == "module_map"
    assert len(r["problems"]) == 1 and "model checker failed" in r["problems"][0]
    assert "KeyError: 'num_experts'" in r["problems"][0], r["problems"]


@pytest.mark.parametrize("target, missing", [
    ("no_such_package.modeling.Qwen2Nowhere", "module no_such_package.modeling does not exist"),
    ("lmdeploy.pytorch.models.qwen2.Qwen2Nowhere", "lmdeploy.pytorch.models.qwen2 has no Qwen2Nowhere"),
], ids=["no-module", "no-class"])
def test_custom_module_map_to_missing_class_fails(target, missing, make_spec, references, lmdeploy_state):
    spec = _qwen2_spec(make_spec, {"module_map.py": f"MODULE_MAP = {{'Qwen2ForCausalLM': {target!r}}}\n"},
                       custom_module_map="module_map.py")
    r = _backend(spec).op_registration(references["qwen2"])
    assert r["source"] == "custom_module_map"
    assert len(r["problems"]) == 1 and target in r["problems"][0] and missing in r["problems"][0], r["problems"]


CUSTOM_CLASS_MAP = """
from lmdeploy.pytorch.models.qwen2 import Qwen2ForCausalLM


class MyQwen2(Qwen2ForCausalLM):
    '''A user's class, defined in the map file itself (lmdeploy resolves a dotless name there).'''


CUSTOM_MODULE_MAP = {"Qwen2ForCausalLM": "MyQwen2"}
"""


@pytest.mark.parametrize("files, resolved", [
    ({"module_map.py": "MODULE_MAP = {'Qwen2ForCausalLM': 'lmdeploy.pytorch.models.qwen2.Qwen2ForCausalLM'}\n"},
     "lmdeploy.pytorch.models.qwen2.Qwen2ForCausalLM"),
    ({"module_map.py": CUSTOM_CLASS_MAP}, "MyQwen2"),
], ids=["lmdeploy-class", "class-in-map-file"])
def test_custom_module_map_to_real_class_passes(files, resolved, make_spec, references, lmdeploy_state):
    spec = _qwen2_spec(make_spec, files, custom_module_map="module_map.py")
    backend = _backend(spec)
    r = backend.op_registration(references["qwen2"])
    assert r["problems"] == [] and r["checker"]["passed"]
    assert r["source"] == "custom_module_map" and r["resolved_class"].endswith(resolved)
    m = backend.op_config(references["qwen2"])  # the class's reads are found through its base classes too
    assert config_parsing.judge(m, {}, "qwen2").status == "passed"
    assert m["keys"]["rms_norm_eps"]["state"] == "mapped"


def test_missing_custom_module_map_is_a_one_line_spec_error(make_spec):
    spec = load_spec(_qwen2_spec(make_spec, {}, custom_module_map="maps/nowhere.py"))
    with pytest.raises(SpecError) as info:
        validate_environment(spec)
    line = info.value.one_line()
    assert line.startswith(f"{spec.source}: engines.lmdeploy.custom_module_map: ") and "nowhere.py" in line
    assert "\n" not in line


def test_scan_finds_config_reads_helpers_and_activation():
    reads, helpers, acts = scan(
        "def f(config, self):\n"
        "    a = config.rms_norm_eps; b = getattr(config, 'mlp_bias', False); c = self.config.tie_word_embeddings\n"
        "    rope = build_rotary_embedding_from_config(config); act = SiluAndMul(inplace=True)\n"
        "    other.hidden_act; getattr(other, 'head_dim')\n")
    assert reads == {"rms_norm_eps", "mlp_bias", "tie_word_embeddings"}
    assert helpers == {"build_rotary_embedding_from_config"} and acts == {"SiluAndMul"}


def test_logprobs_refuses_float32_before_starting_an_engine(references):
    """PytorchEngineConfig.dtype is auto/float16/bfloat16 only: an fp32 record cannot exist."""
    with pytest.raises(ValueError, match="float16/bfloat16 only"):
        LmdeployBackend().op_logprobs(references["qwen2"], "float32", {"s": [[1, 2]]}, 5, 4, "unused.json")


class _FakeInstance:
    """lmdeploy 0.18's EngineInstance protocol as read from its source: incremental EngineOutputs; a scoring
    request (max_new_tokens=0, logprob_start_len=0) carries one row per prompt[1:] token on its FINISH output;
    a generation carries one row per generated token; each row = the realized token + the top-k."""

    def __init__(self):
        self.ended = []

    def stream_infer(self, session_id, prompt, gen_config):
        from lmdeploy.messages import EngineOutput, ResponseType

        row = lambda token: {token: -0.5, 7: -1.0}  # noqa: E731
        if gen_config.max_new_tokens == 0:
            yield EngineOutput(ResponseType.FINISH, [], logprobs=[row(t) for t in prompt[1:]])
            return
        generated = list(range(100, 100 + gen_config.max_new_tokens))
        yield EngineOutput(ResponseType.SUCCESS, generated[:1], logprobs=[row(generated[0])])
        yield EngineOutput(ResponseType.SUCCESS, generated[1:], logprobs=[row(t) for t in generated[1:]])
        yield EngineOutput(ResponseType.FINISH, [])

    def end(self, session_id):
        self.ended.append(session_id)


def test_logprobs_record_assembly_with_a_fake_engine(monkeypatch, tmp_path):
    """The GPU-only op's bookkeeping (two requests per prompt -> one engine record), checked on CPU."""
    from lmdeploy.pytorch.engine import Engine

    from harness import engine_record

    instance = _FakeInstance()
    fake = type("FakeEngine", (), {"create_instance": lambda self: instance, "close": lambda self: None})()
    seen = {}
    monkeypatch.setattr(Engine, "from_pretrained", lambda path, engine_config: seen.update(cfg=engine_config) or fake)
    out = LmdeployBackend().op_logprobs("unused", "bfloat16", {"a": [[1, 2, 3], [4]]}, 5, 3, str(tmp_path / "r.json"))
    record = engine_record.load(out["path"])
    long, short = record["sets"]["a"]
    assert long["generated"] == [100, 101, 102] and len(long["dists"]) == 3 and long["dists"][0] == {2: -0.5, 7: -1.0}
    assert long["dists"][-1] == long["gen_dists"][0] == {100: -0.5, 7: -1.0}
    assert short["dists"] == [short["gen_dists"][0]]  # a one-token prompt has no scoring rows
    assert len(instance.ended) == 3  # every session ended, scoring and generation
    assert (seen["cfg"].dtype, seen["cfg"].logprobs_mode) == ("bfloat16", "raw_logprobs")


def test_certify_qwen2_end_to_end(run_certify):
    run = run_certify("--model", "qwen2", "--backend", "lmdeploy")
    assert run.returncode == 0, run.output[-3000:]
    assert run.check("qwen2", "config/lmdeploy")["status"] == "passed", run.output[-3000:]
    registration = run.check("qwen2", "registration/lmdeploy")
    assert registration["status"] == "passed", registration
    fp32 = run.check("qwen2", "logits/lmdeploy/float32")
    assert fp32["status"] == "not_applicable" and "no float32" in fp32["reason"], fp32  # by design, since a7f7a2f
    bf16 = run.check("qwen2", "logits/lmdeploy/bfloat16")
    assert bf16["status"] == "not_run" and "CUDA" in bf16["reason"], bf16


# ---- a contributor with no trainer at all: HF + lmdeploy only, a custom architecture, no converter template ----

NO_TRAINER_MODEL = """
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM


class LmdTinyConfig(Qwen2Config):
    model_type = "lmdtiny"


class LmdTinyForCausalLM(Qwen2ForCausalLM):
    config_class = LmdTinyConfig


AutoConfig.register("lmdtiny", LmdTinyConfig, exist_ok=True)
AutoModelForCausalLM.register(LmdTinyConfig, LmdTinyForCausalLM, exist_ok=True)
"""

NO_TRAINER_BUILDER = """
from lmdeploy.pytorch.configurations.builder import AutoModelConfigBuilder
from lmdeploy.pytorch.configurations.default import DefaultModelConfigBuilder


class LmdTinyBuilder(AutoModelConfigBuilder):
    @classmethod
    def condition(cls, hf_config):
        return hf_config.model_type == "lmdtiny"

    @classmethod
    def build(cls, hf_config, model_path=None, **kwargs):
        return DefaultModelConfigBuilder.build(hf_config, model_path, **kwargs)
"""

NO_TRAINER_MAP = "MODULE_MAP = {'LmdTinyForCausalLM': 'lmdeploy.pytorch.models.qwen2.Qwen2ForCausalLM'}\n"


def _no_trainer_spec(make_spec, builder: str) -> str:
    qwen2 = base_spec()
    spec = {"name": "lmd-notrainer", "hf_model_type": "lmdtiny", "plugins": ["lmdtiny_model.py"],
            "reference": qwen2["reference"], "backends": {"train": [], "infer": ["hf", "lmdeploy"]},
            "dtypes": ["bfloat16"],
            "engines": {"lmdeploy": {"plugins": ["lmdtiny_builder.py"], "custom_module_map": "lmdtiny_map.py"}}}
    return make_spec(spec, {"lmdtiny_model.py": NO_TRAINER_MODEL, "lmdtiny_builder.py": builder,
                            "lmdtiny_map.py": NO_TRAINER_MAP})


def test_no_trainer_spec_is_judged(make_spec, run_certify):
    """No megatron, no template: config/lmdeploy must not ask for a converter template (it used to error)."""
    path = _no_trainer_spec(make_spec, NO_TRAINER_BUILDER)
    run = run_certify("--model-spec", str(path), "--backend", "lmdeploy", "--backend", "hf")
    assert run.returncode == 0, run.output[-3000:]
    config = run.check("lmd-notrainer", "config/lmdeploy")
    assert config["status"] == "passed", config
    registration = run.check("lmd-notrainer", "registration/lmdeploy")
    assert registration["status"] == "passed", registration
    assert run.check("lmd-notrainer", "hf/hf/load/bfloat16")["status"] == "passed"  # the HF side loads it too


def test_no_trainer_spec_with_kv_heads_builder_bug_fails_config(make_spec, run_certify):
    builder = BAD_KV_BUILDER.replace('hf_config.model_type == "qwen2"', 'hf_config.model_type == "lmdtiny"')
    assert builder != BAD_KV_BUILDER
    path = _no_trainer_spec(make_spec, builder)
    run = run_certify("--model-spec", str(path), "--backend", "lmdeploy")
    assert run.returncode == 1, run.output[-3000:]
    config = run.check("lmd-notrainer", "config/lmdeploy")
    assert config["status"] == "failed", config
    assert "num_key_value_heads" in config["reason"], config
