"""Default tolerances per dtype and metric; a spec may override any of them.

Conversion checks are exact by construction (a converter only moves bytes), so
their tolerance is 0. Parity tolerances for later suites live here too so that
a spec can only name metrics the harness knows.
"""
from __future__ import annotations

DTYPES = ("float32", "bfloat16")

# metric -> (float32 default, bfloat16 default, meaning)
DEFAULTS: dict[str, tuple[float, float, str]] = {
    "roundtrip_max_abs_diff": (0.0, 0.0, "HF -> Megatron -> HF, max |a-b| over every tensor"),
    "save_load_max_abs_diff": (0.0, 0.0, "HF save_pretrained -> from_pretrained, max |a-b|"),
    "max_abs_logprob": (1e-4, 0.25, "max |logprob_backend - logprob_hf| over tokens"),
    "mean_abs_logprob": (1e-5, 0.03, "mean |logprob_backend - logprob_hf| over tokens"),
    "min_top1_agreement": (1.0, 0.95, "fraction of positions whose argmax agrees (lower bound)"),
    "min_topk_overlap": (0.99, 0.9, "mean top-5 overlap with the reference (lower bound)"),
    "min_greedy_equal": (1.0, 0.9, "fraction of prompts whose greedy next token agrees (lower bound)"),
    "max_mean_exp_abs_logprob": (1.0001, 1.05, "NeMo-RL metric mean(exp(|dlogp|)) (upper bound)"),
    "min_greedy_sequence_equal": (1.0, 0.5, "fraction of prompts whose whole greedy continuation agrees"),
    "min_closeness": (1.0, 0.9, "vLLM-style: at the first divergent greedy token each side's token is in the "
                                "other's top-5 (fraction of prompts)"),
    "max_prob_diff_mean": (1e-5, 0.005, "verl rollout_probs_diff: mean |p_engine - p_trainer| on realized tokens"),
    "max_loss_diff": (1e-5, 5e-2, "|loss_backend - loss_reference| per step"),
    "max_grad_diff": (1e-5, 5e-2, "max |grad_backend - grad_reference|"),
    "max_weight_diff": (1e-5, 5e-2, "max |updated weight backend - reference|"),
}

KNOWN_METRICS = tuple(DEFAULTS)


def resolve(dtype: str, overrides: dict[str, dict[str, float]] | None, metrics: list[str]) -> dict[str, float]:
    """Tolerances for `metrics` at `dtype`: spec override if given, else the default."""
    column = 0 if dtype == "float32" else 1
    chosen = {m: DEFAULTS[m][column] for m in metrics}
    chosen.update({m: v for m, v in ((overrides or {}).get(dtype) or {}).items() if m in chosen})
    return chosen


LOGIT_METRICS = ("max_abs_logprob", "mean_abs_logprob", "min_top1_agreement", "min_topk_overlap",
                 "min_greedy_equal", "max_mean_exp_abs_logprob")
ENGINE_LOGIT_METRICS = (*LOGIT_METRICS, "min_greedy_sequence_equal", "min_closeness", "max_prob_diff_mean")
ROLLOUT_METRICS = ("max_abs_logprob", "mean_abs_logprob", "max_mean_exp_abs_logprob", "max_prob_diff_mean")
CALIBRATION_FACTOR = 2.0  # a backend may be at most this many times noisier than HF's own bf16 rounding


def calibrate(noise: dict[str, float], floor: dict[str, float], bounds: dict[str, tuple[str, bool]],
              factor: float = CALIBRATION_FACTOR) -> dict[str, float]:
    """bf16 tolerances from the measured noise of HF-bf16 vs HF-fp32 on the same inputs.

    `noise` holds the worst value over prompt sets of each parity metric; `floor` (the fp32
    tolerances) keeps a bound from collapsing to zero when the noise happens to be zero;
    `bounds` maps each tolerance key to (metric, True when the metric is an upper bound).
    """
    out = {}
    for key, bound in floor.items():
        metric, upper = bounds[key]
        if metric == "mean_exp_abs_logprob":  # a ratio whose ideal is 1
            out[key] = max(bound, 1 + factor * (noise[metric] - 1))
        elif upper:
            out[key] = max(bound, factor * noise[metric])
        else:  # an agreement rate whose ideal is 1
            out[key] = min(bound, 1 - factor * (1 - noise[metric]))
    return out
