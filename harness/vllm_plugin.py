"""vLLM general plugin (entry point group `vllm.general_plugins`): registers a spec's out-of-tree model
classes in every process vLLM starts, which is how vLLM documents registration for multi-process engines.

The vLLM worker exports HARNESS_SPEC_PATH; vLLM calls `register()` in each engine process it spawns (and
in-process too, where importing the plugins a second time is a no-op).
"""
from __future__ import annotations

import os


def register() -> None:
    path = os.environ.get("HARNESS_SPEC_PATH")
    if not path:
        return
    from harness.spec import load_spec
    from harness.spec_plugins import import_engine_plugins

    import_engine_plugins(load_spec(path), "vllm")
