"""A trainer's first-step gradients / weights written parameter by parameter (train_step.StreamSpill) are the very
file save_file writes from the whole dict: the judge cannot tell them apart, and no whole-model copy is held."""
from __future__ import annotations

import torch
import yaml
from safetensors.torch import load_file, save_file

from fixtures.tiny_models import materialize
from harness.train_step import StreamSpill, checkpoint_named

from .conftest import REPO


def _model(name: str):
    from transformers import AutoModelForCausalLM

    spec = yaml.safe_load((REPO / "model_specs" / f"{name}.yaml").read_text())
    folder = materialize(spec["hf_model_type"], spec["reference"]["config"], 0, "float32")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _streamed(tmp_path, model, skip=()) -> bytes:
    params = dict(model.named_parameters())
    spill = StreamSpill(str(tmp_path / "stream"), "grads", model, {n: tuple(p.shape) for n, p in params.items()})
    for name, param in reversed(params.items()):  # any arrival order
        if name not in skip:
            spill.write(name, param * 3)
    spill.close()
    return (tmp_path / "stream" / "grads.safetensors").read_bytes()


def _whole(tmp_path, model, skip=()) -> bytes:
    tensors = checkpoint_named(model, {n: (p * 3).detach() for n, p in model.named_parameters() if n not in skip})
    save_file(tensors, str(tmp_path / "whole.safetensors"))
    return (tmp_path / "whole.safetensors").read_bytes()


def test_a_dense_models_streamed_file_is_save_files_byte_for_byte(tmp_path):
    model = _model("qwen2")
    assert _streamed(tmp_path, model) == _whole(tmp_path, model)


def test_fused_moe_experts_are_written_per_expert_under_checkpoint_names(tmp_path):
    """transformers 5 holds experts fused ([E, 2I, H]); the file has them per expert, as save_pretrained writes."""
    model = _model("qwen2_moe")
    streamed = _streamed(tmp_path, model)
    assert streamed == _whole(tmp_path, model)
    names = load_file(str(tmp_path / "stream" / "grads.safetensors"))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names


def test_a_parameter_that_never_arrives_is_left_out_as_the_judge_expects(tmp_path):
    """A frozen parameter has no gradient: the file must not name it (the judge then says 'no value from the
    backend'), exactly as the whole-dict save left it out."""
    model = _model("qwen2")
    frozen = ("model.layers.0.mlp.down_proj.weight",)
    streamed = _streamed(tmp_path, model, skip=frozen)
    assert streamed == _whole(tmp_path, model, skip=frozen)
    assert frozen[0] not in load_file(str(tmp_path / "stream" / "grads.safetensors"))
