"""SGLang: the second rollout engine ROLL sends new models to, run as its offline users run it.

Engine (`sglang.Engine`, the offline entry point in sglang/srt/entrypoints/engine.py) with
`skip_tokenizer_init=True`, token ids in; one engine per (checkpoint, dtype) lives in the worker
(`worker_per_dtype`: an engine fixes its dtype, and SGLang keeps process-global runtime state).
SGLang has no usable CPU path (see shared/backend-notes.md), so this backend needs CUDA: where
sglang or a GPU is missing, every check is reported not_run with the reason, never passed.

How a model reaches SGLang (its "support new models" guide): a module defines the model class,
named exactly like the HF `architectures` entry, and exports it as `EntryClass` (a class or a
list); SGLang's registry (sglang/srt/models/registry.py) scans the package named by
SGLANG_EXTERNAL_MODEL_PACKAGE for such modules and registers them with overwrite=True, so they
replace a built-in class of the same name. A spec lists those modules (python files or module
names) under engines.sglang.plugins; the worker generates a small package whose modules re-export
each plugin's EntryClass and points SGLANG_EXTERNAL_MODEL_PACKAGE (and PYTHONPATH, for SGLang's
spawned scheduler process) at it before sglang is first imported.

Logprobs. SGLang's meta_info (tokenizer_manager.py, add_logprob_to_meta_info) holds
  input_token_logprobs[i]  = (logprob, token_id, text|None) of prompt token i given tokens < i;
                             entry 0 has logprob None (nothing predicts the first token)
  input_top_logprobs[i]    = top-k list predicting prompt token i; entry 0 is None
  output_token_logprobs[j] = (logprob, token_id, text|None) of generated token j
  output_top_logprobs[j]   = top-k list predicting generated token j
so the record's dists[t] (the distribution of the token *after* prompt position t) is
input_top_logprobs[t + 1] for t < len(prompt) - 1 and output_top_logprobs[0] for the last prompt
position. Prompt logprobs are always the raw model distribution (Req.temp_scaled_logprobs is
hard-wired False). Logprobs of *sampled* tokens follow SGLang's environment switch
SGLANG_RETURN_ORIGINAL_LOGPROB (RETURN_ORIGINAL_LOGPROB in older releases), read once when
sglang/srt/layers/sampler.py is imported: unset/false -> logprobs after temperature scaling
(spec.rollout.engine_logprobs "processed"); true -> the logprobs before temperature ("raw").
SGLang has no server argument for this. The worker sets both names from the spec before sglang
is imported and writes the mode the loaded sampler really uses into the samples file; a release
with neither switch is refused rather than guessed at. Greedy requests (temperature 0) always get
the raw log_softmax.

Not exercised on a GPU by this harness's own tests: the parsing of meta_info into engine records is
unit-tested against hand-built meta_info shaped as the SGLang sources produce it.
"""
from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import pkgutil
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .base import Backend

# Environment names SGLang reads for the sampled-token logprob mode (newest first).
LOGPROB_SWITCHES = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")
EXTERNAL_PACKAGE_ENV = "SGLANG_EXTERNAL_MODEL_PACKAGE"
FALLBACK_ARCH = "TransformersForCausalLM"  # SGLang's generic class for architectures it has no native class for


# ----------------------------------------------------------------------------- pure: meta_info -> records


def _entry(item: Sequence, where: str) -> tuple[float | None, int]:
    """One SGLang logprob entry (logprob, token_id, text-or-None) -> (logprob, token_id)."""
    if not isinstance(item, (list, tuple)) or len(item) < 2:
        raise ValueError(f"{where}: expected a (logprob, token_id, text) entry, got {item!r}")
    logprob, token = item[0], item[1]
    return (None if logprob is None else float(logprob)), int(token)


def top_dist(top: Sequence | None, where: str) -> dict[int, float]:
    """One position of input_top_logprobs/output_top_logprobs -> {token_id: logprob}."""
    if not top:  # SGLang puts None where a position has no top-k entries
        raise ValueError(f"{where}: SGLang returned no top logprobs for this position")
    dist: dict[int, float] = {}
    for item in top:
        logprob, token = _entry(item, where)
        if logprob is None:
            raise ValueError(f"{where}: top logprob entry for token {token} has no value")
        dist[token] = logprob
    return dist


def _same_token(reported: int, expected: int, vocab_size: int | None) -> bool:
    # SGLang clips input_token_logprobs_idx values >= vocab_size - 1 to 0 (meant for image-token hash
    # padding; scheduler_output_processor_mixin.py, _process_input_token_logprobs), so the very last
    # vocabulary id comes back as 0 on the prompt side. The logprob value is still that of the real token.
    if reported == expected:
        return True
    return reported == 0 and vocab_size is not None and expected >= vocab_size - 1


def sequence_from_meta(prompt: Sequence[int], output_ids: Sequence[int] | None, meta: dict[str, Any],
                       vocab_size: int | None = None) -> dict[str, Any]:
    """One SGLang generate() result (return_logprob, logprob_start_len=0, top_logprobs_num=K, greedy)
    -> an engine-record sequence (harness/engine_record.py): dists[t] is the distribution of the token after
    prompt position t, dists[-1] == gen_dists[0]; every dist holds SGLang's top-K plus the realized token."""
    from ..engine_record import sequence

    prompt = [int(t) for t in prompt]
    in_tokens, in_top = meta.get("input_token_logprobs"), meta.get("input_top_logprobs")
    out_tokens, out_top = meta.get("output_token_logprobs"), meta.get("output_top_logprobs")
    if in_tokens is None or in_top is None or out_tokens is None or out_top is None:
        missing = [k for k in ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs",
                               "output_top_logprobs") if meta.get(k) is None]
        raise ValueError(f"SGLang meta_info lacks {', '.join(missing)} (return_logprob=True, logprob_start_len=0 "
                         f"and top_logprobs_num > 0 are needed)")
    if len(in_tokens) != len(prompt) or len(in_top) != len(prompt):
        raise ValueError(f"SGLang returned prompt logprobs for {len(in_tokens)} tokens ({len(in_top)} top-k rows) "
                         f"but the prompt has {len(prompt)}: logprob_start_len was not 0, or the result belongs "
                         f"to another prompt")
    first_logprob, first_token = _entry(in_tokens[0], "input_token_logprobs[0]")
    if first_logprob is not None or in_top[0]:
        raise ValueError("SGLang's prompt logprobs are not shifted as expected: position 0 should carry no "
                         "logprob (nothing predicts the first token)")
    generated = [_entry(item, f"output_token_logprobs[{j}]")[1] for j, item in enumerate(out_tokens)]
    if output_ids is not None and list(map(int, output_ids)) != generated:
        raise ValueError(f"output_ids {list(output_ids)} disagree with output_token_logprobs' tokens {generated}")
    if not generated:
        raise ValueError("SGLang generated no tokens: the record needs at least one (max_new_tokens >= 1)")
    if len(out_top) != len(generated):
        raise ValueError(f"{len(out_top)} output top-k rows for {len(generated)} generated tokens")

    gen_dists = []
    for j, (item, top) in enumerate(zip(out_tokens, out_top)):
        logprob, token = _entry(item, f"output_token_logprobs[{j}]")
        if logprob is None:
            raise ValueError(f"output_token_logprobs[{j}] has no value")
        gen_dists.append({**top_dist(top, f"output_top_logprobs[{j}]"), token: logprob})

    dists = []
    for t in range(len(prompt) - 1):
        # SGLang's entry t + 1 scores prompt token t + 1 from tokens <= t: the distribution after position t
        logprob, reported = _entry(in_tokens[t + 1], f"input_token_logprobs[{t + 1}]")
        if not _same_token(reported, prompt[t + 1], vocab_size):
            raise ValueError(f"input_token_logprobs[{t + 1}] is for token {reported}, the prompt has {prompt[t + 1]} "
                             f"there: the logprobs are misaligned with the prompt")
        if logprob is None:
            raise ValueError(f"input_token_logprobs[{t + 1}] has no value")
        dists.append({**top_dist(in_top[t + 1], f"input_top_logprobs[{t + 1}]"), prompt[t + 1]: logprob})
    dists.append(dict(gen_dists[0]))  # after the last prompt token: the first generation step
    return sequence(prompt, dists, generated, gen_dists)


def sampled_logprobs(output_ids: Sequence[int] | None, meta: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(generated ids, logprob SGLang reports for each) from a sampled request's meta_info."""
    out_tokens = meta.get("output_token_logprobs")
    if out_tokens is None:
        raise ValueError("SGLang meta_info lacks output_token_logprobs (return_logprob=True is needed)")
    pairs = [_entry(item, f"output_token_logprobs[{j}]") for j, item in enumerate(out_tokens)]
    generated = [token for _, token in pairs]
    if output_ids is not None and list(map(int, output_ids)) != generated:
        raise ValueError(f"output_ids {list(output_ids)} disagree with output_token_logprobs' tokens {generated}")
    if any(lp is None for lp, _ in pairs):
        raise ValueError("a sampled token has no logprob in output_token_logprobs")
    return generated, [lp for lp, _ in pairs]


def output_ids_of(result: dict[str, Any]) -> list[int] | None:
    """Generated ids of one result: "output_ids" with skip_tokenizer_init (older releases: "token_ids")."""
    for key in ("output_ids", "token_ids"):
        if result.get(key) is not None:
            return [int(t) for t in result[key]]
    return None


# ----------------------------------------------------------------------------- pure: logprob mode, engine args


def logprob_env(mode: str) -> dict[str, str]:
    """Environment that makes SGLang's sampler return `mode` ("processed"/"raw") logprobs for sampled tokens."""
    if mode not in ("processed", "raw"):
        raise ValueError(f"unknown engine_logprobs mode {mode!r}")
    value = "1" if mode == "raw" else "0"
    return {name: value for name in LOGPROB_SWITCHES}


def mode_in_effect(sampler_module) -> str:
    """The sampled-token logprob mode a loaded sglang.srt.layers.sampler uses."""
    for name in LOGPROB_SWITCHES:
        if hasattr(sampler_module, name):
            return "raw" if getattr(sampler_module, name) else "processed"
    raise RuntimeError("this SGLang release has no SGLANG_RETURN_ORIGINAL_LOGPROB/RETURN_ORIGINAL_LOGPROB switch in "
                       "sglang.srt.layers.sampler; the harness cannot tell (or choose) which logprobs it returns")


def engine_kwargs(directory: str, dtype: str, seed: int, mem_fraction: float,
                  attention_backend: str | None) -> dict[str, Any]:
    """Arguments of sglang.Engine (ServerArgs fields) for one tiny checkpoint."""
    kwargs = {
        "model_path": directory, "dtype": dtype, "skip_tokenizer_init": True, "random_seed": seed,
        "mem_fraction_static": mem_fraction,  # other engines (and SGLang's second dtype worker) share the GPU
        "disable_radix_cache": True,  # a cached prefix would skip its prompt logprobs and outlive weight changes
        "disable_cuda_graph": True,  # a few tiny requests: capture costs more than it saves
        "log_level": "error",
    }
    # fp32 checks wiring at tight tolerances: FlashInfer/FA3 kernels do not take fp32, torch's SDPA does exactly
    backend = attention_backend or ("torch_native" if dtype == "float32" else None)
    if backend:
        kwargs["attention_backend"] = backend
    return kwargs


def greedy_params(max_new_tokens: int) -> dict[str, Any]:
    # temperature 0 becomes top_k=1 in SGLang's SamplingParams: the all-greedy path, raw log_softmax logprobs
    return {"temperature": 0.0, "max_new_tokens": int(max_new_tokens), "ignore_eos": True}


def sample_params(max_new_tokens: int, temperature: float, seed: int | None) -> dict[str, Any]:
    params = {"temperature": float(temperature), "top_p": 1.0, "top_k": -1, "min_p": 0.0,
              "max_new_tokens": int(max_new_tokens), "ignore_eos": True}
    if seed is not None:
        params["sampling_seed"] = int(seed)
    return params


def expand_cells(cells: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One request per sample: a cell {"cell", "prompt", "n", "max_new_tokens"} becomes n requests."""
    return [{"cell": cell["cell"], "prompt": [int(t) for t in cell["prompt"]],
             "max_new_tokens": int(cell["max_new_tokens"])}
            for cell in cells for _ in range(int(cell.get("n", 1)))]


def cells_from_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, n: int) -> list[dict[str, Any]]:
    name = f"n{max_new_tokens}-b{len(prompts)}"
    return [{"cell": name, "prompt": list(p), "n": n, "max_new_tokens": max_new_tokens} for p in prompts]


# ----------------------------------------------------------------------------- pure: registration


def registration_problems(architectures: Sequence[str], resolved_arch: str | None, resolved_class: str | None,
                          error: str | None, plugin_classes: dict[str, str]) -> list[str]:
    """What is wrong with how SGLang resolves the checkpoint's architectures (empty when nothing is).

    plugin_classes: architecture name -> "module.Class" of every EntryClass the spec's
    engines.sglang.plugins export."""
    problems = []
    if not architectures:
        return ["config.json names no architectures: SGLang resolves its model class from them"]
    if error is not None:
        problems.append(f"SGLang cannot resolve {list(architectures)}: {error}")
    elif resolved_arch == FALLBACK_ARCH and FALLBACK_ARCH not in architectures:
        problems.append(f"{architectures[0]} has no SGLang model class: it would run through SGLang's generic "
                        f"{FALLBACK_ARCH} fallback (export a class named {architectures[0]} as EntryClass in a "
                        f"module listed under engines.sglang.plugins)")
    if plugin_classes:
        wanted = [a for a in architectures if a in plugin_classes]
        if not wanted:
            problems.append(f"engines.sglang.plugins export {sorted(plugin_classes)}, none named like config.json's "
                            f"architectures {list(architectures)}: SGLang keys model classes by class name")
        elif error is None and resolved_arch in plugin_classes and resolved_class != plugin_classes[resolved_arch]:
            problems.append(f"SGLang resolved {resolved_arch} to {resolved_class}, not the plugin's "
                            f"{plugin_classes[resolved_arch]}: the out-of-tree registration did not take effect")
    return problems


def class_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def entry_classes_of(module) -> list[type]:
    """A module's EntryClass (class or list), or for a package those of its modules, as SGLang collects them."""
    if hasattr(module, "EntryClass"):
        entry = module.EntryClass
        return list(entry) if isinstance(entry, (list, tuple)) else [entry]
    found: list[type] = []
    for info in pkgutil.iter_modules(getattr(module, "__path__", []) or [], module.__name__ + "."):
        if not info.ispkg:
            found.extend(entry_classes_of(importlib.import_module(info.name)))
    return found


# ----------------------------------------------------------------------------- the generated external package


def plugin_entry_classes(spec_path: str, index: int) -> list[type]:
    """EntryClass of engines.sglang.plugins[index]: what a generated package module re-exports to SGLang.

    Imported through harness.spec_plugins, so the worker and SGLang's registry share one module object."""
    from ..spec import load_spec
    from ..spec_plugins import import_plugin

    spec = load_spec(spec_path)
    entry = spec.engines.sglang.plugins[index]
    return entry_classes_of(import_plugin(spec, index, entry, "engines.sglang.plugins"))


def package_entry_classes(package: str) -> list[type]:
    return entry_classes_of(importlib.import_module(package))


def write_external_package(root: Path, spec_path: str, count: int, user_package: str | None) -> str:
    """A package under `root` with one module per plugin re-exporting its EntryClass; returns its name."""
    digest = hashlib.sha1(f"{spec_path}:{count}:{user_package}".encode()).hexdigest()[:10]
    name = f"harness_sglang_models_{digest}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text('"""Generated by the certification harness: engines.sglang.plugins '
                                        'exposed to SGLANG_EXTERNAL_MODEL_PACKAGE."""\n')
    for index in range(count):
        (folder / f"plugin_{index}.py").write_text(
            "from harness.backends.sglang import plugin_entry_classes\n\n"
            f"EntryClass = plugin_entry_classes({spec_path!r}, {index})\n")
    if user_package:  # a package the user already pointed SGLANG_EXTERNAL_MODEL_PACKAGE at stays registered
        (folder / "user_package.py").write_text(
            "from harness.backends.sglang import package_entry_classes\n\n"
            f"EntryClass = package_entry_classes({user_package!r})\n")
    return name


# ----------------------------------------------------------------------------- the backend


class SGLangBackend(Backend):
    name = "sglang"
    suites = ("registration", "logits", "rollout")
    packages = ("sglang",)
    probe_module = "sglang"
    needs_gpu = True
    worker_per_dtype = True

    def start(self, spec_path: str | None, device: str = "cpu") -> dict[str, Any]:
        # Everything SGLang reads from the environment is set before anything (a spec plugin included) imports it.
        self._package_dir: Path | None = None
        self._external_package: str | None = None
        spec = None
        if spec_path:
            from ..spec import load_spec

            spec = load_spec(spec_path)
        mode = spec.rollout.engine_logprobs if spec else "processed"
        os.environ.update(logprob_env(mode))
        if spec is not None and spec.engines.sglang.plugins:
            self._package_dir = Path(tempfile.mkdtemp(prefix="harness-sglang-"))
            user_package = os.environ.get(EXTERNAL_PACKAGE_ENV) or None
            self._external_package = write_external_package(self._package_dir, str(spec.source),
                                                            len(spec.engines.sglang.plugins), user_package)
            sys.path.insert(0, str(self._package_dir))
            # SGLang's scheduler runs in a spawned process: it finds the package through PYTHONPATH
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self._package_dir),
                                                                     os.environ.get("PYTHONPATH")]))
            os.environ[EXTERNAL_PACKAGE_ENV] = self._external_package
        return super().start(spec_path, device)

    def setup(self) -> None:
        self._engine_obj = None
        self._key: tuple[str, str] | None = None

    # ---- the engine ----
    def _engine(self, directory: str, dtype: str):
        if self._key != (directory, dtype):
            self._shutdown()
            import sglang

            seed = self.spec.rollout.seed if self.spec else 0
            mem_fraction = float(os.environ.get("HARNESS_SGLANG_MEM_FRACTION", "0.25"))
            backend = os.environ.get("HARNESS_SGLANG_ATTENTION_BACKEND") or None
            self._engine_obj = sglang.Engine(**engine_kwargs(directory, dtype, seed, mem_fraction, backend))
            self._key = (directory, dtype)
        return self._engine_obj

    def _shutdown(self) -> None:
        if self._engine_obj is not None:
            self._engine_obj.shutdown()
            self._engine_obj, self._key = None, None
            gc.collect()

    def stop(self) -> None:
        if getattr(self, "_engine_obj", None) is not None:
            self._shutdown()
        if getattr(self, "_package_dir", None) is not None:
            shutil.rmtree(self._package_dir, ignore_errors=True)

    def _plugin_classes(self) -> dict[str, str]:
        if self.spec is None or not self.spec.engines.sglang.plugins:
            return {}
        from ..spec_plugins import import_engine_plugins

        classes = [cls for module in import_engine_plugins(self.spec, self.name) for cls in entry_classes_of(module)]
        return {cls.__name__: class_path(cls) for cls in classes}

    # ---- operations ----
    def op_registration(self, dir: str, dtype: str | None = None) -> dict[str, Any]:  # noqa: A002 - wire name
        """Resolve config.json's architectures through SGLang's ModelRegistry, as its model loader does."""
        from sglang.srt.models import registry

        architectures = list(json.loads((Path(dir) / "config.json").read_text()).get("architectures") or [])
        resolved_class = resolved_arch = error = None
        if architectures:
            try:
                cls, resolved_arch = registry.ModelRegistry.resolve_model_cls(architectures)
                resolved_class = class_path(cls)
            except ValueError as exc:
                error = " ".join(str(exc).split())[:400]
        try:
            builtin = registry.import_model_classes("sglang.srt.models")
        except TypeError:  # releases before external packages: no package argument
            builtin = registry.import_model_classes()
        arch = architectures[0] if architectures else None
        builtin_class = class_path(builtin[arch]) if arch in builtin else None
        plugin_classes = self._plugin_classes()
        source = None
        if resolved_class is not None:
            source = ("out-of-tree" if resolved_class in plugin_classes.values()
                      else "fallback" if resolved_arch == FALLBACK_ARCH and arch != FALLBACK_ARCH else "builtin")
        return {"architecture": arch, "architectures": architectures, "resolved_class": resolved_class,
                "resolved_architecture": resolved_arch, "builtin_class": builtin_class, "source": source,
                "plugin_classes": plugin_classes, "external_package": os.environ.get(EXTERNAL_PACKAGE_ENV),
                "problems": registration_problems(architectures, resolved_arch, resolved_class, error, plugin_classes)}

    def op_logprobs(self, dir: str, dtype: str, prompts: dict[str, list[list[int]]], top_k: int,  # noqa: A002
                    max_new_tokens: int, out_path: str) -> dict[str, Any]:
        """Engine record: prompt logprobs at every position plus a greedy continuation, top-K each step."""
        from .. import engine_record

        if max_new_tokens < 1:
            raise ValueError("the engine record needs max_new_tokens >= 1 (dists[-1] is the first generation step)")
        engine = self._engine(dir, dtype)
        vocab_size = json.loads((Path(dir) / "config.json").read_text()).get("vocab_size")
        flat = [(name, list(seq)) for name, seqs in prompts.items() for seq in seqs]
        results = engine.generate(input_ids=[seq for _, seq in flat],
                                  sampling_params=[greedy_params(max_new_tokens) for _ in flat],
                                  return_logprob=True, logprob_start_len=0, top_logprobs_num=int(top_k))
        results = [results] if isinstance(results, dict) else list(results)
        if len(results) != len(flat):
            raise RuntimeError(f"SGLang answered {len(results)} results for {len(flat)} prompts")
        sets: dict[str, list] = {name: [] for name in prompts}
        for (name, seq), result in zip(flat, results):
            sets[name].append(sequence_from_meta(seq, output_ids_of(result), result["meta_info"], vocab_size))
        return {"path": engine_record.save(out_path, {"top_k": int(top_k), "sets": sets})}

    def op_sample(self, dir: str, dtype: str, cells: list[dict[str, Any]] | None = None,  # noqa: A002
                  temperature: float = 1.0, seed: int = 0, out_path: str = "",
                  prompts: list[list[int]] | None = None, max_new_tokens: int | None = None,
                  n: int = 1) -> dict[str, Any]:
        """Sampled continuations with the logprobs the RL stack reads from SGLang (samples file).

        `cells` [{"cell", "prompt", "n", "max_new_tokens"}] as the rollout suite sends them; or one cell's worth
        as prompts/max_new_tokens/n. Each sample is its own request with its own sampling_seed (seed + i)."""
        from sglang.srt.layers import sampler

        from .. import engine_record

        if cells is None:
            if prompts is None or max_new_tokens is None:
                raise ValueError("sample needs cells, or prompts and max_new_tokens")
            cells = cells_from_prompts(prompts, max_new_tokens, n)
        engine = self._engine(dir, dtype)
        mode = mode_in_effect(sampler)
        requests = expand_cells(cells)
        seeded = _takes_sampling_seed()
        params = [sample_params(r["max_new_tokens"], temperature, seed + i if seeded else None)
                  for i, r in enumerate(requests)]
        results = engine.generate(input_ids=[r["prompt"] for r in requests], sampling_params=params,
                                  return_logprob=True)
        results = [results] if isinstance(results, dict) else list(results)
        if len(results) != len(requests):
            raise RuntimeError(f"SGLang answered {len(results)} results for {len(requests)} requests")
        samples = []
        for request, result in zip(requests, results):
            generated, logprobs = sampled_logprobs(output_ids_of(result), result["meta_info"])
            samples.append({"cell": request["cell"], "prompt": request["prompt"], "generated": generated,
                            "logprobs": logprobs})
        requested = self.spec.rollout.engine_logprobs if self.spec else "processed"
        payload = {"temperature": temperature, "logprobs_mode": mode, "samples": samples}
        if mode != requested:
            payload["requested_logprobs_mode"] = requested
        return {"path": engine_record.save(out_path, payload)}


def _takes_sampling_seed() -> bool:
    """Whether this SGLang's SamplingParams has a per-request sampling_seed (newer releases)."""
    import inspect

    from sglang.srt.sampling.sampling_params import SamplingParams

    fields = getattr(SamplingParams, "__struct_fields__", None)  # msgspec.Struct in newer releases
    if fields is not None:
        return "sampling_seed" in fields
    return "sampling_seed" in inspect.signature(SamplingParams.__init__).parameters


BACKEND = SGLangBackend
