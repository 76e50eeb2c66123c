"""Backend registry: one module per backend, each implementing harness.backends.base.Backend."""
from __future__ import annotations

import importlib

from .base import Backend, package_versions

# backend name -> module path; a backend missing here is planned but reported not_run
MODULES = {
    "hf": "harness.backends.hf",
    "megatron": "harness.backends.megatron",
    "deepspeed": "harness.backends.deepspeed",
    "sglang": "harness.backends.sglang",
    "vllm": "harness.backends.vllm",
    "lmdeploy": "harness.backends.lmdeploy",
}
ALL_BACKENDS = ("hf", "vllm", "sglang", "lmdeploy", "megatron", "deepspeed")


def backend_class(name: str) -> type[Backend] | None:
    """Registered name, or "package.module:Class" for a backend that lives outside the harness."""
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    module = MODULES.get(name)
    if module is None:
        return None
    return importlib.import_module(module).BACKEND


def load_backend(name: str) -> Backend:
    cls = backend_class(name)
    if cls is None:
        raise KeyError(f"no backend module for {name!r}")
    return cls()


__all__ = ["ALL_BACKENDS", "Backend", "MODULES", "backend_class", "load_backend", "package_versions"]
