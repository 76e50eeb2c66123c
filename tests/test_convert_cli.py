"""`python -m harness convert`: the streaming HF <-> Megatron-core converter, and the dist sharding rules.

Conversions run in-process through harness.__main__.main (a subprocess costs seconds of imports);
one subprocess run checks the real command line's exit status and stderr.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from harness.__main__ import main
from harness.convert import RenameConverOp, dist, get_template, register_template
from harness.convert import stream as stream_mod
from harness.convert.layer_spec import to_local

from .conftest import REPO

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
MODELS = {  # name -> (model_type, config overrides, dtype)
    "qwen2-tied-bf16": ("qwen2", dict(SMALL, tie_word_embeddings=True), "bfloat16"),
    "qwen2-untied-f32": ("qwen2", dict(SMALL, tie_word_embeddings=False), "float32"),
    "llama-tied-bias-f32": ("llama", dict(SMALL, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
                            "float32"),
    "llama-untied-bf16": ("llama", dict(SMALL, tie_word_embeddings=False), "bfloat16"),
}
PARALLEL = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoints, built once (shared by xdist workers of one run, never by two runs)."""
    from fixtures.tiny_models import materialize

    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "convert-cli-models"
    old = os.environ.get("HARNESS_CACHE_DIR")
    os.environ["HARNESS_CACHE_DIR"] = str(cache)
    try:
        return {name: materialize(kind, overrides, 0, dtype) for name, (kind, overrides, dtype) in MODELS.items()}
    finally:
        if old is None:
            os.environ.pop("HARNESS_CACHE_DIR")
        else:
            os.environ["HARNESS_CACHE_DIR"] = old


def convert(capsys, *args) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    bad = [n for n in expected if not same_bytes(actual[n], expected[n])]
    assert bad == []


def reference_shards(model_dir: Path, tp: int, pp: int,
                     template_name: str | None = None) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """What the Megatron backend's op_logprobs writes: whole-model conversion in memory, then dist.shard."""
    from transformers import AutoConfig

    template = get_template(template_name or json.loads((model_dir / "config.json").read_text())["model_type"])
    view = template.mca_config(AutoConfig.from_pretrained(model_dir))
    mca, report = template.hf_to_mca(load_file(model_dir / "model.safetensors"), view)
    assert report.problems() == []
    layout = dist.Layout(tp, pp, int(view.num_layers), bool(view.get("tie_embeddings_and_output_weights")),
                         dist.stacked_suffixes(report.stacked))
    return dist.shard(mca, layout)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("tp,pp", PARALLEL, ids=[f"tp{t}pp{p}" for t, p in PARALLEL])
@pytest.mark.parametrize("model", list(MODELS))
def test_roundtrip_is_bit_exact_and_mcore_equals_dist_shard(models, tmp_path, capsys, model, tp, pp):
    src = models[model]
    mcore, back = tmp_path / "mcore", tmp_path / "hf"

    rc, out, err = convert(capsys, "--to", "mcore", "--tp", tp, "--pp", pp, src, mcore)
    assert (rc, err) == (0, ""), err
    files = sorted(p.name for p in mcore.iterdir())
    assert files == sorted([f"pp{p}_tp{t}.safetensors" for p in range(pp) for t in range(tp)] + ["harness_layout.json"])
    layout = json.loads((mcore / "harness_layout.json").read_text())
    assert (layout["tp"], layout["pp"], layout["num_layers"]) == (tp, pp, 2)
    assert layout["tied"] is MODELS[model][1]["tie_word_embeddings"]
    assert layout["stacked"] == {".mlp.linear_fc1.weight": 2, **({".mlp.linear_fc1.bias": 2} if "bias" in model else {})}
    assert layout["template"] == MODELS[model][0]
    assert layout["hf_config"] == json.loads((src / "config.json").read_text())

    # the streamed shards are exactly save_file(dist.shard(in-memory conversion)): tensors and file bytes
    for (p, t, _e), expected in reference_shards(src, tp, pp).items():
        streamed = mcore / f"pp{p}_tp{t}.safetensors"
        assert_same_state(load_file(streamed), expected)
        save_file(expected, tmp_path / "reference.safetensors")
        assert streamed.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()

    rc, out, err = convert(capsys, "--to", "hf", mcore, back)
    assert (rc, err) == (0, ""), err
    assert sorted(p.name for p in back.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_state(load_file(back / "model.safetensors"), load_file(src / "model.safetensors"))
    # laid out as transformers' save_pretrained wrote it, metadata included: the very same bytes
    assert (back / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_sharded_checkpoint_with_index_converts_like_single_file(models, tmp_path, capsys):
    src = models["llama-tied-bias-f32"]
    state = load_file(src / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded / "config.json")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, sharded / file, metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    (sharded / "consolidated.safetensors").write_bytes(b"not listed in the index: ignored")

    assert convert(capsys, "--to", "mcore", "--tp", 2, "--pp", 2, src, tmp_path / "a")[0] == 0
    assert convert(capsys, "--to", "mcore", "--tp", 2, "--pp", 2, sharded, tmp_path / "b")[0] == 0
    for p, t in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        name = f"pp{p}_tp{t}.safetensors"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert convert(capsys, "--to", "hf", tmp_path / "b", tmp_path / "back")[0] == 0
    assert_same_state(load_file(tmp_path / "back" / "model.safetensors"), state)


def test_plugin_template_and_module_plugin(models, tmp_path, capsys):
    plugin = tmp_path / "my_template.py"
    plugin.write_text(
        "import copy\n"
        "import harness.templates.qwen2\n"
        "from harness.convert import register_template, templates\n"
        "base = templates['qwen2']\n"
        "register_template('qwen2-copy', config_hf_to_mca=base.config_hf_to_mca,\n"
        "                  weight_converters=copy.deepcopy(base.weight_converters),\n"
        "                  hf_layer_prefix=base.hf_layer_prefix, constant_mca_config=base.constant_mca_config)\n")
    src = models["qwen2-untied-f32"]
    rc, _, err = convert(capsys, "--to", "mcore", "--tp", 2, "--plugin", plugin, "--template", "qwen2-copy",
                         src, tmp_path / "plugin")
    assert (rc, err) == (0, "")
    assert convert(capsys, "--to", "mcore", "--tp", 2, src, tmp_path / "builtin")[0] == 0
    for t in range(2):
        name = f"pp0_tp{t}.safetensors"
        assert (tmp_path / "plugin" / name).read_bytes() == (tmp_path / "builtin" / name).read_bytes()
    layout = json.loads((tmp_path / "plugin" / "harness_layout.json").read_text())
    assert layout["template"] == "qwen2-copy" and layout["plugins"] == [str(plugin.resolve())]
    rc, _, err = convert(capsys, "--to", "hf", "--plugin", plugin, tmp_path / "plugin", tmp_path / "back")
    assert (rc, err) == (0, "")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    # a module plugin, and a template that does not match model_type
    rc, _, err = convert(capsys, "--to", "mcore", "--plugin", "harness.templates.llama", "--template", "llama",
                         models["llama-untied-bf16"], tmp_path / "llama")
    assert (rc, err) == (0, "")


def test_config_without_a_mapped_key_falls_back_to_transformers_defaults(models, tmp_path, capsys):
    """config.json is read directly only when complete; otherwise AutoConfig fills in (here head_dim)."""
    src = _copy_model(models["llama-untied-bf16"], tmp_path / "in")
    config = json.loads((src / "config.json").read_text())
    del config["head_dim"]
    (src / "config.json").write_text(json.dumps(config))
    assert convert(capsys, "--to", "mcore", "--tp", 2, src, tmp_path / "out")[0] == 0
    for t, expected in enumerate(reference_shards(src, 2, 1).values()):
        assert_same_state(load_file(tmp_path / "out" / f"pp0_tp{t}.safetensors"), expected)


def test_existing_out_dir_keeps_other_files_and_gets_replaced_outputs(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "pp0_tp0.safetensors").write_bytes(b"stale")
    assert convert(capsys, "--to", "mcore", models["qwen2-tied-bf16"], out)[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert_same_state(load_file(out / "pp0_tp0.safetensors"), reference_shards(models["qwen2-tied-bf16"], 1, 1)[(0, 0, 0)])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_streaming_keeps_few_tensors_alive(models, tmp_path, capsys, monkeypatch):
    """Pass 2 reads one tensor at a time and drops it once written: never the whole model in memory."""
    src = models["llama-tied-bias-f32"]
    entries = stream_mod.SafetensorsFile.open(src / "model.safetensors").entries
    sizes = [e.end - e.start for e in entries]
    alive, peak = [0], [0]
    real_read = stream_mod.read_tensor

    def tracked(fd, entry):
        tensor, mapped = real_read(fd, entry)
        nbytes = entry.end - entry.start
        alive[0] += nbytes
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - nbytes))
        return tensor, mapped

    monkeypatch.setattr(stream_mod, "read_tensor", tracked)
    assert convert(capsys, "--to", "mcore", "--tp", 2, src, tmp_path / "out")[0] == 0
    assert alive[0] == 0
    # q, k and v wait for each other; nothing else outlives its own conversion
    assert 0 < peak[0] <= 3 * max(sizes) < sum(sizes) / 2


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_stream_writer_is_byte_identical_to_save_file_for_every_dtype(tmp_path, metadata):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (), (0, 4), (2, 1, 3)]
    tensors = {}
    for i, (code, dtype) in enumerate(sorted(stream_mod.TORCH_DTYPES.items())):
        raw = torch.randint(0, 256, (256,), generator=gen, dtype=torch.uint8)
        shape = shapes[i % len(shapes)]
        count = int(torch.tensor(shape).prod()) if shape else 1
        size = torch.empty((), dtype=dtype).element_size()
        tensors[f"t.{code}.{i}"] = raw[: count * size].view(dtype).reshape(shape)
        tensors[f"s.{i}"] = torch.zeros(i, dtype=dtype)
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    writer = stream_mod.StreamWriter(tmp_path / "streamed.safetensors",
                                     {n: (stream_mod.SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for n, t in tensors.items()},
                                     metadata)
    for name in sorted(tensors, reverse=True):  # any order
        writer.write(name, tensors[name])
    writer.close()
    assert writer.missing == set()
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


class DoubleInPlace(RenameConverOp):
    """A rename that scales its input in place (allowed: inputs are private copy-on-write mappings)."""

    def _hf_to_mca(self, weights):
        weights[0].mul_(2)
        return weights


def test_untouched_tensors_copy_file_to_file_and_changed_ones_do_not(models, tmp_path, capsys, monkeypatch):
    import harness.templates.qwen2  # noqa: F401

    base = get_template("qwen2")
    ops = [DoubleInPlace(hf_names=op.hf_names, mca_names=op.mca_names) if op.hf_names == ["model.norm.weight"]
           else copy.deepcopy(op) for op in base.weight_converters]
    register_template("qwen2-inplace-test", config_hf_to_mca=base.config_hf_to_mca, weight_converters=ops,
                      hf_layer_prefix=base.hf_layer_prefix, constant_mca_config=base.constant_mca_config)
    copied = []
    real_copy = os.copy_file_range

    def tracked(src, dst, count, offset_src=None, offset_dst=None):
        copied.append(count)
        return real_copy(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", tracked)
    src = models["qwen2-untied-f32"]
    rc, _, err = convert(capsys, "--to", "mcore", "--pp", 2, "--template", "qwen2-inplace-test", src, tmp_path / "out")
    assert (rc, err) == (0, "")

    state = load_file(src / "model.safetensors")
    assert sum(copied) >= state["model.embed_tokens.weight"].nbytes + state["lm_head.weight"].nbytes
    expected = reference_shards(src, 1, 2, "qwen2-inplace-test")
    assert torch.equal(expected[(1, 0, 0)]["decoder.final_layernorm.weight"], 2 * state["model.norm.weight"])
    for (p, t, _e), shard in expected.items():
        assert_same_state(load_file(tmp_path / "out" / f"pp{p}_tp{t}.safetensors"), shard)


# ---------------------------------------------------------------- bad input: one line, exit 2, OUT_DIR untouched
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


ERRORS = {
    # name: (prepare(model_dir, tmp) -> (args, expected path), expected words)
    "missing config.json": (lambda d, tmp: ((d / "config.json").unlink(), (["--to", "mcore", d], d / "config.json"))[1],
                            "missing"),
    "no safetensors": (lambda d, tmp: ((d / "model.safetensors").unlink(), (["--to", "mcore", d], d))[1],
                       "no *.safetensors"),
    "garbage safetensors": (lambda d, tmp: ((d / "model.safetensors").write_bytes(b"\x07" * 40),
                                            (["--to", "mcore", d], d / "model.safetensors"))[1],
                            "not a valid safetensors file"),
    "truncated safetensors": (lambda d, tmp: (_truncate(d / "model.safetensors"),
                                              (["--to", "mcore", d], d / "model.safetensors"))[1],
                              "not a valid safetensors file"),
    "unknown template": (lambda d, tmp: (["--to", "mcore", "--template", "nope", d], d / "config.json"),
                         "no converter template 'nope'"),
    "unknown model_type": (lambda d, tmp: ((d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "model_type": "mystery"})),
        (["--to", "mcore", d], d / "config.json"))[1], "no converter template 'mystery'"),
    "layers not divisible by pp": (lambda d, tmp: (["--to", "mcore", "--pp", 3, d], d / "config.json"),
                                   "2 layers are not divisible by --pp 3"),
    "groups not divisible by tp": (lambda d, tmp: (["--to", "mcore", "--tp", 4, d], d / "config.json"),
                                   "num_query_groups 2 is not divisible by --tp 4"),
    "heads not divisible by tp": (lambda d, tmp: (["--to", "mcore", "--tp", 3, d], d / "config.json"),
                                  "num_attention_heads 4 is not divisible by --tp 3"),
    "missing plugin file": (lambda d, tmp: (["--to", "mcore", "--plugin", tmp / "absent.py", d], tmp / "absent.py"),
                            "does not exist"),
    "missing layout": (lambda d, tmp: (["--to", "hf", d], d / "harness_layout.json"), "missing"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_exit_2_and_out_dir_untouched(models, tmp_path, capsys, case):
    model_dir = _copy_model(models["qwen2-untied-f32"], tmp_path / "in")
    prepare, words = ERRORS[case]
    args, path = prepare(model_dir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pp0_tp0.safetensors").write_bytes(b"an earlier conversion")
    (out / "keep.txt").write_text("mine")

    rc, stdout, err = convert(capsys, *args, out)

    assert rc == 2
    assert stdout == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{path}: ") and words in err, err
    assert "Traceback" not in err
    assert (out / "pp0_tp0.safetensors").read_bytes() == b"an earlier conversion"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "pp0_tp0.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary folder left behind


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "differing duplicate"])
def test_bad_mcore_input_to_hf(models, tmp_path, capsys, damage):
    mcore = tmp_path / "mcore"
    assert convert(capsys, "--to", "mcore", "--tp", 2, models["qwen2-untied-f32"], mcore)[0] == 0
    shard = mcore / "pp0_tp1.safetensors"
    if damage == "missing shard":
        shard.unlink()
        words = "missing (harness_layout.json says tp=2 pp=1)"
    elif damage == "truncated shard":
        _truncate(shard)
        words = "not a valid safetensors file"
    else:  # a norm (duplicated on every tp rank) that differs between the ranks
        state = load_file(shard)
        state["decoder.final_layernorm.weight"] = state["decoder.final_layernorm.weight"] + 1
        save_file(state, shard)
        shard = mcore / "pp0_tp0.safetensors"
        words = "decoder.final_layernorm.weight: duplicated tensor differs between tp ranks 0 and 1"
    out = tmp_path / "back"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")

    rc, stdout, err = convert(capsys, "--to", "hf", mcore, out)

    assert rc == 2 and stdout == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{shard}: ") and words in err, err
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "mcore"]


def test_command_line_subprocess_error_and_other_subcommands(models, tmp_path, capsys):
    model_dir = _copy_model(models["qwen2-tied-bf16"], tmp_path / "in")
    (model_dir / "model.safetensors").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "harness", "convert", "--to", "mcore", "--tp", "2",
                           str(model_dir), str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{model_dir / 'model.safetensors'}: not a valid safetensors file")
    assert not (tmp_path / "out").exists()
    # the subcommands that were there before still work
    assert main(["list"]) == 0 and "qwen2" in capsys.readouterr().out.split()


# ---------------------------------------------------------------- dist: shard -> gather, property
@st.composite
def megatron_states(draw):
    tp, pp = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    groups = tp * draw(st.integers(1, 2))
    cfg = dict(
        tp=tp, pp=pp, groups=groups, heads=groups * draw(st.integers(1, 3)), head_dim=draw(st.integers(1, 4)),
        hidden=draw(st.integers(1, 8)), ffn=tp * draw(st.integers(1, 3)), layers=pp * draw(st.integers(1, 2)),
        vocab=tp * draw(st.integers(1, 6)), tied=draw(st.booleans()), stacked=draw(st.booleans()),
        qkv_bias=draw(st.booleans()), te_names=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])), seed=draw(st.integers(0, 999)),
    )
    return cfg


def build_megatron_state(cfg) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg["seed"])

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(cfg["dtype"])

    h, ffn, hd = cfg["hidden"], cfg["ffn"], cfg["head_dim"]
    qkv_rows = (cfg["heads"] + 2 * cfg["groups"]) * hd
    state = {"embedding.word_embeddings.weight": rand(cfg["vocab"], h), "decoder.final_layernorm.weight": rand(h)}
    if not cfg["tied"]:
        state["output_layer.weight"] = rand(cfg["vocab"], h)
    for i in range(cfg["layers"]):
        p = f"decoder.layers.{i}."
        norm1 = "self_attention.linear_qkv.layer_norm_weight" if cfg["te_names"] else "input_layernorm.weight"
        norm2 = "mlp.linear_fc1.layer_norm_weight" if cfg["te_names"] else "pre_mlp_layernorm.weight"
        state[p + norm1] = rand(h)
        state[p + "self_attention.linear_qkv.weight"] = rand(qkv_rows, h)
        if cfg["qkv_bias"]:
            state[p + "self_attention.linear_qkv.bias"] = rand(qkv_rows)
        state[p + "self_attention.linear_proj.weight"] = rand(h, cfg["heads"] * hd)
        state[p + norm2] = rand(h)
        state[p + "mlp.linear_fc1.weight"] = rand(ffn * (2 if cfg["stacked"] else 1), h)
        state[p + "mlp.linear_fc2.weight"] = rand(h, ffn)
    return state


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=megatron_states())
def test_dist_shard_then_gather_is_bit_exact(cfg):
    tp, pp, per_stage = cfg["tp"], cfg["pp"], cfg["layers"] // cfg["pp"]
    state = build_megatron_state(cfg)
    layout = dist.Layout(tp, pp, cfg["layers"], cfg["tied"], {".mlp.linear_fc1.weight": 2} if cfg["stacked"] else {})

    shards = dist.shard(state, layout)
    whole = dist.gather(shards, layout)

    assert_same_state(whole, {to_local(n): t for n, t in state.items()})
    # the layout itself: whole KV groups per rank, [gate_r; up_r] per rank, stages renumbered from 0
    assert set(shards) == {(p, t, 0) for p in range(pp) for t in range(tp)}
    last = pp - 1
    for (p, t, _e), shard in shards.items():
        for name, piece in shard.items():
            assert piece.is_contiguous()
        assert ("embedding.word_embeddings.weight" in shard) == (p == 0)
        assert ("decoder.final_layernorm.weight" in shard) == (p == last)
        assert ("output_layer.weight" in shard) == (p == last and (not cfg["tied"] or pp > 1))
        if p == last and cfg["tied"] and pp > 1:  # Megatron's own copy of the tied embedding
            assert same_bytes(shard["output_layer.weight"], state["embedding.word_embeddings.weight"].chunk(tp)[t])
        layers = sorted({int(n.split(".")[2]) for n in shard if n.startswith("decoder.layers.")})
        assert layers == list(range(per_stage))
        g = p * per_stage  # first global layer of this stage
        qkv = state[f"decoder.layers.{g}.self_attention.linear_qkv.weight"]
        assert same_bytes(shard["decoder.layers.0.self_attention.linear_qkv.weight"], qkv.chunk(tp)[t])
        fc1 = state[f"decoder.layers.{g}.mlp.linear_fc1.weight"]
        expected_fc1 = (torch.cat([part.chunk(tp)[t] for part in fc1.chunk(2)]) if cfg["stacked"]
                        else fc1.chunk(tp)[t])
        assert same_bytes(shard["decoder.layers.0.mlp.linear_fc1.weight"], expected_fc1)
        assert same_bytes(shard["decoder.layers.0.self_attention.linear_proj.weight"],
                          state[f"decoder.layers.{g}.self_attention.linear_proj.weight"].chunk(tp, dim=1)[t])
        assert same_bytes(shard["decoder.layers.0.input_layernorm.weight"],
                          state[f"decoder.layers.{g}." + ("self_attention.linear_qkv.layer_norm_weight"
                                                          if cfg["te_names"] else "input_layernorm.weight")])


def test_dist_layout_rejects_layers_not_divisible_by_pp():
    with pytest.raises(ValueError, match="num_layers 3 is not divisible by pipeline size 2"):
        dist.Layout(1, 2, 3)
