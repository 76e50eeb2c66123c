"""`harness calibrate`'s output: the calibration JSON (measurements, suggested bounds, self-test margins) and
the table printed for people. Plain functions over the measurements harness.calibrate collects."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from .tolerances import BOUND_METRICS, DEFAULTS, LOGIT_METRICS, calibrated_value, calibration_factor

METRICS = {key: BOUND_METRICS[key] for key in LOGIT_METRICS}  # tolerance key -> (metric, upper)
POOLED = ("top1_agreement", "topk_overlap", "greedy_equal")  # rates pooled over the sets (no worst set)
MARGIN_GOAL = 10.0  # a planted bug should fail its fp32 bound by at least this much
SUGGEST_RULE = ("calibration_factor('logits') x the grid's worst HF-bf16 noise, never tighter than the fp32 "
                "default (harness.tolerances.calibrated_value)")


def excess(key: str, value: float | None, reference: float | None) -> float | None:
    """How many times further from the ideal `value` is than `reference` (None where undefined)."""
    if value is None or reference is None:
        return None
    metric, upper = METRICS.get(key, BOUND_METRICS[key])
    ideal = 1.0 if (metric == "mean_exp_abs_logprob" or not upper) else 0.0
    a, b = abs(value - ideal), abs(reference - ideal)
    return a / b if b > 0 else None


def _worst(upper: bool, rows: list[tuple[float | None, dict[str, Any]]]) -> tuple[float | None, dict[str, Any]]:
    """The largest value (smallest for a lower-bounded rate) and where it was measured."""
    rows = [(v, at) for v, at in rows if v is not None]
    if not rows:
        return None, {}
    return (max if upper else min)(rows, key=lambda r: r[0])


def _at(v: dict[str, Any]) -> dict[str, Any]:
    return {"seed": v["seed"], "initializer_range": v["initializer_range"]}


def _worst_set(v: dict[str, Any], metric: str, upper: bool) -> str | None:
    sets = {n: m[metric] for n, m in v["per_set"].items() if m.get(metric) is not None}
    return (max if upper else min)(sets, key=sets.get) if sets else None


def bf16_noise(variants: list[dict[str, Any]], own: dict[str, Any]) -> dict[str, Any]:
    metrics = {}
    for key, (metric, upper) in METRICS.items():
        worst, at = _worst(upper, [(v["noise"][metric], {**_at(v), **({} if metric in POOLED else
                                 {"prompt_set": _worst_set(v, metric, upper)})}) for v in variants])
        metrics[metric] = {"measured": worst, "at": at, "per_run": own["noise"][metric],
                           "grid_over_run": excess(key, worst, own["noise"][metric]),
                           "what": "worst HF-bf16 vs HF-fp32 over the grid (the logit judge's metrics)"}
    return metrics


def by_prompt_set(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Per prompt set: its lengths and the worst noise over the grid (the prompt-length dependence)."""
    out = {}
    for name, seqs in variants[0]["prompts"].items():
        entry: dict[str, Any] = {"lengths": [len(s) for s in seqs],
                                 "positions": variants[0]["per_set"][name]["positions"]}
        for key in ("max_abs_logprob", "mean_abs_logprob", "mean_exp_abs_logprob"):
            worst, at = _worst(True, [(v["per_set"][name][key], _at(v)) for v in variants])
            entry[key] = worst
            if key == "max_abs_logprob":
                entry["at"] = at
        out[name] = entry
    return out


def by_position(variants: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The longest one-sequence set's worst max |Δlogprob| per position bucket (edges: the other sets' lengths)."""
    singles = {n: len(s[0]) for n, s in variants[0]["prompts"].items() if len(s) == 1}
    if not singles:
        return None
    name = max(singles, key=singles.get)
    edges = sorted({0, *singles.values()})
    buckets = []
    for lo, hi in zip(edges, edges[1:]):
        worst = max(max(v["per_set"][name]["per_position_max_abs"][lo:hi], default=0.0) for v in variants)
        buckets.append({"positions": f"{lo}-{hi - 1}", "max_abs_logprob": worst})
    return {"prompt_set": name, "buckets": buckets}


def headroom(key: str, default: float, measured: float | None) -> float | None:
    """default / measured, as distances from the ideal (None: measured at the ideal, or the default is exact)."""
    return excess(key, default, measured)


def fp32_section(variants: list[dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    if "megatron" in skipped:
        return {"method": "Megatron TP1 vs HF fp32", "not_run": skipped["megatron"], "metrics": {}}
    metrics = {}
    for key, (metric, upper) in METRICS.items():
        worst, at = _worst(upper, [(v["megatron_fp32"][metric], _at(v)) for v in variants])
        metrics[metric] = {"measured": worst, "at": at, "default": DEFAULTS[key][0],
                           "headroom": headroom(key, DEFAULTS[key][0], worst),
                           "what": "worst Megatron TP1 vs HF fp32 over the grid (the logit judge's metrics)"}
    return {"method": "megatron-core TP1 (converted by the spec's template) vs HF fp32 on each grid checkpoint",
            "metrics": metrics}


def suggestions(noise: dict[str, Any], fp32: dict[str, Any]) -> dict[str, Any]:
    factor = calibration_factor("logits")
    bf16, f32 = {}, {}
    for key, (metric, _upper) in METRICS.items():
        n = noise[metric]
        grid = calibrated_value(key, n["measured"], factor) if n["measured"] is not None else None
        run = calibrated_value(key, n["per_run"], factor) if n["per_run"] is not None else None
        bf16[key] = {"value": grid, "rule": SUGGEST_RULE, "factor": factor, "per_run_value": run,
                     "grid_over_run": excess(key, grid, run), "table_default": DEFAULTS[key][1]}
        m = fp32["metrics"].get(metric, {})
        f32[key] = {"value": DEFAULTS[key][0], "rule": "the harness default (harness/tolerances.py), kept; headroom = "
                    "its distance from the ideal / the worst measured Megatron TP1 vs HF fp32 distance",
                    "measured": m.get("measured"), "headroom": m.get("headroom")}
    return {"bfloat16": bf16, "float32": f32}


def backend_bf16(variants: list[dict[str, Any]], skipped: dict[str, str], suggested: dict[str, Any]) -> dict[str, Any]:
    if "megatron" in skipped:
        return {"megatron_tp1": {"not_run": skipped["megatron"]}}
    out = {}
    for key in ("max_abs_logprob", "mean_abs_logprob"):
        worst, at = _worst(True, [(v["megatron_bf16"][key], _at(v)) for v in variants])
        fraction, fat = _worst(True, [(v["megatron_bf16_fraction"].get(key), _at(v)) for v in variants])
        grid = suggested["bfloat16"][key]["value"]
        out[key] = {"measured": worst, "at": at, "worst_fraction_of_its_run_bound": fraction, "fraction_at": fat,
                    "fraction_of_grid_bound": worst / grid if worst is not None and grid else None}
    return {"megatron_tp1": out}


def _margin(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def selftest_section(folder: Path | None, model: str, suggested: dict[str, Any]) -> dict[str, Any]:
    """Bug margins from `harness self-test --out` results; says plainly when there are none."""
    from .calibration import display_path
    from .spec import REPO_ROOT

    default = REPO_ROOT / "reports" / "selftest" / model
    folder = Path(folder) if folder is not None else default
    path = folder / "selftest.json"
    if not path.is_file():
        return {"absent": f"no self-test results at {display_path(path)} (python -m harness self-test --model "
                          f"{model} --out {display_path(folder)}); no bug margins are reported"}
    raw = path.read_bytes()
    try:
        results = json.loads(raw)
        if not isinstance(results, list) or not all(isinstance(r, dict) and "mutation" in r for r in results):
            raise ValueError("expected a list of self-test results")
    except ValueError as exc:
        raise ValueError(f"{display_path(path)}: not a self-test results file ({exc})") from None
    rows, below, invisible = [], [], []
    for r in results:
        if r.get("mutation") == "(none)":
            continue
        row = {"mutation": r["mutation"], "status": r.get("status"), "caught_by": [c.split("/", 1)[-1] for c in
               r.get("caught_by") or []], "fp32_margin": _margin(r.get("margin"))}
        margin = r.get("margin")
        if r.get("status") == "caught" and isinstance(margin, (int, float)) and margin < MARGIN_GOAL:
            row["below_goal"] = True
            below.append(r["mutation"])
        logit_visible = any("/logits/" in c for c in r.get("caught_by") or [])
        if logit_visible:
            row["bf16"] = bf16_visibility(r, suggested)
            if row["bf16"].get("visible") is False:
                invisible.append(r["mutation"])
        elif r.get("status") == "caught":
            row["bf16_note"] = ("structural (a count or config check): the same in every dtype"
                                if margin == "structural" else
                                "caught by a train/rollout bound: this file calibrates log-prob bounds, not derived")
        rows.append(row)
    return {"source": display_path(path), "sha256": hashlib.sha256(raw).hexdigest(), "goal": MARGIN_GOAL,
            "mutations": rows, "below_goal": below, "bf16_cannot_see": invisible,
            "bf16_how": "derived, not measured: the fp32 metric value that gave the mutation's margin (self-test's "
                        "margin_from) over the suggested bf16 bound for that metric; a mutation is invisible in bf16 "
                        "when that ratio is <= 1 (bf16 rounding also moves the measured value by up to its noise)"}


def bf16_visibility(result: dict[str, Any], suggested: dict[str, Any]) -> dict[str, Any]:
    source, bounds = result.get("margin_from"), suggested["bfloat16"]
    if isinstance(source, dict) and source.get("key") in bounds and bounds[source["key"]]["value"] is not None:
        bound = bounds[source["key"]]["value"]
        upper = source.get("upper", True)
        ratio = source["value"] / bound if upper else ((1 - source["value"]) / (1 - bound) if bound < 1 else None)
        return {"metric": source["metric"], "fp32_value": source["value"], "bf16_bound": bound,
                "derived_margin": ratio, "visible": None if ratio is None else ratio > 1}
    margin = result.get("margin")
    if not isinstance(margin, (int, float)) or math.isinf(margin):
        return {"derived_margin": None, "visible": None,
                "why": "the fp32 margin is not a finite ratio of a log-prob bound: nothing to derive"}
    # older results: which bound gave the margin is not recorded; the range over the upper log-prob bounds
    ratios = [margin * DEFAULTS[k][0] / bounds[k]["value"] for k, (_, upper) in METRICS.items()
              if upper and bounds[k]["value"] and not BOUND_METRICS[k][0].startswith("mean_exp")]
    low, high = min(ratios), max(ratios)
    return {"derived_margin_range": [low, high], "visible": True if low > 1 else (False if high <= 1 else None),
            "why": "the results do not say which bound gave the margin (self-test before margin_from)"}


def compose(spec, variants, own, nondet, grid, skipped, selftest, meta) -> dict[str, Any]:
    from .calibration import FORMAT_VERSION, display_path

    noise = bf16_noise(variants, own)
    fp32 = fp32_section(variants, skipped)
    suggested = suggestions(noise, fp32)
    prompt_sets = {n: [len(s) for s in seqs] for n, seqs in variants[0]["prompts"].items()}
    return {
        "calibration_version": FORMAT_VERSION,
        "model": spec.name,
        "spec": display_path(spec.source) if spec.source else "",
        "spec_sha256": spec.sha256,
        "generated": meta["generated"],
        "command": meta["command"],
        "versions": meta["versions"],
        "device": meta["device"],
        "grid": {**grid, "prompt_sets": prompt_sets},
        "bfloat16": {"method": "HF bf16 vs HF fp32 on the same fp32 checkpoint, judged as harness.checks.logits "
                               "judges a backend (same decisive margins; continuous metrics: worst prompt set; "
                               "agreement rates pooled)",
                     "metrics": noise, "by_prompt_set": by_prompt_set(variants), "by_position": by_position(variants),
                     "backend": backend_bf16(variants, skipped, suggested)},
        "float32": fp32,
        "suggested": suggested,
        "nondeterminism": nondet,
        "selftest": selftest_section(selftest, spec.name, suggested),
        "variants": [{**_at(v), "noise": v["noise"], **({"megatron_fp32": v["megatron_fp32"]}
                                                        if "megatron_fp32" in v else {})} for v in variants],
    }


# ---------------------------------------------------------------- the table for people

def _g(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _where(at: dict[str, Any]) -> str:
    return " ".join(f"{k.replace('initializer_range', 'init')}={v}" for k, v in at.items()) if at else ""


def table(data: dict[str, Any]) -> str:
    g = data["grid"]
    lines = [f"# calibration: {data['model']} (spec sha256 {data['spec_sha256'][:12]}…, {data['generated']})",
             f"grid: seeds {g['seeds']} x initializer_range {g['initializer_range']} "
             f"({len(g['variants'])} checkpoints; the spec's own: seed {g['spec_reference']['seed']}, "
             f"init {g['spec_reference']['initializer_range']})", "",
             "## bf16 noise (HF bf16 vs HF fp32) and suggested bf16 bounds",
             "| metric | grid worst | at | per-run (spec's) | grid / run | suggested bound | per-run bound | "
             "bound grid / run |", "|---|---|---|---|---|---|---|---|"]
    for key, (metric, _upper) in METRICS.items():
        n, s = data["bfloat16"]["metrics"][metric], data["suggested"]["bfloat16"][key]
        lines.append(f"| {metric} | {_g(n['measured'], 4)} | {_where(n['at'])} | {_g(n['per_run'], 4)} | "
                     f"{_g(n['grid_over_run'])} | {key} {_g(s['value'], 4)} | {_g(s['per_run_value'], 4)} | "
                     f"{_g(s['grid_over_run'])} |")
    lines += ["", "prompt-length dependence (worst over the grid):", "| prompt set | lengths | max |Δlogprob| | at | "
              "mean |Δlogprob| |", "|---|---|---|---|---|"]
    for name, e in data["bfloat16"]["by_prompt_set"].items():
        lines.append(f"| {name} | {e['lengths']} | {_g(e['max_abs_logprob'], 4)} | {_where(e['at'])} | "
                     f"{_g(e['mean_abs_logprob'], 4)} |")
    pos = data["bfloat16"]["by_position"]
    if pos:
        lines.append(f"by position in '{pos['prompt_set']}': " + ", ".join(
            f"{b['positions']}: {_g(b['max_abs_logprob'], 4)}" for b in pos["buckets"]))
    mt = data["bfloat16"]["backend"]["megatron_tp1"]
    if "not_run" in mt:
        lines.append(f"Megatron TP1 bf16: not run ({mt['not_run']})")
    else:
        m = mt["max_abs_logprob"]
        lines.append(f"Megatron TP1 bf16 vs HF fp32: max |Δlogprob| {_g(m['measured'], 4)} ({_where(m['at'])}), "
                     f"at most "
                     f"{_g(m['worst_fraction_of_its_run_bound'])} of its run's bound, "
                     f"{_g(m['fraction_of_grid_bound'])} of the suggested one")
    lines += ["", "## fp32: the harness defaults against Megatron TP1 vs HF fp32"]
    if "not_run" in data["float32"]:
        lines.append(f"not measured: {data['float32']['not_run']}")
    else:
        lines += ["| metric | default | measured worst | at | headroom (default / measured) |", "|---|---|---|---|---|"]
        for metric, e in data["float32"]["metrics"].items():
            room = _g(e["headroom"]) + "x" if e["headroom"] is not None else "— (exact, or measured at the ideal)"
            digits = 8 if metric == "mean_exp_abs_logprob" else 4  # a ratio near 1: show where it departs
            lines.append(f"| {metric} | {_g(e['default'], digits)} | {_g(e['measured'], digits)} | {_where(e['at'])} | "
                         f"{room} |")
    lines += ["", "## run-to-run nondeterminism (same forward twice)"]
    for backend, per in data["nondeterminism"].items():
        if backend == "how":
            continue
        if "not_run" in per:
            lines.append(f"- {backend}: not run ({per['not_run']})")
            continue
        lines.append(f"- {backend}: " + ", ".join(
            f"{dtype} max |Δ| {'0 (bitwise identical)' if e['max_abs_diff'] == 0 else _g(e['max_abs_diff'], 4)}"
            for dtype, e in per.items()))
    lines += ["", "## bug margins (self-test)"]
    st = data["selftest"]
    if "absent" in st:
        lines.append(st["absent"])
    else:
        lines += [f"from {st['source']}; goal: >= {st['goal']:g}x in fp32; bf16 visibility is {st['bf16_how']}", "",
                  "| mutation | result | caught by | fp32 margin | bf16 (derived) |", "|---|---|---|---|---|"]
        for r in st["mutations"]:
            flag = " **below goal**" if r.get("below_goal") else ""
            margin = r["fp32_margin"]
            margin = f"{margin:.3g}x" if isinstance(margin, (int, float)) else _g(margin)
            bf = r.get("bf16")
            if bf is None:
                shown = r.get("bf16_note", "—")
            elif "derived_margin_range" in bf:
                lo, hi = bf["derived_margin_range"]
                shown = f"{lo:.3g}x-{hi:.3g}x ({bf['why']})"
            elif bf.get("derived_margin") is None:
                shown = bf.get("why", "—")
            else:
                shown = (f"{bf['derived_margin']:.3g}x on {bf['metric']} ({_g(bf['fp32_value'])} vs "
                         f"{_g(bf['bf16_bound'])})" + ("" if bf["visible"] else " **bf16 cannot see it**"))
            caught = ", ".join(r["caught_by"][:2]) + (" …" if len(r["caught_by"]) > 2 else "")
            lines.append(f"| {r['mutation']} | {r['status']} | {caught} | {margin}{flag} | {shown} |")
        lines.append(f"below the goal: {', '.join(st['below_goal']) or 'none'}; bf16 cannot see: "
                     f"{', '.join(st['bf16_cannot_see']) or 'none of the log-prob catches'}")
    return "\n".join(lines) + "\n"
