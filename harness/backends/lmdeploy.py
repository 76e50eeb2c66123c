"""lmdeploy's PyTorch engine, with a model added the way lmdeploy's "add a new model" guide shows.

A user adds a model to lmdeploy with (a) a ConfigBuilder subclass when the HF config needs custom
parsing (spec engines.lmdeploy.plugins; subclasses of AutoModelConfigBuilder register themselves),
and (b) a model class named in MODULE_MAP or in a custom_module_map file
(spec engines.lmdeploy.custom_module_map, relative to the spec).

Operations (lmdeploy 0.18.0, read from its source):
- config (CPU): AutoModelConfigBuilder.build(hf_config, path, tp=1), the path ModelConfig.from_hf_config
  takes and a ConfigBuilder plugin hooks. The resulting ModelConfig carries the sizes; the model class
  reads everything else from the (builder-mutated) HF config itself, found by lmdeploy_reads.
- registration (CPU): architecture -> class via patch._get_module_map/_get_model_class, after
  patch.update_custom_module_map for a spec's map; then lmdeploy's ModelChecker (it exit(1)s on failure).
- logprobs (CUDA only): Engine + EngineInstance on token ids (no tokenizer needed).
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import re
from typing import Any

from .base import Backend

# ModelConfig fields every ConfigBuilder fills and the engine uses (KV cache sizing, attention kernels)
MODEL_CONFIG_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                       "sliding_window", "vocab_size")
# PytorchEngineConfig.dtype accepts only these (its __post_init__ asserts); there is no float32 engine
ENGINE_DTYPES = ("float16", "bfloat16")
_GPU_WORDS = re.compile(r"cuda|triton|nvcc|libcudart|nvidia", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"\w*(Error|Exception|Exit)\w*: ")


class LmdeployBackend(Backend):
    name = "lmdeploy"
    suites = ("config", "registration", "logits")
    packages = ("lmdeploy",)
    probe_module = "lmdeploy.pytorch.configurations"
    gpu_suites = ("logits",)
    not_applicable_dtypes = {"float32": "lmdeploy's PyTorch engine has no float32 (PytorchEngineConfig.dtype is "
                                        "auto, float16 or bfloat16)"}

    def setup(self) -> None:
        self._custom_map_applied = False

    # ---- helpers ----
    def _custom_map_path(self) -> str | None:
        spec = getattr(self, "spec", None)
        path = spec.engines.lmdeploy.custom_module_map if spec is not None else None
        return str(spec.resolve_relative(path)) if path is not None else None

    def _apply_custom_map(self) -> list[str]:
        """lmdeploy's own loader, as the engine's model agent calls it; once per worker."""
        path = self._custom_map_path()
        if path is None or getattr(self, "_custom_map_applied", False):
            return []
        from lmdeploy.pytorch.models.patch import update_custom_module_map

        try:
            update_custom_module_map(path)
        except BaseException as exc:  # noqa: BLE001 - assert/RuntimeError/the user's file raising
            return [f"engines.lmdeploy.custom_module_map {path}: {type(exc).__name__}: {exc}"]
        self._custom_map_applied = True
        return []

    def _resolve(self, hf_config) -> dict[str, Any]:
        """Architecture -> model class the way build_model_from_hf_config does it."""
        from lmdeploy.pytorch.models import patch
        from lmdeploy.pytorch.models.module_map import CUSTOM_MODULE_MAP

        problems = self._apply_custom_map()
        module_map = patch._get_module_map()
        auto_map = getattr(hf_config, "auto_map", None) or {}
        names = [auto_map["AutoModelForCausalLM"].split(".")[-1]] if "AutoModelForCausalLM" in auto_map \
            else list(getattr(hf_config, "architectures", None) or [])
        arch = next((n for n in names if n in module_map), names[0] if names else None)
        out: dict[str, Any] = {"architecture": arch, "resolved_class": None, "source": None, "class": None,
                               "importable": False, "import_note": None, "problems": problems}
        if arch not in module_map:
            out["problems"].append(f"lmdeploy has no model class for {names} (not in MODULE_MAP; add it with a "
                                   f"custom_module_map)")
            return out
        qualname = module_map[arch]
        out.update(resolved_class=qualname, source="custom_module_map" if arch in CUSTOM_MODULE_MAP else "module_map")
        module_name, _, class_name = qualname.rpartition(".")
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            spec = None
        where = f"{out['source']} maps {arch} to {qualname}, but"
        if spec is None:
            out["problems"].append(f"{where} module {module_name} does not exist")
            return out
        try:
            cls = patch._get_model_class(hf_config, module_map)  # lmdeploy's own import of the class
        except AttributeError:
            out["problems"].append(f"{where} {module_name} has no {class_name}")
            return out
        except Exception as exc:  # noqa: BLE001
            message = f"{type(exc).__name__}: {exc}"
            if _GPU_WORDS.search(message) or getattr(exc, "name", None) == "triton":
                out["import_note"] = f"importing {qualname} needs the GPU stack here: {message}"
            else:
                out["problems"].append(f"importing {qualname} failed: {message}")
            return out
        out.update(resolved_class=f"{cls.__module__}.{cls.__qualname__}", importable=True)
        out["class"] = cls
        return out

    @staticmethod
    def _rope_view(hf_config) -> dict[str, Any]:
        """The rope lmdeploy's build_rotary_embedding_from_config builds, in HF terms."""
        from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params, get_rope_theta

        params = build_rotary_params(hf_config)
        types = {"Default": "default", "LinearScaling": "linear", "DynamicNTKScaling": "dynamic", "Yarn": "yarn",
                 "LongRoPEScaling": "longrope", "Llama3": "llama3", "Fope": "fope"}
        return {"rope_theta": float(get_rope_theta(hf_config, default=10000)),
                "rope_type": types.get(params["emb_type"].name, params["emb_type"].name),
                "factor": float(params.get("scaling_factor", 1.0)),
                "partial_rotary_factor": float(params.get("partial_rotary_factor") or 1.0)}

    @staticmethod
    def _checker(directory: str) -> dict[str, Any]:
        """lmdeploy's ModelChecker (+ its transformers check), log captured; it calls exit(1) on failure."""
        from lmdeploy.pytorch.check_env.model import ModelChecker
        from lmdeploy.pytorch.check_env.transformers import TransformersChecker

        stream = io.StringIO()
        logger = logging.getLogger(f"harness.lmdeploy.checker.{id(stream)}")
        logger.propagate, logger.handlers = False, [logging.StreamHandler(stream)]
        logger.setLevel(logging.INFO)
        # dtype/device as PytorchEngineConfig defaults them; the checker builds ModelConfig through the builders
        checker = ModelChecker(model_path=directory, trust_remote_code=False, dtype="auto", device_type="cuda",
                               logger=logger)
        checker.register_required_checker(TransformersChecker(logger=logger))
        try:
            checker.handle()
            passed = True
        except SystemExit:
            passed = False
        log = [_ANSI.sub("", line) for line in stream.getvalue().splitlines() if line.strip()]
        return {"passed": passed, "log": log, "needs_cuda": not passed and bool(_GPU_WORDS.search(" ".join(log)))}

    # ---- operations ----
    def op_config(self, dir: str) -> dict[str, Any]:  # noqa: A002 - wire name
        from lmdeploy.hf_configs import config_from_pretrained
        from lmdeploy.pytorch.configurations import AutoModelConfigBuilder
        from lmdeploy.pytorch.configurations.default import DefaultModelConfigBuilder

        from ..checks import config_parsing, engine_config
        from .lmdeploy_reads import class_reads

        hf_config = config_from_pretrained(dir, trust_remote_code=False)
        hf_dict = hf_config.to_dict()  # before the builder: builders mutate hf_config (head_dim, kv heads)
        builder = next((b for b in AutoModelConfigBuilder._sub_classes  # the selection build() makes
                        if b is not DefaultModelConfigBuilder and b.condition(hf_config)), DefaultModelConfigBuilder)
        model_config = AutoModelConfigBuilder.build(hf_config, dir, tp=1)
        seen = model_config.hf_config  # what build_patched_model hands the model class
        resolved = self._resolve(seen)
        scanned = class_reads(resolved["resolved_class"], resolved["class"]) if resolved["resolved_class"] \
            else {"reads": [], "activation": None, "scanned": []}
        class_attrs = set(scanned["reads"])
        act = config_parsing._act_name(getattr(seen, "hidden_act", None)) if "hidden_act" in class_attrs \
            else scanned["activation"] or "unknown: the class neither reads hidden_act nor uses SiluAndMul/GeluAndMul"
        built = {
            "model_config": {f: getattr(model_config, f) for f in MODEL_CONFIG_FIELDS},
            "model": {key: getattr(seen, key, None) for key in hf_dict},
            "reads": class_attrs,
            "rope": self._rope_view(seen),
            "act": act,
        }
        reads = {f"model_config.{f}" for f in MODEL_CONFIG_FIELDS} | {f"hf_config.{a}" for a in class_attrs}
        methods = {a for a in class_attrs if callable(getattr(type(seen), a, None))}
        measurement = engine_config.measure("lmdeploy", hf_dict, reads, built,
                                            absent_reads=sorted(class_attrs - set(hf_dict) - methods))
        measurement.update(builder=f"{builder.__module__}.{builder.__qualname__}",
                           model_class=resolved["resolved_class"], class_scan=scanned["scanned"],
                           resolution_problems=resolved["problems"])
        return measurement

    def op_registration(self, dir: str) -> dict[str, Any]:  # noqa: A002
        from lmdeploy.hf_configs import config_from_pretrained

        resolved = self._resolve(config_from_pretrained(dir, trust_remote_code=False))
        checker = self._checker(dir)
        problems = list(resolved["problems"])
        if not checker["passed"]:
            errors = [line for line in checker["log"] if _EXCEPTION_LINE.match(line)] or checker["log"][-1:]
            problems.append("lmdeploy's model checker failed" +
                            (" (it needs CUDA for this checkpoint)" if checker["needs_cuda"] else "") +
                            f": {'; '.join(errors) or 'no log'}")
        return {"architecture": resolved["architecture"], "resolved_class": resolved["resolved_class"],
                "source": resolved["source"], "importable": resolved["importable"],
                "import_note": resolved["import_note"], "checker": checker, "problems": problems}

    def op_logprobs(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]], top_k: int,  # noqa: A002
                    max_new_tokens: int, out_path: str) -> dict[str, Any]:
        """Prompt and greedy-generation logprobs from lmdeploy's PyTorch engine (CUDA only).

        lmdeploy 0.18 has prompt logprobs only as a scoring-only request (GenerationConfig
        logprob_start_len=0 with max_new_tokens=0; rows for prompt[1:]), so each prompt takes two
        requests: scoring, then greedy generation (top_k=1; at the engine level do_sample is not
        read). logprobs_mode="raw_logprobs" is required: with the default (None) the engine returns
        no logprobs at all. Each returned row holds the realized token plus the top-k.
        Limits: no float32 (PytorchEngineConfig.dtype is auto/float16/bfloat16), so the record
        exists for float16/bfloat16 only; a one-token prompt has no scoring rows.
        """
        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"lmdeploy's PyTorch engine runs {'/'.join(ENGINE_DTYPES)} only "
                             f"(PytorchEngineConfig.dtype); it cannot produce {dtype} logprobs")
        from lmdeploy import GenerationConfig, PytorchEngineConfig
        from lmdeploy.pytorch.engine import Engine

        from .. import engine_record

        longest = max(len(p) for seqs in prompts.values() for p in seqs)
        # "uni" keeps the model in this process, where the spec's ConfigBuilder plugins are registered
        engine = Engine.from_pretrained(dir, engine_config=PytorchEngineConfig(
            dtype=dtype, logprobs_mode="raw_logprobs", session_len=longest + max_new_tokens + 8, max_batch_size=8,
            cache_max_entry_count=0.2, eager_mode=True, distributed_executor_backend="uni",
            custom_module_map=self._custom_map_path()))
        instance = engine.create_instance()
        session = iter(range(1, 1 << 30))
        scoring = GenerationConfig(max_new_tokens=0, logprobs=top_k, logprob_start_len=0)
        greedy = GenerationConfig(max_new_tokens=max_new_tokens, top_k=1, temperature=1.0, logprobs=top_k,
                                  ignore_eos=True)
        sets = {}
        try:
            for name, seqs in prompts.items():
                sets[name] = []
                for prompt in seqs:
                    dists = _stream(instance, next(session), prompt, scoring)[1] if len(prompt) > 1 else []
                    generated, gen_dists = _stream(instance, next(session), prompt, greedy)
                    sets[name].append(engine_record.sequence(prompt, dists + gen_dists[:1], generated, gen_dists))
        finally:
            engine.close()
        engine_record.save(out_path, {"top_k": top_k, "sets": sets})
        return {"path": out_path}


def _stream(instance, session_id: int, prompt: list[int], gen_config) -> tuple[list[int], list[dict[int, float]]]:
    """Tokens and logprob rows of one request; the engine hands both out incrementally."""
    tokens: list[int] = []
    rows: list[dict[int, float]] = []
    try:
        for out in instance.stream_infer(session_id, prompt, gen_config=gen_config):
            if out.status.name not in ("SUCCESS", "FINISH"):
                raise RuntimeError(f"lmdeploy request {session_id} ended with {out.status.name}")
            tokens += out.token_ids
            rows += [{int(k): float(v) for k, v in row.items()} for row in out.logprobs or []]
    finally:
        instance.end(session_id)
    return tokens, rows


BACKEND = LmdeployBackend
