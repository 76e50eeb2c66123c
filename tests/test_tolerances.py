"""The one tolerance model: every bound says where it came from, and a looser spec value is flagged."""
from __future__ import annotations

import pytest

from harness import certificate
from harness.tolerances import (DEFAULTS, LOGIT_METRICS, Calibration, calibrated_value, expected_keys,
                                needs_calibration, resolve)


def test_defaults_say_default():
    tol = resolve("float32", {}, LOGIT_METRICS)
    assert tol["max_abs_logprob"] == DEFAULTS["max_abs_logprob"][0]
    assert all(r["source"] == "default" and "calibration" not in r for r in tol.records.values())


def test_calibrated_bounds_carry_their_evidence_and_never_undercut_the_fp32_floor():
    noise = {"max_abs_logprob": 0.12, "mean_abs_logprob": 1e-7, "top1_agreement": 0.95, "topk_overlap": 1.0,
             "greedy_equal": None, "mean_exp_abs_logprob": 1.01}
    tol = resolve("bfloat16", {}, LOGIT_METRICS, Calibration("2 x HF-bf16 noise", noise))
    assert tol["max_abs_logprob"] == 0.24
    assert tol["mean_abs_logprob"] == DEFAULTS["mean_abs_logprob"][0]  # the floor: noise this small proves nothing
    assert tol["min_top1_agreement"] == pytest.approx(0.9) and tol["max_mean_exp_abs_logprob"] == pytest.approx(1.02)
    assert tol["min_greedy_equal"] == 1.0  # nothing decisive was measured: the strict floor, judging nothing
    record = tol.records["max_abs_logprob"]
    assert record["source"] == "calibrated"
    assert record["calibration"] == {"method": "2 x HF-bf16 noise", "noise": 0.12, "factor": 2.0, "floor": 1e-4}
    assert calibrated_value("max_abs_logprob", 0.12, 4.0) == 0.48


def test_a_spec_value_wins_and_a_looser_one_is_flagged_in_the_certificate_text():
    loose = resolve("float32", {"float32": {"max_abs_logprob": 0.5, "min_top1_agreement": 0.8}}, LOGIT_METRICS)
    assert loose["max_abs_logprob"] == 0.5
    assert loose.records["max_abs_logprob"] == {"value": 0.5, "metric": "max_abs_logprob", "upper": True,
                                                "source": "spec", "harness_value": 1e-4, "loosened_by_spec": True}
    assert loose.records["min_top1_agreement"]["loosened_by_spec"] is True
    tight = resolve("float32", {"float32": {"max_abs_logprob": 1e-6}}, ["max_abs_logprob"])
    assert tight.records["max_abs_logprob"]["loosened_by_spec"] is False
    text = certificate.bound_text("max_abs_logprob", loose.records["max_abs_logprob"])
    assert text == "max_abs_logprob≤0.5 (spec, loosened by the spec from 0.0001)"


def test_which_rows_carry_which_bounds():
    assert expected_keys("logits", "megatron") == LOGIT_METRICS
    assert "min_closeness" in expected_keys("logits", "vllm")
    assert expected_keys("config", "megatron") is None  # a structural count check
    assert needs_calibration("train", "bfloat16") and not needs_calibration("train", "float32")
    assert not needs_calibration("roundtrip", "bfloat16")  # conversion is exact in every dtype
