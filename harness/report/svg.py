"""Small, dependency-free SVG line charts for the HTML certificate (inline markup, no scripts, no URLs).

Values may be zero, NaN or infinite (a broken backend produces exactly those): on a log axis zeros are
drawn on the axis floor with hollow markers, and non-finite values as red crosses on the top edge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Sequence

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#9c755f", "#edc948", "#ff9da7", "#bab0ac"]
TOLERANCE_COLOUR = "#cf222e"
REFERENCE_COLOUR = "#57606a"
FONT = "font-family=\"system-ui,-apple-system,'Segoe UI',Roboto,sans-serif\""


@dataclass
class Series:
    name: str
    values: Sequence[float | None]
    x: Sequence[float] | None = None  # default: 0, 1, 2, ...


@dataclass
class HLine:
    value: float
    label: str
    kind: str = "tolerance"  # "tolerance" (red, dashed) or "reference" (grey, dotted)
    detail: str = ""  # the tooltip, when the legend label is short


@dataclass
class VLine:
    """A vertical marker (e.g. the first divergent point of a localization)."""

    x: float
    label: str


@dataclass
class _Frame:
    width: int
    height: int
    left: int = 62
    right: int = 14
    top: int = 14
    bottom: int = 36
    legend_rows: list[list[tuple[str, str, str]]] = field(default_factory=list)  # (label, colour, kind)

    @property
    def plot_w(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> float:
        return self.height - self.top - self.bottom - 16 * len(self.legend_rows)


def _a(text: object) -> str:
    return escape(str(text), quote=True)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        mantissa, exp = f"{v:.0e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{v:.6g}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _legend_layout(items: list[tuple[str, str, str]], width: int) -> list[list[tuple[str, str, str]]]:
    rows: list[list[tuple[str, str, str]]] = [[]]
    used = 0
    for item in items:
        w = 34 + 6.8 * len(item[0])
        if rows[-1] and used + w > width - 20:
            rows.append([])
            used = 0
        rows[-1].append(item)
        used += w
    return [row for row in rows if row]


def line_chart(series: Sequence[Series], *, title: str = "", x_label: str = "", y_label: str = "",
               log_y: bool = False, hlines: Sequence[HLine] = (), width: int = 400, height: int = 230,
               integer_x: bool = True, vlines: Sequence[VLine] = ()) -> str:
    """An inline <svg> line chart; one polyline per series, dashed horizontal lines for bounds."""
    series = [s for s in series if len(s.values)]
    hlines = [h for h in hlines if _finite(h.value) and (h.value > 0 or not log_y)]
    items = [(s.name, PALETTE[i % len(PALETTE)], "series") for i, s in enumerate(series)]
    items += [(h.label, TOLERANCE_COLOUR if h.kind == "tolerance" else REFERENCE_COLOUR, h.kind) for h in hlines]
    frame = _Frame(width, height)
    frame.legend_rows = _legend_layout(items, width)
    frame.height = height + 16 * max(0, len(frame.legend_rows) - 1)

    points = [(s, [(s.x[i] if s.x is not None else i, v) for i, v in enumerate(s.values)]) for s in series]
    xs = [x for _, pts in points for x, _ in pts]
    finite_y = [v for _, pts in points for _, v in pts if _finite(v)] + [h.value for h in hlines]
    has_zero = log_y and any(v <= 0 for v in finite_y)
    if log_y:
        positive = [v for v in finite_y if v > 0]
        lo_v = min(positive) if positive else 1e-12
        hi_v = max(positive) if positive else 1e-12
        lo_e = math.floor(math.log10(lo_v))
        hi_e = math.ceil(math.log10(hi_v))
        if has_zero:
            lo_e -= 1  # room for the "zero" floor below the smallest positive value
        if hi_e <= lo_e:
            hi_e = lo_e + 1
        y_lo, y_hi = float(lo_e), float(hi_e)
        step = max(1, math.ceil((hi_e - lo_e) / 6))
        y_ticks = [(10.0 ** e, float(e)) for e in range(lo_e, hi_e + 1, step)]
    else:
        lo_v = min(finite_y) if finite_y else 0.0
        hi_v = max(finite_y) if finite_y else 1.0
        pad = (hi_v - lo_v) * 0.06 or abs(hi_v) * 0.06 or 1.0
        ticks = nice_ticks(lo_v - pad, hi_v + pad)
        y_lo, y_hi = min(ticks[0], lo_v - pad), max(ticks[-1], hi_v + pad)
        y_ticks = [(t, t) for t in ticks]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1

    def sx(x: float) -> float:
        return frame.left + (x - x_lo) / (x_hi - x_lo) * frame.plot_w

    def ty(v: float) -> float:  # value -> axis coordinate
        if log_y:
            return math.log10(v) if v > 0 else y_lo
        return v

    def sy(a: float) -> float:
        return frame.top + (1 - (a - y_lo) / (y_hi - y_lo)) * frame.plot_h

    out = [f'<svg class="chart" viewBox="0 0 {frame.width} {frame.height}" width="{frame.width}" '
           f'height="{frame.height}" role="img" aria-label="{_a(title)}" {FONT} font-size="11">']
    if title:
        out.append(f"<title>{_a(title)}</title>")
    top, bottom = frame.top, frame.top + frame.plot_h
    left, right = frame.left, frame.left + frame.plot_w
    out.append(f'<rect x="{left}" y="{top}" width="{frame.plot_w:.1f}" height="{frame.plot_h:.1f}" '
               f'fill="#fff" stroke="#d0d7de"/>')
    for value, a in y_ticks:
        y = sy(a)
        if top - 0.5 <= y <= bottom + 0.5:
            out.append(f'<line x1="{left}" x2="{right:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>')
            label = "0" if (log_y and has_zero and a == y_lo) else fmt_tick(value)
            out.append(f'<text x="{left - 6}" y="{y + 3.5:.1f}" text-anchor="end" fill="#57606a">{_a(label)}</text>')
    for t in nice_ticks(x_lo, x_hi, 6):
        if integer_x and t != int(t):
            continue
        x = sx(t)
        if left - 0.5 <= x <= right + 0.5:
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom:.1f}" y2="{bottom + 4:.1f}" stroke="#8c959f"/>')
            out.append(f'<text x="{x:.1f}" y="{bottom + 15:.1f}" text-anchor="middle" fill="#57606a">'
                       f'{_a(fmt_tick(t))}</text>')
    if x_label:
        out.append(f'<text x="{(left + right) / 2:.1f}" y="{bottom + 29:.1f}" text-anchor="middle" '
                   f'fill="#24292f">{_a(x_label)}</text>')
    if y_label:
        cy = (top + bottom) / 2
        out.append(f'<text x="12" y="{cy:.1f}" transform="rotate(-90 12 {cy:.1f})" text-anchor="middle" '
                   f'fill="#24292f">{_a(y_label)}</text>')
    for h in hlines:
        y = sy(ty(h.value))
        colour = TOLERANCE_COLOUR if h.kind == "tolerance" else REFERENCE_COLOUR
        dash = "6 4" if h.kind == "tolerance" else "2 3"
        out.append(f'<line x1="{left}" x2="{right:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
                   f'stroke-width="1.5" stroke-dasharray="{dash}"><title>{_a(h.detail or h.label)}: '
                   f'{_a(fmt_tick(h.value))}</title></line>')
    for v in vlines:
        x = sx(v.x)
        if left - 0.5 <= x <= right + 0.5:
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom:.1f}" stroke="{TOLERANCE_COLOUR}" '
                       f'stroke-width="1.5"><title>{_a(v.label)}</title></line>')
            out.append(f'<text x="{min(x + 4, right - 4):.1f}" y="{top + 12}" fill="{TOLERANCE_COLOUR}" '
                       f'text-anchor="{"start" if x + 4 < right - 90 else "end"}">{_a(v.label)}</text>')
    for i, (s, pts) in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        good = [(x, v) for x, v in pts if _finite(v)]
        segments: list[list[tuple[float, float]]] = [[]]
        for x, v in pts:  # a non-finite value breaks the line
            if _finite(v):
                segments[-1].append((sx(x), sy(ty(v))))
            elif segments[-1]:
                segments.append([])
        peak = max((v for _, v in good), default=float("nan"))
        label = f"{s.name}: {len(pts)} points, max {fmt_tick(peak) if _finite(peak) else 'n/a'}"
        out.append(f'<g class="series"><title>{_a(label)}</title>')
        for seg in segments:
            if len(seg) > 1:
                coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
                out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6" '
                           f'stroke-linejoin="round"/>')
        markers = len(pts) <= 12
        for x, v in pts:
            if not _finite(v):
                cx, cy = sx(x), top + 4
                out.append(f'<path d="M{cx - 4:.1f},{cy - 4:.1f}L{cx + 4:.1f},{cy + 4:.1f}M{cx - 4:.1f},'
                           f'{cy + 4:.1f}L{cx + 4:.1f},{cy - 4:.1f}" stroke="{TOLERANCE_COLOUR}" stroke-width="2">'
                           f'<title>{_a(s.name)} @ {_a(fmt_tick(x))}: {_a(v)}</title></path>')
            elif markers or (log_y and v <= 0):
                hollow = log_y and v <= 0
                fill = "#fff" if hollow else colour
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(ty(v)):.1f}" r="2.6" fill="{fill}" '
                           f'stroke="{colour}"><title>{_a(s.name)} @ {_a(fmt_tick(x))}: {_a(fmt_tick(v))}'
                           f'</title></circle>')
        out.append("</g>")
    y = bottom + 44
    for row in frame.legend_rows:
        x = float(left)
        for label, colour, kind in row:
            dash = {"tolerance": ' stroke-dasharray="6 4"', "reference": ' stroke-dasharray="2 3"'}.get(kind, "")
            out.append(f'<line x1="{x:.1f}" x2="{x + 18:.1f}" y1="{y - 4:.1f}" y2="{y - 4:.1f}" '
                       f'stroke="{colour}" stroke-width="2"{dash}/>')
            out.append(f'<text x="{x + 22:.1f}" y="{y:.1f}" fill="#24292f">{_a(label)}</text>')
            x += 34 + 6.8 * len(label)
        y += 16
    out.append("</svg>")
    return "".join(out)
