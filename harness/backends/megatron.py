"""Megatron-core (local layer spec) as ROLL's megatron_train/megatron_infer strategies build it.

Operations: the config-parsing view (the TransformerConfig really built from
the template), the round trip with the names/shapes GPTModel expects, log-probs and the train
step at a (tp, pp) layout, and the trainer side of a weight sync (refit_source).

megatron-core 0.16.1 on CPU (Python 3.11) needs: gloo, use_cpu_initialization,
every fusion off, and the RNG tracker initialised without the CUDA seeding
helper (it asserts on CPU). Newer megatron-core on GPU takes the same code.
With --device cuda the tp*pp ranks run NCCL, one GPU each (parameters built on
it, fusions as the template sets them); config and round-trip stay on the CPU
(they compute nothing numeric).

MoE (SequentialMLP, the local spec's experts, named local_experts.i as the converter writes them; grouped
GEMM would rename them weight1/weight2, so it stays off): the token dispatcher on the CPU is "allgather",
the one megatron-core 0.16.1 runs there. gloo itself has every collective the dispatchers use
(all_to_all_single with uneven splits, all_gather_into_tensor, reduce_scatter_tensor), but "alltoall"
creates a torch.cuda.Stream for its device-to-host copies when the layer is built, and "flex" needs
DeepEP/HybridEP (CUDA kernels). Training MoE under TP needs sequence parallelism (megatron-core refuses
otherwise: without it every TP rank hands its copy of the tokens to the experts, doubling their
gradients); the CPU norms (torch's) are built through a wrapper that allows it (`local_layer_spec`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from ..executor import prestart, run_rank_group
from .base import Backend, init_single_rank_group

ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu"}
CPU_SAFE = dict(
    use_cpu_initialization=True, perform_initialization=False, bias_activation_fusion=False,
    bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
    cross_entropy_loss_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
)
# TransformerConfig fields the config-parsing rules read, reported even when the template leaves them default
REPORTED_FIELDS = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                   "kv_channels", "normalization", "layernorm_epsilon", "activation_func", "gated_linear_unit",
                   "attention_dropout", "hidden_dropout", "add_qkv_bias", "add_bias_linear", "window_size",
                   "window_attn_skip_freq", "qk_layernorm", "num_moe_experts", "moe_router_topk",
                   "moe_router_pre_softmax", "moe_router_score_function", "moe_router_topk_scaling_factor",
                   "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
                   "moe_aux_loss_coeff", "moe_router_load_balancing_type", "moe_layer_freq", "moe_ffn_hidden_size",
                   "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_input_jitter_eps")


def _activation(name: str):
    import torch
    import torch.nn.functional as F

    if name == "squared_relu":
        return lambda x: torch.pow(F.relu(x), 2)
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no Megatron equivalent in the harness")
    return getattr(F, ACTIVATIONS[name])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(getattr(value, "__name__", value))


# megatron-core 0.16.1, the training path on CPU: the pipeline schedules, the mixed-precision
# optimizer and the grad-norm code allocate small bookkeeping tensors with a literal device="cuda"
# (total_num_tokens, _scale_one, the norm buffers), and DistributedOptimizer sorts parameters into
# fp32 / fp16-bf16 groups by their CUDA type name ("torch.cuda.BFloat16Tensor"). On CPU those
# modules get a torch whose tensor factories put "cuda" on the CPU (cpu_training_compat), and the
# optimizer is built while CPU tensors report CUDA type names (cuda_type_names). Nothing numeric changes.
# transformer.utils: the sliding-window mask of the local DotProductAttention (get_sliding_window_causal_mask).
CUDA_LITERAL_MODULES = ("megatron.core.pipeline_parallel.schedules", "megatron.core.optimizer.optimizer",
                        "megatron.core.optimizer.clip_grads", "megatron.core.utils", "megatron.core.transformer.utils")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor")


class _CpuFactories:
    """`torch` as one module sees it: tensor factories asked for device "cuda" allocate on the CPU."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name: str):
        attr = getattr(self._torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def cpu_training_compat() -> None:
    """Let megatron-core's schedules, DistributedOptimizer and grad norm run on CPU (see above)."""
    import importlib

    import torch

    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _CpuFactories):
            module.torch = _CpuFactories(torch)


@contextlib.contextmanager
def cpu_stays_cpu():
    """While building a GPTModel on CPU: tensor.cuda() leaves a CPU tensor where it is. A tied model whose head
    sits on another pipeline stage than its embedding (PP > 1) moves the shared weight to CUDA before the first
    stage's copy is all-reduced into the last stage's (megatron-core 0.16.1
    LanguageModule.setup_embeddings_and_output_layer); on gloo the all-reduce runs on the CPU as it is."""
    import torch

    own = torch.Tensor.__dict__.get("cuda")
    real = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self if not torch.cuda.is_available() and self.device.type == "cpu" else real(self, *args, **kwargs)

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.cuda
        else:
            torch.Tensor.cuda = own


@contextlib.contextmanager
def cuda_type_names():
    """While building megatron-core's optimizer on CPU: tensor.type() spells the CUDA type name."""
    import torch

    own = torch.Tensor.__dict__.get("type")
    real = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return real(self).replace("torch.", "torch.cuda.", 1)
        return real(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.type
        else:
            torch.Tensor.type = own


def build_transformer_config(tc_kwargs: dict[str, Any], dtype: str = "float32", cpu: bool = True):
    """TransformerConfig from McaConfigView.transformer_config_kwargs(); returns (config, keys Megatron lacks)."""
    import torch
    from megatron.core.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(k for k in tc_kwargs if k not in fields)
    kwargs = {k: v for k, v in tc_kwargs.items() if k in fields}
    kwargs["activation_func"] = _activation(kwargs["activation_func"])
    if isinstance(kwargs.get("window_size"), list):  # a tuple that travelled through JSON
        kwargs["window_size"] = tuple(kwargs["window_size"])
    if isinstance(kwargs.get("moe_layer_freq"), tuple):
        kwargs["moe_layer_freq"] = list(kwargs["moe_layer_freq"])
    if cpu:
        kwargs.update(CPU_SAFE)
    else:
        kwargs.update(perform_initialization=False)
    if kwargs.get("num_moe_experts"):
        kwargs.update(moe_grouped_gemm=False)  # SequentialMLP: the local_experts.i names the converter writes
        if cpu:
            kwargs.update(MOE_CPU_SAFE)
            moe_without_transformer_engine()
    kwargs["params_dtype"] = getattr(torch, dtype)
    return TransformerConfig(**kwargs), unknown


# the dispatcher and fusions megatron-core's MoE layer runs on the CPU (see the module docstring)
MOE_CPU_SAFE = dict(moe_token_dispatcher_type="allgather", moe_permute_fusion=False, moe_router_fusion=False,
                    moe_shared_expert_overlap=False)
_TE_MOE_NAMES = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute", "te_general_gemm")


def moe_without_transformer_engine() -> None:
    """megatron-core 0.16.1's moe_utils imports its TE helpers in a try block but tests `te_general_gemm is not
    None` in the router's gating linear: without Transformer Engine that name is undefined (NameError). Define
    the missing helpers as None, which is what the code's own checks expect for "TE absent"."""
    from megatron.core.transformer.moe import moe_utils

    for name in _TE_MOE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


class _SequenceParallelTorchNorm:
    """megatron-core's WrappedTorchNorm (the only norm without Apex/TE) refuses sequence parallelism, though a
    norm is per token. Built with sequence_parallel off, its parameters then carry the `sequence_parallel` flag
    Apex's FusedLayerNorm sets, so finalize_model_grads sums their gradients over the TP ranks' sequence shards."""

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        import copy

        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _join_train_routing(out_dir: Path, length: int) -> str | None:
    """The ranks' train routing files (train_routing_pp{p}_tp{t}, megatron_ranks._fit) as one file,
    out_dir/train_routing.safetensors; None when no rank recorded any (a dense model)."""
    from safetensors.torch import load_file, save_file

    from .megatron_capture import join_train_routing

    parts: dict[int, dict] = {}
    for path in sorted(out_dir.glob("train_routing_pp*_tp*.safetensors")):
        tp_rank = int(path.stem.rsplit("_tp", 1)[1])
        parts.setdefault(tp_rank, {}).update(load_file(str(path)))
    if not parts:
        return None
    save_file(join_train_routing(parts, length), str(out_dir / "train_routing.safetensors"))
    return str(out_dir / "train_routing.safetensors")


def _join_routing(dtype_dir: Path, pp: int) -> str:
    """The pipeline stages' router records (routing_stage{p}, each stage its own layers) as one file,
    dtype_dir/routing.safetensors; a stage that wrote none is an error naming it."""
    from safetensors.torch import load_file, save_file

    joined: dict = {}
    for stage in range(pp):
        part = dtype_dir / f"routing_stage{stage}.safetensors"
        if not part.is_file():
            raise RuntimeError(f"{part}: pipeline stage {stage} recorded no routing")
        joined.update(load_file(str(part)))
    save_file(joined, str(dtype_dir / "routing.safetensors"))
    return str(dtype_dir / "routing.safetensors")


def local_layer_spec(tc):
    """megatron-core's local layer spec for this TransformerConfig, as ROLL's McaGPTModel derives it
    (_get_transformer_layer_spec, transformer_impl local): qk layernorm included when the config says so; a
    MoE model gets the decoder block spec (moe_layer_freq: which layers are sparse, the others dense), for
    this pipeline stage's layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    if not tc.num_moe_experts:
        return get_gpt_layer_local_spec(tc.num_moe_experts, tc.moe_grouped_gemm, qk_layernorm=tc.qk_layernorm)
    block = get_gpt_decoder_block_spec(tc, use_transformer_engine=False, normalization=tc.normalization)
    if tc.sequence_parallel:
        block.layer_norm = _SequenceParallelTorchNorm
        for layer in block.layer_specs:
            layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = _SequenceParallelTorchNorm
            if tc.qk_layernorm:
                attention = layer.submodules.self_attention.submodules
                attention.q_layernorm = attention.k_layernorm = _SequenceParallelTorchNorm
    return block


class MegatronBackend(Backend):
    name = "megatron"
    suites = ("config", "roundtrip", "logits", "train", "routing")
    probe_module = "megatron.core"
    packages = ("torch", "megatron-core")

    def setup(self) -> None:
        prestart(getattr(self, "spec", None), self.device)  # the Ray executor's start overlaps the rest
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel

        if not dist.is_initialized():
            init_single_rank_group(dist)
        parallel_state.initialize_model_parallel(1, 1)
        # The CUDA seeding helper asserts on CPU; the inference tracker needs no device.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- helpers ----
    def _template_and_view(self, directory: str, template_name: str | None = None):
        """HF config, the template (the spec's, or one named explicitly), its kwargs and Megatron view."""
        from transformers import AutoConfig

        from ..convert import get_template
        from ..spec_plugins import resolve_template

        hf_config = AutoConfig.from_pretrained(directory)
        template = get_template(template_name) if template_name else resolve_template(self.spec)
        kwargs, absent = template.mca_config_kwargs(hf_config)
        from ..convert import McaConfigView

        return hf_config, template, kwargs, absent, McaConfigView(kwargs)

    def _transformer_config(self, view, dtype: str = "float32"):
        return build_transformer_config(view.transformer_config_kwargs(), dtype)

    # ---- operations ----
    def op_config(self, dir: str, template: str | None = None) -> dict[str, Any]:  # noqa: A002 - wire name
        from ..checks import config_parsing

        hf_config, template, kwargs, absent, view = self._template_and_view(dir, template)
        tc, unknown = self._transformer_config(view)
        reported = set(REPORTED_FIELDS) | set(view.transformer_config_kwargs())
        built = {
            "tc": {name: _jsonable(getattr(tc, name)) for name in sorted(reported) if hasattr(tc, name)},
            "gpt": {k: _jsonable(v) for k, v in view.gpt_model_kwargs().items()},
            "unknown_keys": unknown,
        }
        return config_parsing.measure(hf_config.to_dict(), kwargs, absent, template.config_hf_to_mca, built)

    def op_roundtrip(self, dir: str, template: str | None = None) -> dict[str, Any]:  # noqa: A002
        from ..checks.roundtrip import measure_roundtrip_files

        hf_config, template, kwargs, absent, view = self._template_and_view(dir, template)
        measurement = measure_roundtrip_files(dir, template, view)
        measurement["expected_shapes"] = self._expected_shapes(view)
        return measurement

    def _run_ranks(self, dir: str, template: str | None, tp: int, pp: int, job: dict[str, Any]):  # noqa: A002
        """Convert HF -> Megatron, shard for (tp, pp, job["ep"]), and run megatron_ranks on `job` at the layout's
        world size, pp * lcm(tp, ep) (the data-parallel ranks EP implies included)."""
        import json
        import tempfile

        from ..convert.stream import hf_to_shard_files
        from .megatron_ranks import run_rank

        hf_config, template_obj, kwargs, absent, view = self._template_and_view(dir, template)
        with tempfile.TemporaryDirectory(prefix="harness-mcore-") as tmp:
            # streamed tensor by tensor (the index's shards, in order) into the shard files: the whole HF
            # state is never held here; mca_state is the planned Megatron tensors on meta (names, shapes)
            mca_state, report, layout = hf_to_shard_files(Path(dir), template_obj, view, tp, pp, Path(tmp),
                                                          ep=int(job.get("ep", 1)))
            # device: gloo ranks on cpu; on cuda NCCL, one GPU per rank (megatron_ranks.setup_group)
            # spec_path: the ranks import the spec's plugins (a trainer-side seam replaced there, as for DeepSpeed)
            spec_path = str(self.spec.source) if getattr(self, "spec", None) and self.spec.source else None
            job = {**job, "tp": tp, "pp": pp, "ep": layout.ep, "shard_dir": tmp, "tied": layout.tied, "device": self.device,
                   "spec_path": spec_path,
                   "mca_kwargs": view.transformer_config_kwargs(), "gpt_kwargs": view.gpt_model_kwargs()}
            Path(f"{tmp}/job.json").write_text(json.dumps(job, default=str))
            # the spec's executor: local spawn, or Ray actors (--executor ray)
            run_rank_group(run_rank, layout.world_size, f"{tmp}/job.json", getattr(self, "spec", None), self.device)
        load_problems = [p for f in sorted(Path(job["out_dir"]).glob("load_problems_*.json"))
                         for p in json.loads(f.read_text())]
        return template_obj, view, layout, mca_state, report, load_problems

    def op_logprobs(self, dir: str, dtypes: list[str], tp: int, pp: int,  # noqa: A002
                    prompts: dict[str, list[list[int]]], out_dir: str, template: str | None = None,
                    ep: int = 1, realized: dict | None = None) -> dict[str, Any]:
        """Convert, shard for (tp, pp, ep), run the layout's ranks; log-probs per dtype land in out_dir/<dtype>/
        (full vocabulary; with `realized`, rollout scoring: each realized next token's, checks.rollout).
        A MoE model's router decisions come beside them (routing.safetensors, megatron_ranks._logprobs)."""
        _, view, _, _, report, load_problems = self._run_ranks(dir, template, tp, pp, {
            "mode": "logprobs", "dtypes": dtypes, "prompts": prompts, "out_dir": out_dir, "ep": ep,
            "realized": realized})
        result = {"out_dir": out_dir, "files": {d: f"{out_dir}/{d}/logprobs.safetensors" for d in dtypes},
                  "conversion_problems": report.problems(), "load_problems": load_problems}
        if view.get("num_moe_experts") and not load_problems:
            result["routing"] = {d: _join_routing(Path(out_dir) / d, pp) for d in dtypes}
        return result

    def op_capture(self, dir: str, dtypes: list[str], tp: int, pp: int, sequences: list[list[int]],  # noqa: A002
                   out_dir: str, template: str | None = None, ep: int = 1) -> dict[str, Any]:
        """Divergence localization: the activation points of one batch at (tp, pp), joined into whole-model
        tensors per dtype (out_dir/<dtype>/capture.safetensors), and what produced each Megatron weight."""
        from safetensors.torch import load_file, save_file

        from ..convert.layer_spec import to_local
        from .megatron_capture import join

        template_obj, view, layout, mca_state, report, load_problems = self._run_ranks(dir, template, tp, pp, {
            "mode": "capture", "dtypes": dtypes, "sequences": sequences, "out_dir": out_dir, "ep": ep})
        files = {}
        for dtype in dtypes if not load_problems else ():
            per_rank = {(p, t): load_file(f"{out_dir}/{dtype}/capture_pp{p}_tp{t}.safetensors")
                        for p in range(pp) for t in range(tp)}
            files[dtype] = f"{out_dir}/{dtype}/capture.safetensors"
            save_file(join(per_rank, tp), files[dtype])
        origin = {"produced_from": {to_local(k): v for k, v in report.produced_from.items()},
                  "megatron_names": sorted(to_local(k) for k in mca_state), "tied": bool(layout.tied),
                  # the config check's own reading of each HF key (mapped / unmapped / mismatch / ...)
                  "config_states": {k: row["state"] for k, row in self.op_config(dir, template)["keys"].items()},
                  "config_hf_to_mca": dict(template_obj.config_hf_to_mca)}
        return {"files": files, "origin": origin, "load_problems": load_problems,
                "num_layers": int(view.transformer_config_kwargs()["num_layers"])}

    def op_train(self, dir: str, dtype: str, tp: int, pp: int, sequences: list[list[int]], steps: int,  # noqa: A002
                 out_dir: str, template: str | None = None, ep: int = 1) -> dict[str, Any]:
        """ROLL's megatron_train step on the fixed batch; grads and weights come back under HF names
        through the template's reverse direction (the part of a template only training exercises)."""
        import json

        from ..convert import dist
        from ..train_step import save_train_result, spill_to

        template_obj, view, layout, mca_state, report, load_problems = self._run_ranks(dir, template, tp, pp, {
            "mode": "train", "dtype": dtype, "sequences": sequences, "steps": steps, "out_dir": out_dir, "ep": ep})
        if load_problems:  # a converter bug: judged as a failure naming the tensors, not a crash
            return {"load_problems": load_problems}
        result: dict[str, Any] = {"losses": json.loads((Path(out_dir) / "losses.json").read_text())}
        spill = spill_to(f"{out_dir}/hf")  # each kind written once converted: one whole model in memory at a time
        for kind in ("grads", "weights"):
            shards = dist.load_rank_shards(out_dir, f"{kind}_", layout)  # whichever rank files exist
            try:
                whole = dist.gather_as(shards, layout, mca_state)  # the template may spell TE names
            except dist.GatherError as exc:  # rank files that are not one model: judged, naming the tensors
                return {"gather_problems": [f"{kind}: {p}" for p in exc.problems]}
            del shards
            hf, back = template_obj.mca_to_hf(whole, view)
            del whole
            spill(kind, hf)
            result.setdefault("parameter_order", list(hf))
            result[kind], hf = None, None
            result[f"{kind}_conversion_problems"] = back.problems()
        saved = save_train_result(result, f"{out_dir}/hf")
        aux = Path(out_dir) / "aux_losses.json"  # MoE: step 0's load-balancing terms (megatron_ranks._aux_losses)
        extra = json.loads(aux.read_text()) if aux.is_file() else {}
        routing = _join_train_routing(Path(out_dir), max(map(len, sequences)))
        if routing:  # MoE: the router's decisions at every step, which a bf16 reference replays
            extra["routing"] = routing
        return {**saved, **extra, "conversion_problems": result["grads_conversion_problems"]}

    def op_refit_source(self, dir: str, dtype: str, tp: int, pp: int, sequences: list[list[int]],  # noqa: A002
                        prompts: dict[str, list[list[int]]], out_dir: str,
                        template: str | None = None, ep: int = 1, steps: int = 1) -> dict[str, Any]:
        """The trainer side of an RL weight sync, as ROLL's Megatron strategy performs it.

        tp*pp ranks take `steps` train steps on the train suite's fixed batch; the live post-step
        parameters of every rank are gathered (TP shards joined, PP stages renumbered) and converted
        with the template's Megatron->HF direction into one HF-named file, in send order. Beside it:
        the trainer's own full-vocabulary log-probs on the prompt sets after the steps (what the engine
        must reproduce) and before them (to show the steps are visible at all)."""
        import json

        from ..convert import dist
        from ..convert.refit import planted_fault, save_sync_file

        fault = planted_fault()
        sync = "pre-step" if fault and fault["kind"] == "pre-step" else "post-step"
        template_obj, view, layout, mca_state, report, load_problems = self._run_ranks(dir, template, tp, pp, {
            "mode": "refit_source", "dtype": dtype, "sequences": sequences, "prompts": prompts,
            "out_dir": out_dir, "sync": sync, "ep": ep, "steps": steps})
        if load_problems:  # a converter bug in the forward direction: judged as a failure naming the tensors
            return {"load_problems": load_problems}
        shards = dist.load_rank_shards(out_dir, "live_", layout)  # whichever rank files exist
        hf, back = template_obj.mca_to_hf(dist.gather_as(shards, layout, mca_state), view)
        return {"weights": save_sync_file(hf, f"{out_dir}/sync.safetensors"),
                "logprobs": f"{out_dir}/logprobs.safetensors",
                "pre_step_logprobs": f"{out_dir}/logprobs_pre_step.safetensors",
                "losses": json.loads((Path(out_dir) / "losses.json").read_text()),
                "sent_tensors": len(hf), "sent_bytes": sum(t.numel() * t.element_size() for t in hf.values()),
                "synced": sync, "conversion_problems": report.problems() + back.problems()}

    def _expected_shapes(self, view) -> dict[str, list[int]]:
        """Parameter names and shapes of megatron-core's GPTModel (local spec) for this config."""
        from megatron.core.models.gpt import GPTModel

        tc, _ = self._transformer_config(view, "bfloat16")
        model = GPTModel(tc, local_layer_spec(tc), **view.gpt_model_kwargs())
        shapes = {name: list(t.shape) for name, t in model.state_dict().items()
                  if not name.endswith("._extra_state")}
        del model
        return shapes


BACKEND = MegatronBackend
