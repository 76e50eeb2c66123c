"""The human-readable certificate: reports/<model>/index.html and the reports/index.html overview.

Rendered from certificate.json alone (the contract), so a page can be rebuilt from any stored
certificate. Self-contained: inline CSS and SVG, no scripts, no external references.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2

from ..device import describe
from ..tolerances import as_records, values as bound_values
from . import svg

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATUS_ORDER = ["passed", "failed", "error", "not_run", "not_applicable"]
STATUS_LABEL = {"passed": "passed", "failed": "failed", "error": "error", "not_run": "not run",
                "not_applicable": "not applicable"}
VERDICT_TEXT = {
    "certified": "every planned check passed",
    "failed": "at least one check failed or errored",
    "incomplete": "no check failed, but not every planned check was run",
}
LONG_REASON = 240
TRUNCATE = 90


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["status_label"] = lambda s: STATUS_LABEL.get(s, s)
    return env


# ---------------------------------------------------------------- values


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """Numbers short but never misleading: 1.0000008 is not shown as "1"."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        for digits in range(4, 12):
            text = f"{v:.{digits}g}"
            if float(text) == v or not re.fullmatch(r"-?\d+", text):
                return text
        return repr(v)
    return str(v)


def created_text(created: str) -> str:
    """2026-11-23T11:03:07+00:00 -> 2026-11-23 11:03:07 UTC (anything else unchanged)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d(?::\d\d)?)(?:\.\d+)?(\+00:00|Z)", created)
    return f"{match[1]} {match[2]} UTC" if match else created


def summarize(v: Any, depth: int = 0) -> str:
    """A nested value in one short line."""
    if _is_scalar(v):
        text = fmt(v)
        return text if len(text) <= TRUNCATE else text[: TRUNCATE - 1] + "…"
    if isinstance(v, (list, tuple)):
        if not v:
            return "[]"
        if all(_is_number(x) for x in v):
            finite = [x for x in v if math.isfinite(x)]
            if len(v) <= 6:
                return "[" + ", ".join(fmt(x) for x in v) + "]"
            bad = len(v) - len(finite)
            text = f"{len(v)} values" + (f", max {fmt(max(finite))}" if finite else "")
            return text + (f", {bad} non-finite" if bad else "")
        if len(v) <= 4 and all(_is_scalar(x) for x in v):
            return "[" + ", ".join(summarize(x, depth + 1) for x in v) + "]"
        return f"[{len(v)} items]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        if depth < 2 and len(v) <= 8:
            parts = [f"{k}: {summarize(x, depth + 1)}" for k, x in v.items()]
            text = "; ".join(parts) if depth == 0 else "{" + ", ".join(parts) + "}"
            if len(text) <= 240:
                return text
        keys = ", ".join(str(k) for k in list(v)[:6])
        return f"{len(v)} entries: {keys}" + (", …" if len(v) > 6 else "")
    return summarize(str(v), depth)


def _table(v: Any) -> dict[str, Any] | None:
    """A dict of dicts (per prompt set, per config key, ...) as rows x columns, for a collapsible table."""
    if not isinstance(v, dict) or not v or not all(isinstance(x, dict) for x in v.values()):
        return None
    columns: list[str] = []
    for inner in v.values():
        columns += [k for k in inner if k not in columns]
    rows = [{"name": str(k), "cells": [summarize(inner[c], 1) if c in inner else "" for c in columns]}
            for k, inner in v.items()]
    return {"columns": columns, "rows": rows}


# ---------------------------------------------------------------- metrics against tolerances


def _pair(tol_key: str, metrics: dict[str, Any]) -> str | None:
    """The metric a tolerance bounds: same name, the name without min_/max_, or a name it ends with."""
    if tol_key in metrics:
        return tol_key
    bare = re.sub(r"^(min|max)_", "", tol_key)
    if bare in metrics:
        return bare
    endings = [m for m in metrics if tol_key.endswith("_" + m)]
    return max(endings, key=len) if endings else None


def _within(value: Any, bound: Any, upper: bool) -> bool | None:
    if not (_is_number(value) and _is_number(bound)):
        return None
    if not math.isfinite(value):
        return False
    return value <= bound if upper else value >= bound


def _source_text(record: dict[str, Any]) -> str:
    """Where a bound came from, for people: default / calibrated (on what) / spec (loosened?)."""
    text = str(record.get("source", ""))
    if record.get("calibration"):
        cal = record["calibration"]
        text += f": {cal.get('method', '')}, noise {fmt(cal.get('noise'))}"
    if isinstance(relative := record.get("relative"), dict):  # tolerances.RELATIVE
        text += f": {relative.get('rule', '')}: {fmt(relative.get('atol'))} + {fmt(relative.get('rtol'))} × " \
                f"{fmt(relative.get('scale'))}"
    if record.get("loosened_by_spec"):
        text += f" — loosened by the spec (the harness would use {fmt(record.get('harness_value'))})"
    return text


def metric_rows(check: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scalar rows: metric, value, bound, ok) and (nested rows: name, one-line summary, optional table)."""
    metrics = check.get("metrics") or {}
    records = as_records(check.get("tolerance") or {})
    tolerance = bound_values(records)
    bounds: dict[str, tuple[str, Any, bool]] = {}
    orphans = []
    for tol_key, bound in tolerance.items():
        metric = records[tol_key]["metric"] if records[tol_key]["metric"] in metrics else _pair(tol_key, metrics)
        upper = records[tol_key]["upper"]
        if metric is None or metric in bounds or not _is_scalar(metrics.get(metric)):
            orphans.append((tol_key, bound, upper))
        else:
            bounds[metric] = (tol_key, bound, upper)
    rows, nested = [], []
    for name, value in metrics.items():
        if _is_scalar(value):
            row = {"name": name, "value": fmt(value), "full": str(value), "bound": "", "tol_key": "", "ok": None,
                   "orphan": False, "source": ""}
            if name in bounds:
                tol_key, bound, upper = bounds[name]
                row.update(bound=f"{'≤' if upper else '≥'} {fmt(bound)}", tol_key=tol_key,
                           ok=_within(value, bound, upper), source=_source_text(records[tol_key]))
            if len(row["value"]) > TRUNCATE:
                row["value"] = row["value"][: TRUNCATE - 1] + "…"
            rows.append(row)
        else:
            nested.append({"name": name, "summary": summarize(value), "table": _table(value)})
    for tol_key, bound, upper in orphans:
        rows.append({"name": tol_key, "value": "", "full": "", "bound": f"{'≤' if upper else '≥'} {fmt(bound)}",
                     "tol_key": tol_key, "ok": None, "orphan": True,
                     "source": _source_text(records[tol_key])})
    return rows, nested


# ---------------------------------------------------------------- plots


def _numbers(values: Any) -> list[float] | None:
    if not isinstance(values, list) or not values:
        return None
    out = []
    for v in values:
        if _is_number(v):
            out.append(float(v))
        elif v is None or (isinstance(v, str) and v.lower() in {"nan", "inf", "-inf", "infinity", "-infinity"}):
            out.append(float("nan") if v is None else float(v))
        else:
            return None
    return out


def _log_scale(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    return bool(positive) and all(v >= 0 for v in finite) and max(positive) / min(positive) > 50


def plots_for(check: dict[str, Any]) -> list[dict[str, str]]:
    metrics = check.get("metrics") or {}
    tolerance = bound_values(check.get("tolerance") or {})
    plots = []
    per_set = metrics.get("per_set")
    if isinstance(per_set, dict):
        series, truncated = [], False
        for name, m in per_set.items():
            values = _numbers(m.get("per_position_max_abs")) if isinstance(m, dict) else None
            if values:
                series.append(svg.Series(str(name), values))
                truncated |= _is_number(m.get("positions")) and m["positions"] > len(values)
        if series:
            hlines = []
            if _is_number(tolerance.get("max_abs_logprob")):
                hlines.append(svg.HLine(tolerance["max_abs_logprob"], "tolerance", detail="tolerance max_abs_logprob"))
            calibration = metrics.get("calibration")
            noise = calibration.get("noise") if isinstance(calibration, dict) else None
            if isinstance(noise, dict) and _is_number(noise.get("max_abs_logprob")):
                hlines.append(svg.HLine(noise["max_abs_logprob"], "calibration noise", "reference",
                                        "max_abs_logprob of HF bf16 vs HF fp32 (what the bf16 bound is calibrated on)"))
            caption = ("Worst |Δ log p| over the vocabulary at each token position, per prompt set "
                       "(a set's sequences one after another); log scale.")
            if truncated:
                caption += " Only the first 256 positions of a set are stored."
            plots.append({"title": "per-token max |Δ log p| vs HF reference", "caption": caption,
                          "svg": svg.line_chart(series, title=f"{check.get('id', '')}: per-token max |Δ log p|",
                                                x_label="token position", y_label="max |Δ log p|", log_y=True,
                                                hlines=hlines)})
    curve = metrics.get("loss_curve")
    if isinstance(curve, dict):
        series = [svg.Series(str(k), v) for k, v in ((k, _numbers(v)) for k, v in curve.items()) if v]
        if series:
            plots.append({"title": "training loss per step", "caption": "Loss at each optimizer step.",
                          "svg": svg.line_chart(series, title=f"{check.get('id', '')}: loss per step",
                                                x_label="step", y_label="loss")})
        ref, test = _numbers(curve.get("reference")), _numbers(curve.get("backend"))
        if ref and test and len(ref) == len(test):
            diffs = [abs(a - b) for a, b in zip(ref, test)]
            hlines = [svg.HLine(b, "tolerance", detail=f"tolerance {k}") for k, b in tolerance.items()
                      if "loss" in k and _is_number(b)]
            plots.append({"title": "|Δ loss| per step", "caption": "Backend loss minus reference loss at each "
                          "step (absolute); log scale, exact agreement on the floor.",
                          "svg": svg.line_chart([svg.Series("|Δ loss|", diffs)], log_y=True, hlines=hlines,
                                                title=f"{check.get('id', '')}: |Δ loss| per step",
                                                x_label="step", y_label="|Δ loss|")})
    plots += _localization_plots(check)
    per_layer = metrics.get("per_layer")
    layer_series: list[svg.Series] = []
    if isinstance(per_layer, dict):
        values = _numbers(list(per_layer.values()))
        if values:
            layer_series.append(svg.Series("divergence", values))
    elif isinstance(per_layer, list) and per_layer:
        values = _numbers(per_layer)
        if values:
            layer_series.append(svg.Series("divergence", values))
        elif all(isinstance(x, dict) for x in per_layer):
            x_key = next((k for k in ("layer", "index", "idx") if all(_is_number(d.get(k)) for d in per_layer)), None)
            xs = [float(d[x_key]) for d in per_layer] if x_key else None
            keys: list[str] = []
            for d in per_layer:
                keys += [k for k, v in d.items() if k != x_key and k not in keys and (_is_number(v) or v is None)]
            for key in keys:
                values = _numbers([d.get(key) for d in per_layer])
                if values:
                    layer_series.append(svg.Series(key, values, xs))
    if layer_series:
        all_values = [v for s in layer_series for v in s.values]
        log_y = _log_scale(all_values)
        hlines = [svg.HLine(b, "tolerance", detail=f"tolerance {k}") for k, b in tolerance.items()
                  if "layer" in k and _is_number(b)]
        plots.append({"title": "per-layer divergence", "caption": "Divergence from the reference at each layer"
                      + ("; log scale." if log_y else "."),
                      "svg": svg.line_chart(layer_series, title=f"{check.get('id', '')}: per-layer divergence",
                                            x_label="layer", y_label="divergence", log_y=log_y, hlines=hlines)})
    return plots


def _point_x(point: str, num_layers: int) -> float:
    """Layer axis: embedding just before layer 0, a layer's points spread over [i, i+1), head after the last."""
    from ..checks.localize import LAYER_POINTS

    if point == "embedding":
        return -0.5
    if point in ("final_norm", "logits"):
        return num_layers + (0.0 if point == "final_norm" else 0.5)
    _, index, kind = point.split(".", 2)
    return int(index) + list(LAYER_POINTS).index(kind) / len(LAYER_POINTS)


def _localization_plots(check: dict[str, Any]) -> list[dict[str, str]]:
    loc = check.get("localization") or {}
    rows = [r for r in loc.get("points") or [] if isinstance(r, dict) and "point" in r]
    if not rows:
        return []
    layers = 1 + max((int(r["point"].split(".")[1]) for r in rows if r["point"].startswith("layers.")), default=-1)
    xs = [_point_x(r["point"], layers) for r in rows]
    series = [svg.Series("rel. L2 |Δ| vs HF", _numbers([r.get("rel_l2") for r in rows]) or [], xs),
              svg.Series("1 - cosine", _numbers([1 - r["cosine"] if _is_number(r.get("cosine")) else None
                                                 for r in rows]) or [], xs),
              svg.Series("bound", _numbers([r.get("bound") for r in rows]) or [], xs)]
    first = loc.get("first_divergence") or {}
    vlines = [svg.VLine(_point_x(first["point"], layers), f"first divergence: {first['point']}")] \
        if first.get("point") else []
    caption = (f"Each captured activation (embedding, per layer: input norm, q/k before and after rope, attention "
               f"context and output, MLP norm, activation and output, layer output; final norm, logits) on prompt "
               f"set {loc.get('prompt_set', '?')!r}, relative L2 difference from HF fp32 and 1 - cosine; log scale. "
               f"{loc.get('summary') or loc.get('reason', '')}")
    return [{"title": "divergence localization", "caption": caption,
             "svg": svg.line_chart(series, title=f"{check.get('id', '')}: where it diverges", x_label="layer",
                                   y_label="relative |Δ|", log_y=True, vlines=vlines, width=560)}]


# ---------------------------------------------------------------- the model page


def _anchor(check_id: str, taken: set[str]) -> str:
    base = "check-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", check_id).strip("-")
    anchor, n = base, 2
    while anchor in taken:
        anchor, n = f"{base}-{n}", n + 1
    taken.add(anchor)
    return anchor


def _counts(checks: list[dict[str, Any]]) -> list[tuple[str, int]]:
    counter = Counter(c.get("status", "?") for c in checks)
    order = STATUS_ORDER + sorted(s for s in counter if s not in STATUS_ORDER)
    return [(s, counter[s]) for s in order if counter[s]]


def _aggregate(statuses: list[str]) -> str:
    s = set(statuses)
    if "error" in s:
        return "error"
    if "failed" in s:
        return "failed"
    if s <= {"passed", "not_applicable"} and "passed" in s:
        return "passed"
    if "passed" in s:
        return "partial"
    if s == {"not_applicable"}:
        return "not_applicable"
    return "not_run"


def _tooltip(view: dict[str, Any]) -> str:
    text = f"{view['id']}: {STATUS_LABEL.get(view['status'], view['status'])}"
    if view["reason"]:
        reason = view["reason"]
        text += " — " + (reason if len(reason) <= 400 else reason[:399] + "…")
    return text


def _check_view(check: dict[str, Any], taken: set[str]) -> dict[str, Any]:
    reason = str(check.get("reason") or "")
    rows, nested = metric_rows(check)
    first = reason.strip().splitlines()[0] if reason.strip() else ""
    view = {
        "id": str(check.get("id", "?")),
        "anchor": _anchor(str(check.get("id", "?")), taken),
        "status": str(check.get("status", "?")),
        "suite": str(check.get("suite") or "?"),
        "backend": str(check.get("backend") or "?"),
        "variant": str(check.get("variant") or ""),
        "dtype": str(check.get("dtype") or ""),
        "layout": str(check.get("layout") or ""),
        "seconds": check.get("seconds"),
        "seconds_text": f"{check['seconds']:.1f} s" if _is_number(check.get("seconds")) and check["seconds"] else "",
        "reason": reason,
        "reason_first": first if len(first) <= LONG_REASON else first[: LONG_REASON - 1] + "…",
        "reason_long": len(reason) > LONG_REASON or "\n" in reason.strip(),
        "metric_rows": rows,
        "nested": nested,
        "plots": plots_for(check),
        "localization": str((check.get("localization") or {}).get("summary")
                            or (check.get("localization") or {}).get("reason") or ""),
        "loosened": [key for key, r in as_records(check.get("tolerance") or {}).items() if r.get("loosened_by_spec")],
    }
    view["tooltip"] = _tooltip(view)
    return view


def _matrix(views: list[dict[str, Any]]) -> dict[str, Any]:
    backends: list[str] = []
    row_keys: list[tuple[str, str]] = []
    for v in views:
        if v["backend"] not in backends:
            backends.append(v["backend"])
        if (v["suite"], v["variant"]) not in row_keys:
            row_keys.append((v["suite"], v["variant"]))
    rows = []
    for suite, variant in row_keys:
        cells = []
        for backend in backends:
            members = [v for v in views if (v["suite"], v["variant"], v["backend"]) == (suite, variant, backend)]
            if not members:
                cells.append(None)
                continue
            statuses = [m["status"] for m in members]
            counts = _counts([{"status": s} for s in statuses])
            if len(members) == 1:
                summary = STATUS_LABEL.get(statuses[0], statuses[0])
            else:
                summary = " · ".join(f"{n} {STATUS_LABEL.get(s, s)}" for s, n in counts)
            groups: list[dict[str, Any]] = []
            for m in members:
                label = m["dtype"]
                group = next((g for g in groups if g["label"] == label), None)
                if group is None:
                    group = {"label": label, "dots": []}
                    groups.append(group)
                group["dots"].append({"anchor": m["anchor"], "status": m["status"], "tooltip": m["tooltip"],
                                      "text": m["layout"] or m["dtype"] or m["variant"] or m["backend"]})
            reasons = Counter(m["reason"].strip().splitlines()[0] for m in members
                              if m["status"] != "passed" and m["reason"].strip())
            title = "\n".join(f"{n} × {r}" if n > 1 else r for r, n in reasons.items())
            cells.append({"status": _aggregate(statuses), "summary": summary, "title": title, "groups": groups,
                          "single": members[0] if len(members) == 1 else None})
        rows.append({"suite": suite, "variant": variant, "cells": cells})
    return {"backends": backends, "rows": rows}


def page_context(cert: dict[str, Any]) -> dict[str, Any]:
    checks = [c for c in cert.get("checks") or [] if isinstance(c, dict)]
    taken: set[str] = set()
    views = [_check_view(c, taken) for c in checks]
    suites: list[dict[str, Any]] = []
    for v in views:
        suite = next((s for s in suites if s["name"] == v["suite"]), None)
        if suite is None:
            suite = {"name": v["suite"], "checks": []}
            suites.append(suite)
        suite["checks"].append(v)
    for suite in suites:
        suite["counts"] = _counts(suite["checks"])
        suite["plots"] = [dict(p, check=v) for v in suite["checks"] for p in v["plots"]]
    verdict = str(cert.get("verdict") or "incomplete")
    not_run = Counter(v["reason"].strip().splitlines()[0] if v["reason"].strip() else "(no reason given)"
                      for v in views if v["status"] == "not_run")
    versions = cert.get("versions") or {}
    return {
        "model": str(cert.get("model", "?")),
        "verdict": verdict,
        "summary": str(cert.get("summary") or ""),
        "scopes": sorted((str(k), str(v)) for k, v in (cert.get("scopes") or {}).items()),
        "loosened": [v for v in views if v.get("loosened")],
        "verdict_text": VERDICT_TEXT.get(verdict, ""),
        "created": str(cert.get("created") or ""),
        "created_text": created_text(str(cert.get("created") or "")),
        "command": str(cert.get("command") or ""),
        "device": describe(cert.get("device") if isinstance(cert.get("device"), dict) else None),
        "spec_sha256": str(cert.get("spec_sha256") or ""),
        "spec_path": str(cert.get("spec_path") or ""),
        "calibration": cert.get("calibration") if isinstance(cert.get("calibration"), dict) else None,
        "resources": _resources(cert.get("resources")),
        "certificate_version": cert.get("certificate_version", ""),
        "versions": sorted((str(k), str(v)) for k, v in versions.items()),
        "counts": _counts(checks),
        "total": len(checks),
        "problems": [v for v in views if v["status"] in {"failed", "error"}],
        "not_run_reasons": not_run.most_common(),
        "matrix": _matrix(views),
        "suites": suites,
    }


def _resources(resources: Any) -> dict[str, Any] | None:
    """Rows of per-worker wall time and peak RSS (GiB), and the judged bound, for the facts list."""
    if not isinstance(resources, dict) or not isinstance(resources.get("workers"), dict):
        return None
    gib = float(1 << 30)
    rows = [{"name": str(name), "trains": "yes" if r.get("trains") else "no", "wall_s": f"{r.get('wall_s', 0):.1f}",
             "peak": f"{r.get('peak_rss_bytes', 0) / gib:.2f}", "largest": f"{r.get('largest_process_rss_bytes', 0) / gib:.2f}"}
            for name, r in resources["workers"].items() if isinstance(r, dict)]
    bound = resources.get("bound") if isinstance(resources.get("bound"), dict) else None
    return {"rows": rows, "bound": bound}


def render_model_page(cert: dict[str, Any]) -> str:
    return _env().get_template("model.html.j2").render(**page_context(cert))


# ---------------------------------------------------------------- the overview of every model


def scan(report_dir: Path) -> list[dict[str, Any]]:
    """Every <report_dir>/<model>/certificate.json, readable or not, sorted by folder name."""
    entries = []
    for cert_path in sorted(Path(report_dir).glob("*/certificate.json")):
        folder = cert_path.parent
        page = folder / "index.html"
        entry: dict[str, Any] = {"folder": folder.name, "model": folder.name,
                                 "href": f"{folder.name}/{'index.html' if page.exists() else 'certificate.json'}",
                                 "has_page": page.exists(), "verdict": "unreadable", "created": "", "created_text": "",
                                 "counts": [], "total": 0, "spec_sha256": "", "error": ""}
        try:
            cert = json.loads(cert_path.read_text())
            if not isinstance(cert, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entries.append(entry)
            continue
        checks = [c for c in cert.get("checks") or [] if isinstance(c, dict)]
        created = str(cert.get("created") or "")
        entry.update(model=str(cert.get("model") or folder.name), verdict=str(cert.get("verdict") or "incomplete"),
                     created=created, created_text=created_text(created), counts=_counts(checks), total=len(checks),
                     spec_sha256=str(cert.get("spec_sha256") or ""), command=str(cert.get("command") or ""))
        entries.append(entry)
    return entries


def render_index(entries: list[dict[str, Any]]) -> str:
    verdicts = Counter(e["verdict"] for e in entries)
    return _env().get_template("index.html.j2").render(entries=entries, verdicts=sorted(verdicts.items()))


def write_pages(cert: dict[str, Any], report_dir: str | Path) -> tuple[Path, Path]:
    """reports/<model>/index.html for this certificate, then reports/index.html rebuilt from every folder."""
    from ..certificate import _atomic_write

    report_dir = Path(report_dir)
    cert = json.loads(json.dumps(cert, default=str))  # exactly what certificate.json holds
    page = report_dir / str(cert["model"]) / "index.html"
    _atomic_write(page, render_model_page(cert))
    index = report_dir / "index.html"
    _atomic_write(index, render_index(scan(report_dir)))
    return page, index
