"""A real local HF checkpoint (reference.path), sharded with an index, certified as it is.

The test writes its own: a tiny qwen2 saved with save_pretrained(max_shard_size=...) into several shards plus
model.safetensors.index.json. The reference loads from that directory (no re-saved copy), the Megatron conversion
streams it tensor by tensor following the index, and the certificate lists the files with their sha256.
A shard the index names but that is missing, and a truncated shard, stop the run with one line (exit 4).
"""
from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import pytest
import yaml

from .conftest import QWEN2_SPEC, base_spec

INDEX = "model.safetensors.index.json"
SELECT = ("--backend", "hf", "--backend", "megatron", "-k", "not test_train")


def _write_sharded(folder: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fixtures.tiny_models import _perturb_constant_tensors

    overrides = yaml.safe_load(QWEN2_SPEC.read_text())["reference"]["config"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **overrides), dtype=torch.float32)
    _perturb_constant_tensors(model, 0)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=total // 5)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = _write_sharded(tmp_path_factory.mktemp("real") / "ckpt")
    shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    assert len(shards) >= 3, shards
    return folder


def _spec_with(make_spec, tmp_path, checkpoint: Path, copy: bool = False) -> tuple[Path, Path]:
    """A spec whose reference.path is the checkpoint (relative to the spec); `copy`: a private copy to break."""
    import shutil

    ckpt = tmp_path / "specs" / "ckpt"
    ckpt.parent.mkdir(exist_ok=True)
    if copy:
        shutil.copytree(checkpoint, ckpt)
    else:
        ckpt.symlink_to(checkpoint)
    spec = base_spec("real-ckpt", reference={"path": "ckpt", "seed": 0},
                     backends={"train": ["megatron"], "infer": ["hf"]}, dtypes=["float32"],
                     parallel=[{"tp": 1, "pp": 1}])
    return make_spec(spec), ckpt


def test_sharded_checkpoint_certifies_its_own_files(make_spec, run_certify, tmp_path, checkpoint):
    spec_path, ckpt = _spec_with(make_spec, tmp_path, checkpoint)
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    run = run_certify("--model-spec", str(spec_path), *SELECT)
    assert run.returncode == 0, run.output[-4000:]
    cert = run.certificate("real-ckpt")
    for row in ("hf/hf/load/float32", "hf/hf/save-load/float32", "logits/megatron/float32/tp1pp1",
                "roundtrip/megatron/bit-exact/float32", "roundtrip/megatron/consumption", "config/megatron"):
        assert run.check("real-ckpt", row)["status"] == "passed", run.check("real-ckpt", row)
    assert run.check("real-ckpt", "logits/megatron/float32/tp1pp1")["metrics"]["max_abs_logprob"] < 1e-4
    reference = cert["reference"]
    assert reference["path"] == str(ckpt.resolve()) and reference["sharded"] is True
    files = {f["name"]: f for f in reference["files"]}
    assert set(files) == {p.name for p in checkpoint.iterdir()}  # config.json, the index, every shard
    for name, record in files.items():
        data = (checkpoint / name).read_bytes()
        assert record == {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before  # nothing re-saved into it
    from harness.verify import verify

    assert verify(run.report_dir / "real-ckpt" / "certificate.json", spec_path)["summary"] == cert["summary"]
    assert "reference checkpoint:" in (run.report_dir / "real-ckpt" / "summary.md").read_text()


def test_reference_is_the_users_directory_not_a_copy(checkpoint):
    from harness.backends.hf import HFBackend

    out = HFBackend().op_materialize("qwen2", {}, 0, "bfloat16", str(checkpoint))
    assert out["dir"] == str(checkpoint.resolve())
    info = HFBackend().op_load(out["dir"], "bfloat16")  # fp32 files loaded as bf16, as every run does
    assert info["dtypes"] == ["bfloat16"] and not info["missing_keys"] and not info["unexpected_keys"]


def test_conversion_streams_tensor_by_tensor_and_matches_whole_dict_sharding(checkpoint, tmp_path, monkeypatch):
    """hf_to_shard_files (the Megatron backend's conversion) writes the bytes dist.shard + save_file wrote from the
    whole state, while never holding more than a few input tensors at once."""
    import harness.templates.qwen2  # noqa: F401 - registers the template
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from harness.convert import dist, get_template, stream
    from harness.convert.refit import load_hf_state

    template = get_template("qwen2")
    view = template.mca_config(AutoConfig.from_pretrained(checkpoint))
    alive, peak, reads = set(), [0], [0]
    real_read = stream.SourceReader.read

    def counting_read(self, path, entry):
        tensor = real_read(self, path, entry)
        key = reads[0] = reads[0] + 1
        alive.add(key)
        weakref.finalize(tensor, alive.discard, key)
        peak[0] = max(peak[0], len(alive))
        return tensor

    monkeypatch.setattr(stream.SourceReader, "read", counting_read)
    out = tmp_path / "streamed"
    out.mkdir()
    planned, report, layout = stream.hf_to_shard_files(checkpoint, template, view, 2, 1, out)
    assert not report.problems()
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    assert reads[0] == len(weight_map)
    # alive at once: only the converter's pending groups (q/k/v weights and biases, gate/up of the layer being read)
    per_layer = sum(name.startswith("model.layers.0.") for name in weight_map)
    assert peak[0] < per_layer < len(weight_map) / 2, (peak, per_layer, len(weight_map))
    assert all(t.is_meta for t in planned.values())
    mca_state, whole_report = template.hf_to_mca(load_hf_state(checkpoint), view)
    assert set(planned) == set(mca_state)
    for (p, t, _e), shard in dist.shard(mca_state, dist.layout_for(view, whole_report, 2, 1)).items():
        whole = tmp_path / f"whole_pp{p}_tp{t}.safetensors"
        save_file(shard, whole)
        assert (out / f"pp{p}_tp{t}.safetensors").read_bytes() == whole.read_bytes()


def _one_line_usage_error(run, *words: str) -> None:
    assert run.returncode == 4, run.output[-4000:]
    assert "Traceback" not in run.output, run.output[-4000:]
    lines = [line for line in run.output.splitlines() if "reference.path" in line]
    assert len(lines) == 1, run.output[-4000:]
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_shard_named_in_the_index_is_one_line(make_spec, run_certify, tmp_path, checkpoint):
    spec_path, ckpt = _spec_with(make_spec, tmp_path, checkpoint, copy=True)
    shard = sorted(set(json.loads((ckpt / INDEX).read_text())["weight_map"].values()))[1]
    (ckpt / shard).unlink()
    run = run_certify("--model-spec", str(spec_path), *SELECT)
    _one_line_usage_error(run, str(ckpt.resolve() / INDEX), f"names shard {shard}", "missing")


def test_truncated_shard_is_one_line(make_spec, run_certify, tmp_path, checkpoint):
    spec_path, ckpt = _spec_with(make_spec, tmp_path, checkpoint, copy=True)
    shard = sorted(set(json.loads((ckpt / INDEX).read_text())["weight_map"].values()))[-1]
    data = (ckpt / shard).read_bytes()
    (ckpt / shard).write_bytes(data[: len(data) // 2])
    run = run_certify("--model-spec", str(spec_path), *SELECT)
    _one_line_usage_error(run, str(ckpt.resolve() / shard), "not a valid safetensors file")


def test_index_must_agree_with_its_shards(checkpoint, tmp_path):
    import shutil

    from harness.convert.stream import ConvertError, hf_weight_files

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    index = json.loads((ckpt / INDEX).read_text())
    tensor = "model.embed_tokens.weight"
    other = next(n for n in sorted(set(index["weight_map"].values())) if n != index["weight_map"][tensor])
    index["weight_map"][tensor] = other
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(ConvertError) as err:
        hf_weight_files(ckpt)
    assert err.value.one_line() == f"{ckpt / INDEX}: weight_map puts {tensor} in {other}, which does not hold it"


def test_an_op_that_cannot_run_on_meta_is_planned_on_real_tensors(checkpoint, tmp_path, monkeypatch):
    import harness.templates.qwen2  # noqa: F401 - registers the template
    from transformers import AutoConfig

    from harness.convert import get_template, stream

    template = get_template("qwen2")
    view = template.mca_config(AutoConfig.from_pretrained(checkpoint))
    (tmp_path / "meta").mkdir()
    (tmp_path / "real").mkdir()
    expected = stream.hf_to_shard_files(checkpoint, template, view, 2, 1, tmp_path / "meta")

    def no_meta(entry):
        raise NotImplementedError("this op needs real data")

    monkeypatch.setattr(stream.Entry, "meta", no_meta)
    planned, report, layout = stream.hf_to_shard_files(checkpoint, template, view, 2, 1, tmp_path / "real")
    assert not report.problems() and layout == expected[2]
    assert {k: (t.shape, t.dtype, t.is_meta) for k, t in planned.items()} == \
        {k: (t.shape, t.dtype, True) for k, t in expected[0].items()}
    for name in ("pp0_tp0.safetensors", "pp0_tp1.safetensors"):
        assert (tmp_path / "real" / name).read_bytes() == (tmp_path / "meta" / name).read_bytes()
