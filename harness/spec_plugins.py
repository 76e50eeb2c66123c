"""Import the plugin modules a spec names (templates, HF model classes), with one-line errors."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from types import ModuleType

from .errors import SpecError
from .spec import Spec


def _is_file(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def import_plugin(spec: Spec, index: int, entry: str, field: str = "plugins") -> ModuleType:
    key = f"{field}[{index}]"
    if _is_file(entry):
        path = spec.resolve_relative(entry)
        if not path.is_file():
            raise SpecError(spec.source, key, f"plugin file {entry!r} does not exist (looked for {path})")
        module_name = f"_harness_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any plugin failure becomes a one-line spec error
            del sys.modules[module_name]
            raise SpecError(spec.source, key, f"plugin {entry!r} raised {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(entry)
    except ModuleNotFoundError as exc:
        if exc.name and entry.startswith(exc.name):
            raise SpecError(spec.source, key, f"no module named {entry!r}") from None
        raise SpecError(spec.source, key, f"plugin {entry!r} raised ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise SpecError(spec.source, key, f"plugin {entry!r} raised {type(exc).__name__}: {exc}") from None


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
        AutoConfig.for_model(spec.hf_model_type, **spec.reference.config)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(spec.source, "reference.config", f"{type(exc).__name__}: {exc}") from None
    if spec.reference.path is not None:
        path = spec.resolve_relative(spec.reference.path)
        if not path.is_dir():
            raise SpecError(spec.source, "reference.path", f"{path} does not exist or is not a directory")
        if not (path / "config.json").is_file():
            raise SpecError(spec.source, "reference.path", f"{path} has no config.json")
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
    if "megatron" in spec.backends.train or spec.converter.template:
        resolve_template(spec)
