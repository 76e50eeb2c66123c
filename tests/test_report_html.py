"""The HTML certificate (harness/report): structure, escaping, plots, the overview page, and a real browser."""
from __future__ import annotations

import json
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import certificate
from harness.report import html as report
from harness.report import render_index, render_model_page, scan, write_pages

CHROMIUM = Path("/usr/bin/chromium")
LOGIT_TOL = {"max_abs_logprob": 1e-4, "mean_abs_logprob": 1e-5, "min_top1_agreement": 1.0, "min_topk_overlap": 0.99,
             "min_greedy_equal": 1.0, "max_mean_exp_abs_logprob": 1.0001}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SVG_LEAVES = {"line", "polyline", "circle", "rect", "path", "text", "title"}


# ---------------------------------------------------------------- synthetic certificates


def row(check_id: str, status: str, reason: str = "", metrics: dict | None = None, tolerance: dict | None = None,
        seconds: float = 0.5) -> dict:
    parts = check_id.split("/")
    suite, backend = parts[1], parts[2] if len(parts) > 2 else parts[1]
    rest = parts[3:]
    dtype = next((p for p in rest if p in {"float32", "bfloat16"}), "")
    layout = next((p for p in rest if p.startswith("tp")), "")
    variant = next((p for p in rest if p not in {dtype, layout}), "")
    if suite == "hf":
        backend, variant = "hf", parts[3]
    return {"id": check_id, "suite": suite, "backend": backend, "variant": variant, "dtype": dtype, "layout": layout,
            "seconds": seconds, "status": status, "reason": reason, "metrics": metrics or {},
            "tolerance": tolerance or {}}


def per_set(scale: float = 2e-6, spike: float | None = None) -> dict:
    sets = {}
    for name, n in {"single": 1, "short": 8, "long": 40}.items():
        values = [scale * (1 + (i % 5) / 4) for i in range(n)]
        if spike is not None and name == "long":
            values[17] = spike
        worst = max(values)
        sets[name] = {"positions": n, "sequences": 1, "max_abs_logprob": worst, "mean_abs_logprob": scale,
                      "top1_agreement": 1.0, "topk_overlap": 1.0, "greedy_equal": 1.0,
                      "mean_exp_abs_logprob": 1.0000008, "worst_position": values.index(worst),
                      "per_position_max_abs": values}
    return sets


def logits_metrics(scale: float = 2e-6, spike: float | None = None, calibration: dict | None = None) -> dict:
    sets = per_set(scale, spike)
    out = {"max_abs_logprob": max(m["max_abs_logprob"] for m in sets.values()), "mean_abs_logprob": scale,
           "top1_agreement": 1.0, "topk_overlap": 1.0, "greedy_equal": 1.0, "mean_exp_abs_logprob": 1.0000008,
           "per_set": sets}
    if calibration:
        out["calibration"] = calibration
    return out


def cert(model: str, rows: list[dict], created: str = "2026-11-23T11:03:07+00:00") -> dict:
    out = certificate.build(model, "ab" * 32, {"torch": "2.13.0+cpu", "vllm": "not installed"}, rows,
                            f"pytest --model {model}", f"/specs/{model}.yaml")
    out["created"] = created
    return out


def certified_cert(model: str = "tiny") -> dict:
    return cert(model, [
        row(f"{model}/hf/hf/load/float32", "passed", metrics={"class": "Qwen2ForCausalLM", "parameters": 427136},
            tolerance={"missing_keys": 0, "unexpected_keys": 0}),
        row(f"{model}/config/megatron", "passed",
            metrics={"counts": {"ignored": 18, "mapped": 12}, "keys": {"hidden_size": {"hf": 128, "backend": 128,
                                                                                          "state": "mapped"}}},
            tolerance={"unmapped": 0, "mismatch": 0}),
        row(f"{model}/roundtrip/megatron/bit-exact/float32", "passed",
            metrics={"tensors": 27, "max_abs_diff": 0.0, "differing_tensors": 0},
            tolerance={"roundtrip_max_abs_diff": 0.0}),
        row(f"{model}/logits/megatron/float32/tp1pp1", "passed", metrics=logits_metrics(), tolerance=LOGIT_TOL),
        row(f"{model}/logits/megatron/float32/tp2pp1", "passed", metrics=logits_metrics(3e-6), tolerance=LOGIT_TOL),
    ])


EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def failed_cert(model: str = "broken") -> dict:
    bf16_tol = {**LOGIT_TOL, "max_abs_logprob": 0.05, "mean_abs_logprob": 0.01}
    return cert(model, [
        row(f"{model}/hf/hf/load/float32", "passed", metrics={"parameters": 10}, tolerance={"missing_keys": 0}),
        row(f"{model}/config/megatron", "failed", reason=f"1 mismatch: rope_theta {EVIL}",
            metrics={"counts": {"mismatch": 1}}, tolerance={"mismatch": 0}),
        row(f"{model}/logits/megatron/float32/tp1pp1", "passed", metrics=logits_metrics(), tolerance=LOGIT_TOL),
        row(f"{model}/logits/megatron/float32/tp2pp1", "failed",
            reason="1 logit parity violations: tp2pp1 float32 prompt set 'long': max_abs_logprob = 0.3 > 0.0001",
            metrics=logits_metrics(spike=0.3), tolerance=LOGIT_TOL),
        row(f"{model}/logits/megatron/bfloat16/tp1pp1", "passed",
            metrics=logits_metrics(4e-3, calibration={"method": "2 x HF-bf16 vs HF-fp32 noise",
                                                       "noise": {"max_abs_logprob": 0.025, "top1_agreement": 0.98}}),
            tolerance=bf16_tol),
        row(f"{model}/logits/megatron/bfloat16/tp2pp1", "error",
            reason="WorkerError: megatron worker died\nTraceback (most recent call last):\n  File \"x.py\"\n"
                   + "    " + "frame\n" * 60 + EVIL),
        row(f"{model}/roundtrip/megatron/bit-exact/float32", "passed", metrics={"max_abs_diff": 0.0},
            tolerance={"roundtrip_max_abs_diff": 0.0}),
    ])


def incomplete_cert(model: str = "partial") -> dict:
    return cert(model, [
        row(f"{model}/hf/hf/load/float32", "passed", metrics={"parameters": 10}, tolerance={"missing_keys": 0}),
        row(f"{model}/logits/megatron/float32/tp1pp1", "passed", metrics=logits_metrics(), tolerance=LOGIT_TOL),
        row(f"{model}/logits/vllm/float32", "not_run", reason="no 'vllm' backend module in this harness version yet"),
        row(f"{model}/logits/megatron/bfloat16/tp1pp1", "not_run",
            reason="not selected by --backend/--dtype in this run"),
        row(f"{model}/train/megatron/float32/tp1pp1", "not_run",
            reason="the 'megatron' backend does not implement the 'train' suite yet"),
        row(f"{model}/train/deepspeed/float32", "not_run", reason="no 'deepspeed' backend module in this harness "
                                                                  "version yet"),
    ])


# ---------------------------------------------------------------- a small HTML structure reader


class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.external: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text_parts: list[str] = []
        self.titles: list[str] = []
        self.feed(text)
        self.close()
        if self.stack:
            self.problems.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.append(a["id"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if "title" in a:
            self.titles.append(a["title"])
        for key in ("href", "src", "xlink:href", "action", "data"):
            if key in a and not (a[key].startswith("#") or "://" not in a[key] and not a[key].startswith("//")):
                self.external.append(a[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:]}")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()

    def handle_data(self, data):
        if not self.stack or self.stack[-1] not in {"style", "title"}:
            self.text_parts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.text_parts).split())

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(1 for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split()))

    def by_class(self, cls: str) -> list[dict[str, str]]:
        return [a for _t, a in self.tags if cls in a.get("class", "").split()]


def check_page(text: str, cert_: dict | None = None) -> Page:
    """What every rendered page must satisfy: well nested, offline, no scripts, internal links resolve."""
    page = Page(text)
    assert not page.problems, page.problems[:5]
    assert text.lstrip().lower().startswith("<!doctype html>")
    assert "http://" not in text and "https://" not in text
    assert not page.external, page.external
    assert page.count("script") == 0 and page.count("link") == 0 and page.count("iframe") == 0
    assert not [a for _t, a in page.tags if any(k.startswith("on") for k in a)]  # no event handlers
    assert len(page.ids) == len(set(page.ids)), "duplicate element ids"
    for href in page.hrefs:
        if href.startswith("#"):
            assert href[1:] in page.ids, f"broken anchor {href}"
    if cert_ is not None:
        for c in cert_["checks"]:
            assert c["id"] in page.text, c["id"]
    return page


def banner(page: Page) -> str:
    tags = page.by_class("banner")
    assert len(tags) == 1
    return tags[0]["class"]


# ---------------------------------------------------------------- the model page


def test_certified_page():
    c = certified_cert()
    text = render_model_page(c)
    page = check_page(text, c)
    assert "banner-certified" in banner(page)
    assert "certified every planned check passed" in page.text
    assert page.count("svg") == 2  # one chart per logits check with per-token data
    assert page.count("figure", "plot") == 2
    # metrics next to their tolerance, with the direction of the bound
    assert "max_abs_logprob 4e-06 ✓ ≤ 0.0001" in page.text
    assert "top1_agreement 1 ✓ ≥ 1" in page.text
    assert "mean_exp_abs_logprob 1.000001 ✓ ≤ 1.0001" in page.text  # never rounded to a misleading "1"
    assert "max_abs_diff 0 ✓ ≤ 0" in page.text  # roundtrip_max_abs_diff pairs with max_abs_diff
    assert "missing_keys — ≤ 0" in page.text  # a bound with no metric of its name is still shown
    assert "parameters 427,136" in page.text
    # nested dicts are summarized, not dumped
    assert "counts: ignored: 18; mapped: 12" in page.text
    assert "per_set: 3 entries: single, short, long" in page.text
    assert "What failed" not in page.text
    for expected in ("2026-11-23 11:03:07 UTC", "ab" * 32, "pytest --model tiny", "torch", "2.13.0+cpu"):
        assert expected in page.text, expected


def test_matrix_has_one_cell_per_suite_variant_and_backend():
    c = certified_cert()
    page = check_page(render_model_page(c), c)
    heads = [a for t, a in page.tags if t == "th"]
    assert heads  # matrix header: backends in first-seen order
    text = page.text
    assert "suite / check hf megatron" in text
    cells = page.by_class("cell")
    assert len(cells) == 5 - 1  # two logits checks share the logits x megatron cell
    dots = page.by_class("dot")
    assert len([d for d in dots if "href" in d]) == 2  # the shared cell: one linked square per check
    assert "2 passed" in text


def test_failed_page_escapes_and_lists_failures():
    c = failed_cert()
    text = render_model_page(c)
    page = check_page(text, c)
    assert "banner-failed" in banner(page)
    assert "<script" not in text and "<img" not in text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
    assert EVIL in page.text  # the reason is shown, as text
    assert any(EVIL in title for title in page.titles)  # and in the tooltips, escaped in the attribute
    problems = page.by_class("problems")
    assert problems
    failed = "What failed failed broken/config/megatron : 1 mismatch"
    assert failed in page.text
    assert "error broken/logits/megatron/bfloat16/tp2pp1 : WorkerError: megatron worker died" in page.text
    # the violated bound is marked
    assert "max_abs_logprob 0.3 ✗ ≤ 0.0001" in page.text
    assert page.by_class("bad")
    # a long traceback folds away behind its first line
    assert page.count("details") >= 1 and page.count("pre") >= 2
    # the shared logits x megatron cell counts its checks
    assert "2 passed · 1 failed · 1 error" in page.text
    # one chart per logits check with data (the errored one has none); bf16 shows its calibration noise
    assert page.count("svg") == 3
    assert "calibration noise" in text and ">tolerance<" in text
    cell_titles = [a.get("title", "") for a in page.by_class("cell")]
    assert any("1 mismatch: rope_theta" in t for t in cell_titles)


def test_incomplete_page_shows_why_not_run():
    c = incomplete_cert()
    page = check_page(render_model_page(c), c)
    assert "banner-incomplete" in banner(page)
    assert "no check failed, but not every planned check was run" in page.text
    assert "2 passed 4 not run of 6 planned checks" in page.text
    for reason in ("no 'vllm' backend module in this harness version yet",
                   "not selected by --backend/--dtype in this run",
                   "the 'megatron' backend does not implement the 'train' suite yet"):
        assert f"1 × {reason}" in page.text
    not_run_cells = [a for a in page.by_class("cell") if "not_run" in a["class"].split()]
    assert len(not_run_cells) == 3  # vllm logits, megatron train, deepspeed train
    assert page.count("svg") == 1


def test_empty_and_minimal_certificates_render():
    page = check_page(render_model_page({"model": "x", "verdict": "incomplete", "checks": []}))
    assert "This certificate lists no checks." in page.text
    page = check_page(render_model_page({"model": "y"}))
    assert "banner-incomplete" in banner(page)


def test_plots_handle_zero_nan_and_future_metrics():
    metrics = logits_metrics()
    metrics["per_set"]["short"]["per_position_max_abs"] = [0.0, 0.0, 1e-6, float("nan"), float("inf"), 2e-6, 0, 0]
    metrics["loss_curve"] = {"reference": [2.5, 2.1, 1.8, 1.6], "backend": [2.5, 2.1, 1.81, 1.6]}
    loss_only = {"loss_curve": {"reference": [3.0, 2.0], "backend": [3.0, 2.01]}, "max_loss_diff": 0.01}
    layer_dicts = {"per_layer": [{"layer": i, "max_abs": 10.0 ** (-6 + i), "mean_abs": 10.0 ** (-7 + i)}
                                 for i in range(4)]}
    c = cert("future", [
        row("future/logits/megatron/float32/tp1pp1", "passed", metrics=metrics, tolerance=LOGIT_TOL),
        row("future/train/megatron/float32/tp1pp1", "passed", metrics=loss_only, tolerance={"max_loss_diff": 0.02}),
        row("future/train/megatron/float32/tp2pp1", "passed", metrics={"per_layer": [1e-6, 2e-6, None, 4e-5]}),
        row("future/train/megatron/float32/tp1pp2", "failed", reason="layer 3", metrics=layer_dicts,
            tolerance={"max_per_layer_abs": 1e-4}),
        row("future/train/megatron/float32/tp2pp2", "passed", metrics={"per_layer": [], "loss_curve": {}}),
    ])
    text = render_model_page(c)
    page = check_page(text, c)
    # logits + its loss curve and |Δ loss|, another loss curve and |Δ loss|, two per-layer charts; none for empties
    assert page.count("svg") == 7
    assert "training loss per step" in text and "|Δ loss| per step" in text and "per-layer divergence" in text
    assert "tolerance max_loss_diff" in text
    assert "tolerance max_per_layer_abs" in text
    assert "nan" in text and "inf" in text  # non-finite points are marked, not dropped silently
    assert "max_loss_diff 0.01 ✓ ≤ 0.02" in page.text


def test_value_formatting():
    assert report.fmt(1.0000008) == "1.000001"
    assert report.fmt(0.99999) == "0.99999"
    assert report.fmt(1.0) == "1"
    assert report.fmt(6.67572021484375e-06) == "6.676e-06"
    assert report.fmt(0.0) == "0"
    assert report.fmt(427136) == "427,136"
    assert report.fmt(float("nan")) == "nan"
    assert report.fmt(True) == "true" and report.fmt(None) == "—"
    assert report.summarize([1.0, 2.0, float("nan")] * 4) == "12 values, max 2, 4 non-finite"
    assert report.summarize({}) == "{}"
    assert report.created_text("2026-11-23T11:03:07+00:00") == "2026-11-23 11:03:07 UTC"
    assert report.created_text("yesterday") == "yesterday"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metrics=st.dictionaries(st.text(max_size=12), json_values, max_size=6),
       tolerance=st.dictionaries(st.text(max_size=12), st.floats(allow_nan=False) | st.integers(), max_size=4),
       reason=st.text(max_size=60), status=st.sampled_from(["passed", "failed", "error", "not_run", "weird<>"]))
def test_any_json_metrics_render_escaped(metrics, tolerance, reason, status):
    c = cert("fuzz", [row("fuzz/logits/megatron/float32/tp1pp1", status, reason, metrics, tolerance),
                      row("fuzz/config/vllm", "not_run", "<b>bold</b>")])
    text = render_model_page(c)
    check_page(text, c)
    assert "<b>bold</b>" not in text


# ---------------------------------------------------------------- writing: certificate.write and the overview


def test_certificate_write_renders_pages_and_the_index(tmp_path):
    reports = tmp_path / "reports"
    certificate.write(certified_cert("alpha"), reports)
    assert {p.name for p in (reports / "alpha").iterdir()} == {"certificate.json", "summary.md", "index.html"}
    certificate.write(failed_cert("beta"), reports)
    (reports / "gamma").mkdir()
    (reports / "gamma" / "certificate.json").write_text("{not json")
    (reports / "no-certificate").mkdir()
    (reports / "no-certificate" / "notes.txt").write_text("x")

    certificate.write(certified_cert("alpha"), reports)  # a later run of one model keeps the others listed
    index = (reports / "index.html").read_text()
    page = check_page(index)
    assert [a["href"] for t, a in page.tags if t == "a" and a.get("href", "").endswith("index.html")] == [
        "alpha/index.html", "alpha/index.html", "beta/index.html", "beta/index.html"]
    rows = page.by_class("model-row")
    assert len(rows) == 3  # alpha, beta, and the unreadable gamma; the folder without a certificate is not listed
    assert "3 models: 1 certified 1 failed 1 unreadable" in page.text
    assert "alpha certified 5 passed of 5" in page.text
    assert "beta failed 4 passed 2 failed 1 error of 7" in page.text
    assert "gamma unreadable" in page.text and "gamma/certificate.json" in page.hrefs
    for model in ("alpha", "beta"):  # each page links back to the overview and to its own files
        model_page = check_page((reports / model / "index.html").read_text())
        assert {"../index.html", "certificate.json", "summary.md"} <= set(model_page.hrefs)


def test_scan_uses_the_certificate_not_the_folder_for_counts(tmp_path):
    for name, c in (("one", certified_cert("one")), ("two", incomplete_cert("two"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "certificate.json").write_text(json.dumps(c))
    entries = scan(tmp_path)
    assert [(e["model"], e["verdict"], e["total"], e["has_page"]) for e in entries] == [
        ("one", "certified", 5, False), ("two", "incomplete", 6, False)]
    page = check_page(render_index(entries))
    assert "one/certificate.json" in page.hrefs  # no page yet: the link goes to the JSON
    assert check_page(render_index([])).text.count("No certificates yet") == 1


def test_pages_come_from_the_json_round_trip(tmp_path):
    c = certified_cert("paths")
    c["checks"][0]["metrics"]["where"] = tmp_path  # not JSON: certificate.json stores str(value)
    page_path, index_path = write_pages(c, tmp_path)
    assert str(tmp_path) in page_path.read_text() and index_path.exists()


def test_a_rendering_failure_never_costs_the_certificate(tmp_path, monkeypatch, capsys):
    import harness.report

    def boom(*_args):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(harness.report, "write_pages", boom)
    out = certificate.write(certified_cert("safe"), tmp_path)
    assert (out / "certificate.json").exists() and (out / "summary.md").exists()
    assert not (out / "index.html").exists()
    assert "HTML report for 'safe' not written: RuntimeError: template exploded" in capsys.readouterr().err


# ---------------------------------------------------------------- a real browser


def _chromium(*args: str, profile: str) -> subprocess.Popen:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.Popen([str(CHROMIUM), *flags, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("chromium did not finish in time")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_page(tmp_path):
    c = failed_cert("browser")
    page_path, _index = write_pages(c, tmp_path)
    url = page_path.resolve().as_uri()
    shot = tmp_path / "page.png"
    with tempfile.TemporaryDirectory() as p1, tempfile.TemporaryDirectory() as p2:
        screenshot = _chromium(f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars", url, profile=p1)
        dump = _chromium("--dump-dom", "--enable-logging=stderr", "--v=0", url, profile=p2)
        dom, log = _finish(dump)
        _finish(screenshot)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000, "a near-empty screenshot: the page did not paint"
    # the DOM the browser built holds the verdict, the matrix, every check and the charts
    assert 'class="banner banner-failed"' in dom
    assert 'class="grid matrix"' in dom
    for check in c["checks"]:
        assert check["id"] in dom
    assert dom.count("<svg") == 3
    assert "<script" not in dom
    page_lines = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line
                  or "net::ERR" in line or "Not allowed to load" in line]
    assert not page_lines, page_lines
