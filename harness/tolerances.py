"""The one tolerance model: every bound a check is judged by, with where it came from.

A bound is a record {value, metric, upper, source, ...}; `source` is
  default     the harness's table below (conversion checks are exact by construction: 0),
  calibrated  derived from measured noise (`calibration`: method, noise, factor, floor), or
  spec        the spec's `tolerances:` value; `harness_value` is what the harness would have used, and
              `loosened_by_spec` says whether the spec's value is looser.
A record may also carry `evidence`: the checked-in calibration file (`python -m harness calibrate`) whose
measurement it rests on (`cite`). `resolve` builds them, `harness.verify` rebuilds them from the same
inputs, and the certificate, the HTML page and the gate read them. Judges index a Tolerance like a dict of numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16")

# metric -> (float32 default, bfloat16 default, meaning); the log-prob fp32 defaults' headroom over measured
# backend differences is in model_specs/calibration/<model>.json, cited by each record (`cite`)
DEFAULTS: dict[str, tuple[float, float, str]] = {
    "roundtrip_max_abs_diff": (0.0, 0.0, "HF -> Megatron -> HF, max |a-b| over every tensor"),
    "save_load_max_abs_diff": (0.0, 0.0, "HF save_pretrained -> from_pretrained, max |a-b|"),
    "max_abs_logprob": (1e-4, 0.25, "max |logprob_backend - logprob_hf| over tokens"),
    "mean_abs_logprob": (1e-5, 0.03, "mean |logprob_backend - logprob_hf| over tokens"),
    "min_top1_agreement": (1.0, 0.95, "fraction of decisive positions whose argmax agrees (lower bound)"),
    "min_topk_overlap": (0.99, 0.9, "mean top-5 overlap with the reference at decisive positions (lower bound)"),
    "min_greedy_equal": (1.0, 0.9, "fraction of decisive prompts whose greedy next token agrees (lower bound)"),
    "max_mean_exp_abs_logprob": (1.0001, 1.05, "NeMo-RL metric mean(exp(|dlogp|)) (upper bound)"),
    "min_greedy_sequence_equal": (1.0, 0.5, "fraction of decisive prompts whose whole greedy continuation agrees"),
    "min_closeness": (1.0, 0.9, "vLLM-style: at the first divergent greedy token each side's token is in the "
                                "other's top-5 (fraction of prompts)"),
    "max_prob_diff_mean": (1e-5, 0.005, "verl rollout_probs_diff: mean |p_engine - p_trainer| on realized tokens"),
    "max_loss_diff": (1e-5, 5e-2, "|loss_backend - loss_reference| per step"),
    "max_grad_diff": (1e-5, 5e-2, "max |grad_backend - grad_reference|"),
    "max_weight_diff": (1e-5, 5e-2, "max |updated weight backend - reference|"),
    "max_aux_loss_diff": (1e-5, 5e-2, "MoE: |load-balancing loss backend - reference| per layer at step 0, "
                                      "before the coefficient"),
    # MoE routing (harness/checks/routing.py); bf16 bounds are calibrated, the bf16 column is never used
    "min_routing_agreement": (1.0, 0.95, "fraction of tokens (bf16: decisive tokens) whose top-k expert set equals "
                                         "the reference's, per MoE layer and prompt set (lower bound)"),
    "max_router_prob_diff_mean": (1e-6, 2e-3, "mean |softmax(router logits) - reference's| over tokens and experts, "
                                              "per MoE layer and prompt set (the max is shown, not bounded)"),
}
KNOWN_METRICS = tuple(DEFAULTS)

# fp32 bounds on a quantity with a magnitude: the default is the absolute part, plus RELATIVE x the reference's
# magnitude (the scale) -- PyTorch's own float32 closeness (torch.testing.assert_close: rtol 1.3e-6, i.e. ~11
# ulps, beside atol 1e-5). A train loss is a mean of per-token -log-probs that grows with the vocabulary
# (ln V: 6 for the tiny models, 12 at Qwen2.5's 151,936) and is judged after Adam updates too: correct
# implementations differ by a few of its ulps (Qwen2.5-0.5B shape, loss after the first update 9.97:
# Megatron TP2 9.5e-6, TP1 6.7e-6, DeepSpeed ZeRO-3 3.5e-6; HF's own sdpa vs eager attention 1.2e-6)
RELATIVE = {"max_loss_diff": 1.3e-6}
RELATIVE_RULE = "torch.testing's float32 closeness: atol + rtol x the reference's largest |loss| over the steps"

# tolerance key -> (the metric it bounds, True for an upper bound); one table for every judge
BOUND_METRICS: dict[str, tuple[str, bool]] = {
    "roundtrip_max_abs_diff": ("max_abs_diff", True),
    "save_load_max_abs_diff": ("max_abs_diff", True),
    "max_abs_logprob": ("max_abs_logprob", True),
    "mean_abs_logprob": ("mean_abs_logprob", True),
    "min_top1_agreement": ("top1_agreement", False),
    "min_topk_overlap": ("topk_overlap", False),
    "min_greedy_equal": ("greedy_equal", False),
    "max_mean_exp_abs_logprob": ("mean_exp_abs_logprob", True),
    "min_greedy_sequence_equal": ("greedy_sequence_equal", False),
    "min_closeness": ("closeness", False),
    "max_prob_diff_mean": ("prob_diff_mean", True),
    "max_loss_diff": ("max_loss_diff", True),
    "max_grad_diff": ("max_grad_diff", True),
    "max_weight_diff": ("max_weight_diff", True),
    "max_aux_loss_diff": ("max_aux_loss_diff", True),
    "min_routing_agreement": ("routing_agreement", False),
    "max_router_prob_diff_mean": ("router_prob_diff_mean", True),
}

LOGIT_METRICS = ("max_abs_logprob", "mean_abs_logprob", "min_top1_agreement", "min_topk_overlap",
                 "min_greedy_equal", "max_mean_exp_abs_logprob")
ENGINE_LOGIT_METRICS = (*LOGIT_METRICS, "min_greedy_sequence_equal", "min_closeness", "max_prob_diff_mean")
ROLLOUT_METRICS = ("max_abs_logprob", "mean_abs_logprob", "max_mean_exp_abs_logprob", "max_prob_diff_mean")
TRAIN_METRICS = ("max_loss_diff", "max_grad_diff", "max_weight_diff")
ROUTING_METRICS = ("min_routing_agreement", "max_router_prob_diff_mean")
CALIBRATION_FACTOR = 2.0  # a backend may be at most this many times noisier than HF's own bf16 rounding
# Both sides bf16 (engine and trainer): each may be CALIBRATION_FACTOR x HF's noise away from the truth.
BOTH_SIDES_FACTOR = 2 * CALIBRATION_FACTOR

# (suite, backend kind) -> the bounds its rows carry; what `verify` expects to find on every judged row
ENGINES = ("vllm", "sglang", "lmdeploy")


def expected_keys(suite: str, backend: str, variant: str = "") -> tuple[str, ...] | None:
    """The tolerance keys a row of this suite must carry (None: a structural check with its own counts)."""
    if suite == "logits":
        return ENGINE_LOGIT_METRICS if backend in ENGINES else LOGIT_METRICS
    if suite == "refit":
        return LOGIT_METRICS
    if suite == "rollout":
        return ROLLOUT_METRICS
    if suite == "train":
        return TRAIN_METRICS
    if suite == "routing":
        return ROUTING_METRICS
    if suite == "roundtrip" and variant == "bit-exact":
        return ("roundtrip_max_abs_diff",)
    if suite == "hf" and variant == "save-load":
        return ("save_load_max_abs_diff",)
    return None


# bounds a suite's rows carry only for some models, each group all together: a MoE model's train step also
# judges the routing of its forwards (harness/checks/train.py REPLAY_RULE) and, where the trainer adds it,
# the load-balancing loss
AUX_METRICS = ("max_aux_loss_diff",)
OPTIONAL_KEYS = {"train": (ROUTING_METRICS, AUX_METRICS)}

PARITY_SUITES = ("logits", "refit", "rollout", "train", "routing")


def needs_calibration(suite: str, dtype: str) -> bool:
    """Parity bounds outside fp32 are calibrated on measured noise, never taken from a table."""
    return suite in PARITY_SUITES and dtype not in ("", "float32")


def calibration_factor(suite: str, key: str | None = None) -> float:
    """How many times HF's own bf16 noise a suite allows: both sides are bf16 in rollout and refit, and in
    train (the backend against HF's bf16 emulation of the same mixed-precision recipe). A routing bound is the
    routing suite's judgement wherever it is carried (a train row judges its MoE routing by the routing rules)."""
    if key in ROUTING_METRICS:
        return CALIBRATION_FACTOR
    return BOTH_SIDES_FACTOR if suite in ("rollout", "refit", "train") else CALIBRATION_FACTOR


@dataclass(frozen=True)
class Calibration:
    """Measured noise a bf16 bound is derived from: `noise` holds each metric's worst value."""

    method: str
    noise: dict[str, float]
    factor: float = CALIBRATION_FACTOR

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "noise": dict(self.noise), "factor": self.factor}


def calibrated_value(key: str, noise: float | None, factor: float) -> float:
    """A bound `factor` times the measured noise away from the ideal, never tighter than the fp32 default.

    No noise measured (an agreement rate with no decisive position to count): the fp32 default, which
    judges nothing then either, since the backend's rate has no decisive position to count."""
    floor = DEFAULTS[key][0]
    metric, upper = BOUND_METRICS[key]
    if noise is None:
        return floor
    if metric == "mean_exp_abs_logprob":  # a ratio whose ideal is 1
        return max(floor, 1 + factor * (noise - 1))
    if upper:
        return max(floor, factor * noise)
    return min(floor, 1 - factor * (1 - noise))  # an agreement rate whose ideal is 1


def looser(value: float, than: float, upper: bool) -> bool:
    return value > than if upper else value < than


class Tolerance(dict):
    """key -> effective bound value (what judges compare against); `.records` carries the provenance."""

    def __init__(self, records: dict[str, dict[str, Any]]):
        super().__init__({key: record["value"] for key, record in records.items()})
        self.records = records


def loss_scale(losses) -> float | None:
    """The magnitude a train row's relative loss bound scales with: the reference's largest |loss| over the steps
    (the judge and `verify` both derive it here, from the same reference losses)."""
    return max((abs(loss) for loss in losses or []), default=None)


def relative_part(key: str, dtype: str, scale: float | None) -> dict[str, Any] | None:
    """The record's `relative` entry where an fp32 bound scales with the reference's magnitude (RELATIVE)."""
    if dtype not in ("", "float32") or key not in RELATIVE or scale is None:
        return None
    return {"atol": DEFAULTS[key][0], "rtol": RELATIVE[key], "scale": abs(scale), "rule": RELATIVE_RULE}


def record(key: str, dtype: str, spec_tolerances: dict[str, dict[str, float]] | None = None,
           calibration: Calibration | None = None, scale: float | None = None) -> dict[str, Any]:
    """`scale`: the reference's magnitude, for an fp32 bound that has a relative part (RELATIVE)."""
    metric, upper = BOUND_METRICS.get(key, (key, not key.startswith("min_")))
    relative = relative_part(key, dtype, scale)
    if relative is not None:
        harness_value = relative["atol"] + relative["rtol"] * relative["scale"]
        out = {"value": harness_value, "metric": metric, "upper": upper, "source": "default", "relative": relative}
    elif calibration is not None and metric in calibration.noise:
        noise = calibration.noise[metric]
        harness_value = calibrated_value(key, noise, calibration.factor)
        out: dict[str, Any] = {"value": harness_value, "metric": metric, "upper": upper, "source": "calibrated",
                               "calibration": {"method": calibration.method, "noise": noise,
                                               "factor": calibration.factor, "floor": DEFAULTS[key][0]}}
    else:
        harness_value = DEFAULTS[key][0 if dtype == "float32" else 1]
        out = {"value": harness_value, "metric": metric, "upper": upper, "source": "default"}
    spec_value = ((spec_tolerances or {}).get(dtype) or {}).get(key)
    if spec_value is not None:
        out.update(value=spec_value, source="spec", harness_value=harness_value,
                   loosened_by_spec=looser(spec_value, harness_value, upper))
    return out


def cite(records: dict[str, dict[str, Any]], suite: str, dtype: str, citation) -> dict[str, dict[str, Any]]:
    """The records with `evidence` from the spec's checked-in calibration file (harness.calibration.Citation)
    where it measured the metric: fp32 defaults and calibrated bf16 bounds of the log-prob suites."""
    out = {}
    for key, rec in records.items():
        evidence = citation.evidence(suite, dtype, key, rec) if citation is not None and isinstance(rec, dict) else None
        out[key] = {**rec, "evidence": evidence} if evidence else rec
    return out


def resolve(dtype: str, spec_tolerances: dict[str, dict[str, float]] | None, keys,
            calibration: Calibration | None = None, scale: float | None = None) -> Tolerance:
    """The bounds `keys` at `dtype`: calibrated where evidence is given, else the default (with its relative
    part at `scale` where it has one); a spec value wins."""
    return Tolerance({key: record(key, dtype, spec_tolerances, calibration, scale) for key in keys})


def as_records(tolerance: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The certificate form; a plain {key: number} (a test's or an old judge's) reads as harness defaults."""
    if isinstance(tolerance, Tolerance):
        return tolerance.records
    return {key: (value if isinstance(value, dict) else
                  {"value": value, "metric": BOUND_METRICS.get(key, (key,))[0],
                   "upper": not key.startswith("min_"), "source": "default"})
            for key, value in tolerance.items()}


def values(tolerance: dict[str, Any]) -> dict[str, float]:
    """{key: number} from a certificate row's tolerance (records) or a plain mapping."""
    return {key: (value["value"] if isinstance(value, dict) else value) for key, value in tolerance.items()}


def invalid_override(key: str, value: float) -> str | None:
    """Why a spec's tolerance value can never be a meaningful bound (None when it can)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f"{value!r} is not a finite number"
    metric, upper = BOUND_METRICS[key]
    if value < 0:
        return f"{value} is negative: no measurement can be below zero"
    if not upper and value > 1:
        return f"{value} > 1: {metric} is a fraction, so the bound can never be met"
    if metric == "mean_exp_abs_logprob" and value < 1:
        return f"{value} < 1: exp(|Δ|) is at least 1, so the bound can never be met"
    return None
