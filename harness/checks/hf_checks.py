"""HF loading checks (what ROLL's deepspeed_train / hf_infer strategies rely on)."""
from __future__ import annotations

from typing import Any

from ..verdict import Verdict, from_problems


def judge_load(m: dict[str, Any]) -> Verdict:
    problems = []
    if not m["is_pretrained_model"]:
        problems.append(f"{m['class']} is not a transformers.PreTrainedModel")
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if m[kind]:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(m[kind][:5])}")
    metrics = {k: m[k] for k in ("class", "parameters", "dtypes", "tied_embeddings")}
    return from_problems(problems, metrics, {"missing_keys": 0, "unexpected_keys": 0}, what="loading problems")


def judge_save_load(m: dict[str, Any], tolerance: dict[str, float]) -> Verdict:
    cmp = m["comparison"]
    problems = [f"{name}: {why}" for name, why in cmp["differences"].items()]
    problems += [f"config key {k} changed" for k in m["config_keys_changed"]]
    metrics = {"tensors": cmp["tensors"], "max_abs_diff": cmp["max_abs_diff"]}
    return from_problems(problems, metrics, tolerance, what="differences after save->load")
