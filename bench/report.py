"""The benchmark's figures and how they are shown: one table, a JSON file, PNG charts.

A ``Figure`` is one measured value of dbtunneld (or of a plain path such as direct TCP) next to
its reference measured in the same run (OpenSSH ``ssh -L``, direct TCP...), with the unit, which
direction is better, and the target from the issues. ``render_table`` prints them grouped by
section; ``write_json`` and ``write_charts`` write ``bench/results/``. Charts are drawn with
Pillow (the `bench` extra), so the benchmark needs no plotting library.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    section: str
    name: str                      # what is measured, e.g. "download MB/s"
    subject: str                   # whose figure, e.g. "dbtunneld ssh mode"
    value: float | None
    unit: str = ""
    reference: str = ""            # e.g. "OpenSSH ssh -L"
    ref_value: float | None = None
    higher_is_better: bool = True
    target: str = ""               # e.g. ">= 0.7x" or "< 15 s"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ref_value or self.ref_value <= 0:
            return None
        return self.value / self.ref_value


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)      # stages that could not run, and why
    series: dict[str, Any] = field(default_factory=dict)    # extra data for the charts
    headline: dict[str, Any] = field(default_factory=dict)  # top-level keys of bench.json

    def add(self, figures: Iterable[Figure]) -> None:
        self.figures.extend(figures)

    def to_json(self) -> dict[str, Any]:
        figures = [dict(asdict(f), ratio=_round(f.ratio, 3)) for f in self.figures]
        return {**self.headline, "meta": self.meta, "figures": figures, "failures": self.failures,
                "series": self.series}


# ---------------------------------------------------------------------------- the table

def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value) and magnitude < 1e6:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip()


def _ratio_text(f: Figure) -> str:
    r = f.ratio
    return "" if r is None else f"{r:.2f}x"


COLUMNS = ("figure", "dbtunneld / path", "value", "reference", "ref value", "ratio", "target")


def _row(f: Figure) -> tuple[str, ...]:
    return (f.name, f.subject, fmt(f.value, f.unit), f.reference, fmt(f.ref_value, f.unit) if f.reference else "",
            _ratio_text(f), f.target)


def render_table(results: Results) -> str:
    """One table, a block per section; notes under their section."""
    rows_by_section: dict[str, list[Figure]] = {}
    for f in results.figures:
        rows_by_section.setdefault(f.section, []).append(f)
    body = [_row(f) for f in results.figures]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(COLUMNS), line(["-" * w for w in widths])]
    for section, figures in rows_by_section.items():
        out += ["", f"[{section}]"]
        out += [line(_row(f)) for f in figures]
        out += [f"    note: {f.subject}: {f.note}" for f in figures if f.note]
    if results.failures:
        out += ["", "[not measured]"] + [f"    {text}" for text in results.failures]
    return "\n".join(out)


def write_json(results: Results, directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench.json"
    path.write_text(json.dumps(results.to_json(), indent=2, default=str))
    return path


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------- charts (Pillow)

W, H = 1100, 560
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 90, 30, 60, 150
PALETTE = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193),
           (255, 112, 67), (120, 144, 156)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:                   # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _canvas(title: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN_L, 18), title, fill="black", font=_font(20))
    return img, draw


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _ticks(top: float, log_scale: bool) -> list[tuple[float, float]]:
    """(fraction of the axis height, value) for the grid lines: decades on a log axis."""
    if log_scale:
        decades = max(1, round(math.log10(top)))
        return [(i / decades, 10.0 ** i) for i in range(decades + 1)]
    return [(i / 5, top * i / 5) for i in range(6)]


def _y_axis(draw, top: float, unit: str, log_scale: bool = False) -> None:
    x0, y0, y1 = MARGIN_L, H - MARGIN_B, MARGIN_T
    draw.line([(x0, y0), (x0, y1)], fill="black")
    draw.line([(x0, y0), (W - MARGIN_R, y0)], fill="black")
    for frac, value in _ticks(top, log_scale):
        y = y0 - frac * (y0 - y1)
        draw.line([(x0 - 4, y), (W - MARGIN_R, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), fmt(value), fill="black", font=_font(12))
    draw.text((8, y1 - 30), unit, fill="black", font=_font(13))


def _log_top(value: float) -> float:
    return 10.0 ** max(1, math.ceil(math.log10(max(value, 1.0))))


def _bar_height(value: float, top: float, log_scale: bool) -> float:
    span = H - MARGIN_B - MARGIN_T
    if value <= 0:
        return 0.0
    if log_scale:
        return span * max(0.0, math.log10(max(value, 1.0))) / math.log10(top)
    return span * value / top


def bar_chart(path: Path, title: str, groups: list[str], series: dict[str, list[float | None]], unit: str,
              log_scale: bool = False) -> Path:
    """Grouped bars: one group per x label, one bar (and colour) per series."""
    img, draw = _canvas(title)
    values = [v for vs in series.values() for v in vs if v]
    biggest = max(values) if values else 1.0
    top = _log_top(biggest) if log_scale else _nice_max(biggest)
    _y_axis(draw, top, unit + (" (log)" if log_scale else ""), log_scale)
    slot = (W - MARGIN_L - MARGIN_R) / max(1, len(groups))
    bar_w = slot * 0.8 / max(1, len(series))
    for gi, group in enumerate(groups):
        gx = MARGIN_L + gi * slot + slot * 0.1
        for si, (name, vs) in enumerate(series.items()):
            v = vs[gi] if gi < len(vs) else None
            if v is None:
                continue
            x = gx + si * bar_w
            h = _bar_height(v, top, log_scale)
            draw.rectangle([x, H - MARGIN_B - h, x + bar_w - 2, H - MARGIN_B], fill=PALETTE[si % len(PALETTE)])
            draw.text((x, H - MARGIN_B - h - 14), fmt(v), fill="black", font=_font(10))
        draw.multiline_text((gx, H - MARGIN_B + 8), group, fill="black", font=_font(13))
    _legend(draw, list(series), H - MARGIN_B + 60)
    img.save(path)
    return path


def line_chart(path: Path, title: str, xs: list[float], series: dict[str, list[float | None]], unit: str,
               x_label: str) -> Path:
    """Lines with dots: one per series, over the shared x values."""
    img, draw = _canvas(title)
    values = [v for vs in series.values() for v in vs if v is not None]
    top = _nice_max(max(values) if values else 1.0)
    _y_axis(draw, top, unit)
    x_max = max(xs) if xs else 1.0
    span_x = W - MARGIN_L - MARGIN_R - 40
    px = lambda x: MARGIN_L + 20 + span_x * x / x_max  # noqa: E731
    for x in xs:
        draw.text((px(x) - 6, H - MARGIN_B + 8), fmt(x), fill="black", font=_font(13))
    draw.text((W // 2 - 60, H - MARGIN_B + 28), x_label, fill="black", font=_font(13))
    for si, (name, vs) in enumerate(series.items()):
        colour = PALETTE[si % len(PALETTE)]
        points = [(px(x), H - MARGIN_B - _bar_height(v, top, False)) for x, v in zip(xs, vs) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for (x, y), v in zip(points, [v for v in vs if v is not None]):
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
            draw.text((x + 8, y - 18 if si % 2 == 0 else y + 4), fmt(v), fill=colour, font=_font(11))
    _legend(draw, list(series), H - MARGIN_B + 60)
    img.save(path)
    return path


def _legend(draw, names: list[str], y: float) -> None:
    x = MARGIN_L
    for i, name in enumerate(names):
        draw.rectangle([x, y, x + 14, y + 14], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 20, y), name, fill="black", font=_font(13))
        x += 30 + 8 * len(name)
        if x > W - 200:
            x, y = MARGIN_L, y + 22
