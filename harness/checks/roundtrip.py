"""Round trip HF -> Megatron-core -> HF: bit-exact, every tensor consumed once, names/shapes Megatron expects."""
from __future__ import annotations

from typing import Any

import torch

from ..convert.layer_spec import to_local
from ..convert.mca_config import McaConfigView
from ..convert.template import Template
from ..verdict import Verdict, from_problems


def tensor_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[list[str], float]:
    """Problems that make two tensors differ (shape, dtype, bytes) and their max |a-b|."""
    problems = []
    if tuple(a.shape) != tuple(b.shape):
        return [f"shape {tuple(a.shape)} != {tuple(b.shape)}"], float("inf")
    if a.dtype != b.dtype:
        problems.append(f"dtype {a.dtype} != {b.dtype}")
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    same_bytes = a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    if not same_bytes and not problems:
        problems.append(f"bytes differ (max |a-b| = {diff:.3g})")
    return problems, diff


def compare_state_dicts(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> dict[str, Any]:
    per_tensor: dict[str, str] = {}
    max_diff = 0.0
    for name in sorted(set(expected) - set(actual)):
        per_tensor[name] = "missing after the round trip"
    for name in sorted(set(actual) - set(expected)):
        per_tensor[name] = "appeared in the round trip"
    for name in sorted(set(expected) & set(actual)):
        problems, diff = tensor_diff(expected[name], actual[name])
        max_diff = max(max_diff, diff)
        if problems:
            per_tensor[name] = "; ".join(problems)
    return {"tensors": len(expected), "max_abs_diff": max_diff, "differences": per_tensor}


def measure_roundtrip(hf_state: dict[str, torch.Tensor], template: Template, view: McaConfigView) -> dict[str, Any]:
    mca_state, forward = template.hf_to_mca(hf_state, view)
    back_state, backward = template.mca_to_hf(mca_state, view)
    # Tensors the template deliberately drops (hf_invalid_keys) are not expected back.
    kept = {n: t for n, t in hf_state.items() if n not in set(forward.dropped)}
    return {
        "forward": forward.as_dict(),
        "backward": backward.as_dict(),
        "forward_problems": forward.problems(),
        "backward_problems": backward.problems(),
        "comparison": compare_state_dicts(kept, back_state),
        "mca_shapes": {name: list(t.shape) for name, t in mca_state.items()},
        "mca_dtypes": sorted({str(t.dtype) for t in mca_state.values()}),
    }


def judge_bit_exact(m: dict[str, Any], tolerance: dict[str, float]) -> Verdict:
    cmp = m["comparison"]
    problems = [f"{name}: {why}" for name, why in cmp["differences"].items()]
    if cmp["max_abs_diff"] > tolerance["roundtrip_max_abs_diff"] and not problems:
        problems.append(f"max |a-b| {cmp['max_abs_diff']:.3g} > {tolerance['roundtrip_max_abs_diff']}")
    metrics = {"tensors": cmp["tensors"], "max_abs_diff": cmp["max_abs_diff"],
               "differing_tensors": len(cmp["differences"])}
    return from_problems(problems, metrics, tolerance, what="tensors not bit-exact after HF->Megatron->HF")


def judge_consumption(m: dict[str, Any]) -> Verdict:
    problems = [f"HF->Megatron {p}" for p in m["forward_problems"]]
    problems += [f"Megatron->HF {p}" for p in m["backward_problems"]]
    metrics = {"forward": m["forward"], "backward": m["backward"]}
    return from_problems(problems, metrics, {"unconsumed": 0, "multiply_consumed": 0}, what="tensors not consumed once")


def judge_names_shapes(produced: dict[str, list[int]], expected: dict[str, list[int]]) -> Verdict:
    """Compare the template's Megatron names (TE or local spelling) with what GPTModel (local spec) holds."""
    local = {to_local(name): shape for name, shape in produced.items()}
    problems = [f"{n}: megatron-core expects this tensor, the template never produces it"
                for n in sorted(set(expected) - set(local))]
    problems += [f"{n}: produced by the template, megatron-core has no such parameter"
                 for n in sorted(set(local) - set(expected))]
    problems += [f"{n}: shape {local[n]} but megatron-core expects {expected[n]}"
                 for n in sorted(set(local) & set(expected)) if list(local[n]) != list(expected[n])]
    metrics = {"expected": len(expected), "produced": len(local)}
    return from_problems(problems, metrics, {"mismatches": 0}, what="name/shape mismatches")
