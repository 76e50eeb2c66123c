"""Import the plugin modules a spec names (templates, HF model classes), with one-line errors."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
from types import ModuleType
from typing import Any, Callable

from .errors import SpecError
from .spec import Spec

DEFAULT_PLUGIN_IMPORT_TIMEOUT_S = 60.0


def _is_file(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry


class _StdoutWatch:
    """Stands in for sys.stdout while a plugin imports: keeps what is written (it is reported, not shown).

    A library may keep a reference to it (a logging handler made at import): afterwards it forwards."""

    def __init__(self, stream):
        self._stream, self.written = stream, []

    def write(self, text):
        if self.written is None:
            return self._stream.write(text)
        self.written.append(text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _inside_an_import() -> bool:
    """True when called while a module is being imported (an import hook, a plugin importing one):
    a helper thread would then wait for import locks this thread holds."""
    frame = sys._getframe(2)  # noqa: SLF001 - cheap stack walk, no traceback objects
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _guarded(spec: Any, key: str, entry: str, load: Callable[[], ModuleType]) -> ModuleType:
    """Run one plugin import so that it can only fail as a one-line SpecError.

    It runs in a daemon thread joined with plugin_import_timeout_s (a hang must not hang pytest or a
    worker); SystemExit and every other exception are caught (KeyboardInterrupt is the user's and goes
    through); output to stdout, by print or to fd 1, is refused: a worker's stdout carries its replies."""
    timeout = float(getattr(spec, "plugin_import_timeout_s", DEFAULT_PLUGIN_IMPORT_TIMEOUT_S))
    box: dict[str, Any] = {}

    def target():
        try:
            box["module"] = load()
        except BaseException as exc:  # noqa: BLE001 - SystemExit included
            box["error"] = exc

    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    capture = tempfile.TemporaryFile()
    try:
        saved_fd = os.dup(1)
        os.dup2(capture.fileno(), 1)
    except OSError:  # no fd 1 to watch
        saved_fd = None
    real_stdout = sys.stdout
    watch = _StdoutWatch(real_stdout) if real_stdout is not None else None
    if watch is not None:
        sys.stdout = watch
    try:
        if _inside_an_import():
            target()
        else:
            thread = threading.Thread(target=target, name=f"harness-plugin-import {entry}", daemon=True)
            thread.start()
            thread.join(timeout)
            if thread.is_alive():
                box["timeout"] = True
    finally:
        written = ""
        if watch is not None:
            if sys.stdout is watch:
                sys.stdout = real_stdout
            written, watch.written = "".join(watch.written), None
        if saved_fd is not None:
            try:
                sys.__stdout__.flush()
            except (AttributeError, OSError, ValueError):
                pass
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
        capture.seek(0)
        written += capture.read(4096).decode(errors="replace")
        capture.close()
    if box.get("timeout"):
        raise SpecError(spec.source, key, f"plugin {entry!r} did not finish importing within {timeout:g} s "
                                          f"(plugin_import_timeout_s)")
    error = box.get("error")
    if isinstance(error, KeyboardInterrupt):
        raise error
    if isinstance(error, SystemExit):
        raise SpecError(spec.source, key, f"plugin {entry!r} called sys.exit({error.code!r}) at import "
                                          f"(a plugin must not end the process)") from None
    if isinstance(error, ModuleNotFoundError) and not _is_file(entry) and error.name and entry.startswith(error.name):
        raise SpecError(spec.source, key, f"no module named {entry!r}") from None
    if error is not None:
        raise SpecError(spec.source, key, f"plugin {entry!r} raised {type(error).__name__}: {error}") from None
    if written.strip():
        shown = " ".join(written.split())
        raise SpecError(spec.source, key, f"plugin {entry!r} wrote to stdout at import "
                                          f"({shown[:80]!r}{'...' if len(shown) > 80 else ''}); a worker's stdout "
                                          f"carries its replies: use logging or sys.stderr")
    return box["module"]


def import_plugin(spec: Spec, index: int, entry: str, field: str = "plugins") -> ModuleType:
    key = f"{field}[{index}]"
    if _is_file(entry):
        path = spec.resolve_relative(entry)
        if not path.is_file():
            raise SpecError(spec.source, key, f"plugin file {entry!r} does not exist (looked for {path})")
        module_name = f"_harness_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if module_name in sys.modules:
            return sys.modules[module_name]

        def load() -> ModuleType:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
            return module

        try:
            return _guarded(spec, key, entry, load)
        except SpecError:
            sys.modules.pop(module_name, None)  # a timed-out import left its half-made module behind
            raise
    if entry in sys.modules:  # imported already (a worker imports the spec's plugins again)
        return sys.modules[entry]
    return _guarded(spec, key, entry, lambda: importlib.import_module(entry))


def import_spec_plugins(spec: Spec) -> list[ModuleType]:
    return [import_plugin(spec, i, entry) for i, entry in enumerate(spec.plugins)]


def import_engine_plugins(spec: Spec, engine: str) -> list[ModuleType]:
    """An engine's own plugins (engines.<engine>.plugins), imported only inside that engine's worker."""
    options = getattr(spec.engines, engine, None)
    if options is None:
        return []
    return [import_plugin(spec, i, entry, f"engines.{engine}.plugins") for i, entry in enumerate(options.plugins)]


def resolve_template(spec: Spec):
    """The template the spec names; a built-in one (harness.templates.<name>) is imported on demand."""
    from .convert import templates

    name = spec.template_name
    if name not in templates:
        try:
            importlib.import_module(f"harness.templates.{name}")
        except ModuleNotFoundError:
            pass
    if name not in templates:
        known = ", ".join(sorted(templates)) or "none"
        key = "converter.template" if spec.converter.template else "hf_model_type"
        raise SpecError(spec.source, key, f"no converter template {name!r} registered (known: {known}); "
                                          f"register one with register_template in a plugin")
    return templates[name]


def _check_shapes(spec: Spec, hf_config) -> None:
    """Head and layer counts the reference model and the spec's parallel layouts must agree on."""
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    layers = getattr(hf_config, "num_hidden_layers", None)
    where = "reference.path" if spec.reference.path is not None else "reference.config.num_key_value_heads"
    source = "config.json: " if spec.reference.path is not None else ""
    if not all(isinstance(n, int) and n > 0 for n in (heads, kv_heads)):
        return
    if heads % kv_heads:
        raise SpecError(spec.source, where, f"{source}num_key_value_heads {kv_heads} does not divide "
                                            f"num_attention_heads {heads} (each KV head serves a whole group of "
                                            f"query heads)")
    from .plan import build_plan

    # layouts are judged only where the plan uses them (plan.PER_LAYOUT: megatron's checks, vLLM's refit)
    if not any(check.layout for check in build_plan(spec)):
        return
    for i, layout in enumerate(spec.parallel):
        if heads % layout.tp:
            raise SpecError(spec.source, f"parallel[{i}].tp", f"tp {layout.tp} does not divide num_attention_heads "
                                                              f"{heads} (each TP rank holds heads / tp query heads)")
        if kv_heads % layout.tp:
            raise SpecError(spec.source, f"parallel[{i}].tp",
                            f"tp {layout.tp} does not divide num_key_value_heads {kv_heads}: each TP rank holds "
                            f"whole KV groups (num_query_groups % tp == 0; linear_qkv is sharded per group and KV "
                            f"heads are not replicated)")
        if isinstance(layers, int) and layout.pp > layers:
            raise SpecError(spec.source, f"parallel[{i}].pp", f"pp {layout.pp} > num_hidden_layers {layers}: a "
                                                              f"pipeline stage would hold no layer")
        if isinstance(layers, int) and layers % layout.pp:
            raise SpecError(spec.source, f"parallel[{i}].pp",
                            f"pp {layout.pp} does not divide num_hidden_layers {layers}: megatron-core 0.16 splits "
                            f"layers evenly over stages unless num_layers_in_first/last_pipeline_stage is set, "
                            f"which the harness does not set (get_num_layers_to_build asserts num_layers % pp == 0)")


def validate_environment(spec: Spec) -> None:
    """Checks that need the plugins imported: model type, config overrides, template, reference path."""
    import_spec_plugins(spec)
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec.hf_model_type not in CONFIG_MAPPING:
        raise SpecError(spec.source, "hf_model_type",
                        f"transformers knows no model type {spec.hf_model_type!r} (register it in a plugin "
                        f"with AutoConfig.register)")
    default = AutoConfig.for_model(spec.hf_model_type)
    import inspect

    init_params = set(inspect.signature(type(default).__init__).parameters) - {"self", "kwargs"}
    known_keys = set(default.to_dict()) | set(dir(default)) | init_params | set(getattr(default, "attribute_map", {}))
    if "rope_parameters" in known_keys:  # transformers 5 folds these legacy kwargs into rope_parameters
        known_keys |= {"rope_theta", "rope_scaling", "partial_rotary_factor"}
    for key in spec.reference.config:
        if key not in known_keys:
            raise SpecError(spec.source, f"reference.config.{key}",
                            f"not a {spec.hf_model_type} config key (a typo would be silently ignored by transformers)")
    try:
        hf_config = AutoConfig.for_model(spec.hf_model_type, **spec.reference.config)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(spec.source, "reference.config", f"{type(exc).__name__}: {exc}") from None
    if spec.reference.path is not None:
        path = spec.resolve_relative(spec.reference.path)
        if not path.is_dir():
            raise SpecError(spec.source, "reference.path", f"{path} does not exist or is not a directory")
        if not (path / "config.json").is_file():
            raise SpecError(spec.source, "reference.path", f"{path} has no config.json")
        from .convert.stream import INDEX_FILE, ConvertError, hf_weight_files

        if not (path / INDEX_FILE).is_file():
            weights = sorted(path.glob("*.safetensors"))
            if not weights:
                raise SpecError(spec.source, "reference.path", f"{path} has no *.safetensors weights")
            from safetensors import safe_open

            for weight in weights:  # reads only the header: cheap even for a large checkpoint
                try:
                    with safe_open(str(weight), framework="pt"):
                        pass
                except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
                    raise SpecError(spec.source, "reference.path",
                                    f"{weight} is not a valid safetensors file: {exc}") from None
        try:  # sharded: every shard the index's weight_map names exists and is valid (headers only)
            hf_weight_files(path)
        except ConvertError as exc:
            raise SpecError(spec.source, "reference.path", exc.one_line()) from None
        try:  # the checkpoint's own config is the reference then; reference.config is not used
            hf_config = type(default).from_dict(json.loads((path / "config.json").read_text()))
        except Exception as exc:  # noqa: BLE001 - bad JSON, a value the config class rejects
            raise SpecError(spec.source, "reference.path", f"{path / 'config.json'}: {type(exc).__name__}: {exc}") \
                from None
    _check_shapes(spec, hf_config)
    for engine, options in spec.engines:  # imported only in that engine's worker: check the files exist now
        for i, entry in enumerate(options.plugins):
            path = spec.resolve_relative(entry)
            if _is_file(entry) and not path.is_file():
                raise SpecError(spec.source, f"engines.{engine}.plugins[{i}]",
                                f"plugin file {entry!r} does not exist (looked for {path})")
    module_map = spec.engines.lmdeploy.custom_module_map
    if module_map is not None and not spec.resolve_relative(module_map).is_file():
        raise SpecError(spec.source, "engines.lmdeploy.custom_module_map",
                        f"file {str(module_map)!r} does not exist (looked for {spec.resolve_relative(module_map)})")
    from .calibration import load as load_calibration

    load_calibration(spec)  # the calibration file the certificate will cite: present, JSON, this model's
    if "megatron" in spec.backends.train or spec.converter.template:
        resolve_template(spec)
