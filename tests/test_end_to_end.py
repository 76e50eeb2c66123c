"""End-to-end certification runs (`pytest --model-spec ...` in a subprocess, as a user runs it) and the pure
pieces the certificate depends on: the verdict rule and the plan's check ids.

Each subprocess run costs ~30-40 s (worker starts, one logit-parity layout), so there are four: ROLL's qwen2
template (only its imports changed) as an external spec's own plugin, run from another directory, and the same
certification under -n 2; a plugin-registered custom HF model class; and a spec whose template drops the qkv biases.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import yaml

from harness.backends import backend_class
from harness.certificate import verdict_of
from harness.plan import build_plan
from harness.spec import load_spec, load_yaml, parse_spec
from harness.verify import verify

from .conftest import REPO, base_spec

DATA = Path(__file__).resolve().parent / "data"
ROLL_TEMPLATE = DATA / "roll_qwen2_template.py"
ALWAYS_RUNNABLE = {"config", "roundtrip", "hf"}  # suites that run on any machine the harness installs on
CHEAP = {"dtypes": ["float32"], "parallel": [{"tp": 1, "pp": 1}]}  # one logit-parity layout: keeps each run short
# DeepSpeed's train steps (ZeRO 0-3 x world sizes) take minutes on CPU: runs select HF and Megatron only; the rest
# of the plan is still in the certificate, not_run
SELECT = ("--backend", "hf", "--backend", "megatron")
# These runs are about specs, plugins and the certificate, not training: they leave out the train-step suite
# (it has its own tests; each train check costs ~15 s of spawned ranks). Its checks stay in the certificate, not_run.
NO_TRAIN = ("-k", "not test_train")
CHECK_KEYS = {"id", "suite", "backend", "scope", "status", "reason", "metrics", "tolerance"}
STATUSES = {"passed", "failed", "not_run", "not_applicable", "error"}


def _template_from(builtin: str, name: str, *edits: tuple[str, str]) -> str:
    """A built-in template's source, registered under another name, with edits (each must apply once)."""
    text = (REPO / "harness" / "templates" / f"{builtin}.py").read_text()
    old_call = f'register_template(\n    "{builtin}",'
    assert text.count(old_call) == 1, f"harness/templates/{builtin}.py changed shape"
    text = text.replace(old_call, f'register_template(\n    "{name}",')
    for old, new in edits:
        assert text.count(old) == 1, f"harness/templates/{builtin}.py no longer contains {old!r} once"
        text = text.replace(old, new)
    return text


def _assert_contract(cert: dict, spec_path: Path, model: str) -> None:
    """The certificate's JSON contract (what CI and dashboards read)."""
    assert cert["model"] == model
    assert cert["spec_sha256"] == hashlib.sha256(spec_path.read_bytes()).hexdigest()
    assert cert["verdict"] in {"certified", "failed", "incomplete"}
    assert cert["verdict"] == verdict_of(cert["checks"])
    with tempfile.TemporaryDirectory() as tmp:  # what CI's gate does with it: it must verify against its spec
        (Path(tmp) / "certificate.json").write_text(json.dumps(cert))
        assert verify(Path(tmp) / "certificate.json", spec_path)["summary"] == cert["summary"]
    for package in ("python", "torch", "transformers", "megatron-core"):
        assert cert["versions"].get(package) not in (None, "", "not installed"), (package, cert["versions"])
    assert cert["checks"], "a certificate lists every planned check"
    ids = [c["id"] for c in cert["checks"]]
    assert len(ids) == len(set(ids)), "check ids repeat"
    for check in cert["checks"]:
        assert CHECK_KEYS <= set(check), (check["id"], sorted(CHECK_KEYS - set(check)))
        assert check["id"].startswith(f"{model}/{check['suite']}/{check['backend']}")
        assert check["status"] in STATUSES
        assert isinstance(check["metrics"], dict) and isinstance(check["tolerance"], dict)
        if check["status"] != "passed":
            assert check["reason"].strip(), f"{check['id']} is {check['status']} without a reason"


def _statuses(cert: dict) -> dict[str, str]:
    return {c["id"]: c["status"] for c in cert["checks"]}


def _runs_here(check: dict, selected: tuple[str, ...], skipped_suites: tuple[str, ...]) -> bool:
    cls = backend_class(check["backend"])
    return (check["backend"] in selected and check["suite"] not in skipped_suites and cls is not None
            and check["suite"] in cls.suites and cls.unavailable() is None)


def _assert_runnable_checks_pass(cert: dict, selected: tuple[str, ...] = ("hf", "megatron"),
                                 skipped_suites: tuple[str, ...] = ()) -> None:
    """Every selected check this machine can run passed; the rest (backends or suites it lacks, or not selected)
    are in the certificate as not_run with a reason."""
    by_design = {c.id for c in build_plan(parse_spec(load_yaml(cert["spec_text"].encode()))) if c.not_applicable}
    wrong = {c["id"]: (c["status"], c["reason"][:300]) for c in cert["checks"]
             if c["status"] != ("not_applicable" if c["id"] in by_design else
                                "passed" if _runs_here(c, selected, skipped_suites) else "not_run")}
    assert not wrong, wrong
    passed = {c["suite"] for c in cert["checks"] if c["status"] == "passed"}
    assert ALWAYS_RUNNABLE <= passed, passed
    assert any(c["status"] == "not_run" for c in cert["checks"])


# ---------------------------------------------------------------- subprocess runs


def _roll_spec(make_spec) -> Path:
    """ROLL's qwen2 template, only its imports changed, copied next to an external spec as the user's own plugin."""
    spec = base_spec("roll-qwen2", plugins=["roll_qwen2_template.py"], **CHEAP)
    return make_spec(spec, files={"roll_qwen2_template.py": ROLL_TEMPLATE.read_text()})


def _assert_roll_certificate(cert: dict, spec_path: Path) -> None:
    """What any run of the ROLL spec must produce, serial or under xdist: the whole plan in plan order, every
    selected check this machine can run passed, and the rest not_run; so two runs agree check by check."""
    _assert_contract(cert, spec_path, "roll-qwen2")
    assert [c["id"] for c in cert["checks"]] == [c.id for c in build_plan(load_spec(spec_path))]
    _assert_runnable_checks_pass(cert, skipped_suites=("train",))
    assert cert["verdict"] == "incomplete"
    ids = set(_statuses(cert))
    assert {"roll-qwen2/config/megatron", "roll-qwen2/roundtrip/megatron/bit-exact/float32",
            "roll-qwen2/hf/hf/save-load/float32", "roll-qwen2/logits/megatron/float32/tp1pp1",
            "roll-qwen2/config/vllm"} <= ids
    assert any(i.startswith("roll-qwen2/train/deepspeed/") for i in ids)
    # the worker used ROLL's template, not the built-in qwen2: only ROLL's maps rope_theta, which transformers 5
    # moved into rope_parameters (ROLL maps both, so nothing is lost)
    config = next(c for c in cert["checks"] if c["id"] == "roll-qwen2/config/megatron")
    assert config["metrics"]["template_reads_absent_keys"] == ["rope_theta"]
    assert config["metrics"]["keys"]["rope_parameters"]["state"] == "mapped"


def test_roll_template_as_an_external_plugin_certifies_from_another_cwd(make_spec, run_certify, tmp_path):
    spec_path = _roll_spec(make_spec)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the spec path is relative to the cwd (not the repo); the plugin resolves relative to the spec
    run = run_certify("--model-spec", "../specs/spec.yaml", *SELECT, *NO_TRAIN, cwd=elsewhere)
    assert run.returncode == 0, run.output[-4000:]
    cert = run.certificate("roll-qwen2")
    _assert_roll_certificate(cert, spec_path)
    assert Path(cert["spec_path"]) == spec_path.resolve()
    assert (run.report_dir / "roll-qwen2" / "summary.md").is_file()


def test_same_certification_under_xdist(make_spec, run_certify):
    """-n 2 splits the checks over two pytest workers; the controller's certificate is the same as a serial run's
    (both are held to _assert_roll_certificate, which fixes every id and status)."""
    spec_path = _roll_spec(make_spec)
    run = run_certify("--model-spec", str(spec_path), *SELECT, *NO_TRAIN, "-n", "2")
    assert run.returncode == 0, run.output[-4000:]
    _assert_roll_certificate(run.certificate("roll-qwen2"), spec_path)


TINYFANCY_MODEL = '''
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


class TinyFancyConfig(LlamaConfig):
    model_type = "tinyfancy"


class TinyFancyForCausalLM(LlamaForCausalLM):
    config_class = TinyFancyConfig


AutoConfig.register("tinyfancy", TinyFancyConfig)
AutoModelForCausalLM.register(TinyFancyConfig, TinyFancyForCausalLM)

'''


def test_plugin_registered_custom_hf_model_class(make_spec, run_certify):
    llama_reference = yaml.safe_load((REPO / "model_specs" / "llama.yaml").read_text())["reference"]
    spec = base_spec("tinyfancy", hf_model_type="tinyfancy", plugins=["fancy.py"], reference=llama_reference,
                     converter={}, backends={"train": ["megatron"], "infer": ["hf"]}, **CHEAP)
    plugin = TINYFANCY_MODEL + _template_from("llama", "tinyfancy")
    spec_path = make_spec(spec, files={"fancy.py": plugin})
    # the subject is loading and converting a plugin-registered class: logit parity of a Llama is tested elsewhere
    run = run_certify("--model-spec", str(spec_path), "-k", "not test_train and not test_logits")
    assert run.returncode == 0, run.output[-4000:]
    cert = run.certificate("tinyfancy")
    _assert_contract(cert, spec_path, "tinyfancy")
    _assert_runnable_checks_pass(cert, skipped_suites=("train", "logits"))
    load = run.check("tinyfancy", "hf/hf/load/float32")
    assert load["metrics"]["class"].endswith(".TinyFancyForCausalLM"), load["metrics"]
    config = run.check("tinyfancy", "config/megatron")
    assert config["metrics"]["model_type"] == "tinyfancy"
    assert config["metrics"]["keys"]["head_dim"]["state"] == "mapped"


def test_failing_spec_fails_the_run_and_names_the_tensor(make_spec, run_certify):
    drop_bias = ('''        QKVBiasConverOp(
            hf_names=[".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias"],
            mca_names=".self_attention.linear_qkv.bias",
        ),
''', "")
    spec = base_spec("no-qkv-bias", plugins=["no_bias.py"], converter={"template": "qwen2-no-qkv-bias"},
                     backends={"train": ["megatron"], "infer": ["hf"]}, **CHEAP)
    spec_path = make_spec(spec, files={"no_bias.py": _template_from("qwen2", "qwen2-no-qkv-bias", drop_bias)})
    run = run_certify("--model-spec", str(spec_path), *NO_TRAIN)
    assert run.returncode == 1, run.output[-4000:]
    cert = run.certificate("no-qkv-bias")
    _assert_contract(cert, spec_path, "no-qkv-bias")
    assert cert["verdict"] == "failed"
    statuses = _statuses(cert)
    failed = sorted(i for i, s in statuses.items() if s == "failed")
    assert "no-qkv-bias/roundtrip/megatron/consumption" in failed, statuses
    assert not [i for i, s in statuses.items() if s == "error"], statuses
    # the template's config mapping is intact: only the weights are wrong (and a renamed template is fine)
    assert statuses["no-qkv-bias/config/megatron"] == "passed", run.check("no-qkv-bias", "config/megatron")["reason"]
    assert statuses["no-qkv-bias/hf/hf/load/float32"] == "passed"
    consumption = run.check("no-qkv-bias", "roundtrip/megatron/consumption")
    assert "model.layers.0.self_attn.q_proj.bias" in consumption["reason"]
    # megatron-core cannot even load the converted weights: a failure naming the tensor, not a harness error
    logit_parity = run.check("no-qkv-bias", "logits/megatron/float32/tp1pp1")
    assert logit_parity["status"] == "failed" and "linear_qkv.bias" in logit_parity["reason"]
    summary = (run.report_dir / "no-qkv-bias" / "summary.md").read_text()
    assert "**failed**" in summary
    for check_id in failed:
        assert f"`{check_id}`" in summary
    assert "no-qkv-bias/roundtrip/megatron/consumption failed" in run.output
    assert "self_attn.q_proj.bias" in run.output


# ---------------------------------------------------------------- pure: verdict rule


@pytest.mark.parametrize("statuses, verdict", [
    ([], "incomplete"),
    (["passed"], "certified"),
    (["passed", "passed"], "certified"),
    (["passed", "not_run"], "incomplete"),
    (["not_run"], "incomplete"),
    (["passed", "failed"], "failed"),
    (["passed", "error"], "failed"),
    (["not_run", "failed"], "failed"),
    (["not_run", "error", "passed"], "failed"),
    (["passed", "not_applicable"], "certified"),  # impossible by design does not block certified
    (["not_applicable"], "incomplete"),  # ... but proves nothing on its own
    (["not_applicable", "not_run", "passed"], "incomplete"),
])
def test_verdict_of(statuses, verdict):
    assert verdict_of([{"id": f"m/s/b/{i}", "status": s} for i, s in enumerate(statuses)]) == verdict


# ---------------------------------------------------------------- pure: plan ids


def _spec(**changes):
    return parse_spec(base_spec("m", **changes))


def test_plan_ids_are_unique_and_stable():
    spec = _spec()
    first, second = build_plan(spec), build_plan(_spec())
    ids = [c.id for c in first]
    assert len(ids) == len(set(ids))
    assert ids == [c.id for c in second]
    for expected in ("m/config/megatron", "m/roundtrip/megatron/consumption", "m/roundtrip/megatron/names-shapes",
                     "m/roundtrip/megatron/bit-exact/float32", "m/roundtrip/megatron/bit-exact/bfloat16",
                     "m/hf/hf/load/float32", "m/hf/hf/save-load/bfloat16", "m/logits/megatron/float32/tp2pp2",
                     "m/train/megatron/bfloat16/tp1pp2", "m/config/vllm", "m/logits/sglang/float32"):
        assert expected in ids, expected
    assert all(c.short_id == c.id.removeprefix("m/") for c in first)
    # every (suite, backend) a spec implies is listed, even for backends this machine lacks
    assert {c.backend for c in first} == set(spec.all_backends)


def test_plan_grows_only_by_new_ids_when_a_layout_is_added():
    before = {c.id for c in build_plan(_spec(parallel=[{"tp": 1, "pp": 1}]))}
    after = {c.id for c in build_plan(_spec(parallel=[{"tp": 1, "pp": 1}, {"tp": 2, "pp": 1}]))}
    assert before < after
    assert all("tp2pp1" in i for i in after - before)


def test_plan_backend_filter():
    plan = build_plan(_spec(), backends=["megatron"])
    assert plan and {c.backend for c in plan} == {"megatron"}
    assert {c.suite for c in plan} == {"config", "roundtrip", "logits", "train"}
    assert build_plan(_spec(), backends=["hf", "megatron"]) == [c for c in build_plan(_spec())
                                                                if c.backend in ("hf", "megatron")]


def test_plan_dtype_filter_keeps_dtype_free_checks():
    plan = build_plan(_spec(), dtypes=["bfloat16"])
    assert {c.dtype for c in plan} == {"", "bfloat16"}
    ids = {c.id for c in plan}
    assert "m/config/megatron" in ids and "m/roundtrip/megatron/consumption" in ids
    assert "m/roundtrip/megatron/bit-exact/bfloat16" in ids
    assert not any(i.endswith("float32") or "/float32/" in i for i in ids)


def test_plan_dtype_filter_outside_the_spec_leaves_only_dtype_free_checks():
    plan = build_plan(_spec(dtypes=["float32"]), dtypes=["bfloat16"])
    assert plan and all(c.dtype == "" for c in plan)
