"""Helpers ROLL's templates call, with ROLL's semantics (mcore_adapter/utils.py)."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def is_megatron_llama() -> bool:
    """Whether megatron-llama-core (not megatron-core) is installed; ROLL's qwen3 template then spells the
    norms with local-spec names instead of TE ones. Both spellings reach the same local-spec parameters here."""
    from importlib.metadata import distributions

    return any(dist.metadata.get("Name") == "megatron-llama-core" for dist in distributions())
