#!/usr/bin/env python3
"""Renders the tray icons: one geometry, written as SVG artwork and drawn as PNGs with Pillow.

Each state (idle, ok, partial, degraded, needs_action) has a colour icon (a database cylinder with a
status badge) and a monochrome template variant for the macOS menu bar (black on transparent;
the state is told by the badge's shape). The geometry below is the single source:

    assets/<state>.svg, assets/template-<state>.svg           (artwork, 64x64 user units)
    dbtunneld/icons/<state>-{32,64}.png                       (shipped as package data)
    dbtunneld/icons/template-<state>-{18,36}.png              (macOS menu bar, 1x and 2x)

Run it after changing the geometry:  python packaging/render_icons.py
tests/test_icons.py checks that the shipped files equal what this script produces.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
ICONS = ROOT / "dbtunneld" / "icons"
STATES = ("idle", "ok", "partial", "degraded", "needs_action")
COLOR_SIZES = (32, 64)
TEMPLATE_SIZES = (18, 36)
UNITS = 64                 # the artwork's coordinate box
SUPERSAMPLE = 8            # Pillow draws this much larger, then downsamples (anti-aliasing)


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    fill: str = ""
    stroke: str = ""
    width: float = 0.0


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str


@dataclass(frozen=True)
class Arc:
    """The lower half of an ellipse, stroked (the rim lines of the cylinder)."""

    cx: float
    cy: float
    rx: float
    ry: float
    stroke: str
    width: float


@dataclass(frozen=True)
class Polyline:
    points: tuple[tuple[float, float], ...]
    stroke: str
    width: float


Shape = Ellipse | Rect | Arc | Polyline

BADGE = {"ok": "#2e7d32", "partial": "#2e7d32", "degraded": "#ef8f00", "needs_action": "#c62828", "idle": "#9e9e9e"}
WHITE = "#ffffff"
BLACK = "#000000"


def cylinder(body: str, top: str, rim: str, x0=6.0, x1=42.0, y0=12.0, y1=50.0, ry=6.0) -> list[Shape]:
    cx, rx = (x0 + x1) / 2, (x1 - x0) / 2
    return [
        Rect(x0, y0, x1 - x0, y1 - y0, body),
        Ellipse(cx, y1, rx, ry, fill=body),
        Arc(cx, (y0 + y1) / 2 - 2, rx, ry, rim, 2.5),
        Arc(cx, y1 - 10, rx, ry, rim, 2.5),
        Ellipse(cx, y0, rx, ry, fill=top),
    ]


def badge_symbol(state: str, color: str, cx=47.0, cy=47.0) -> list[Shape]:
    if state == "ok":
        return [Polyline(((cx - 6.5, cy + 0.5), (cx - 2, cy + 5), (cx + 6.5, cy - 4.5)), color, 3.5)]
    if state == "partial":          # up, with some clusters turned off: a pause sign on green
        return [Rect(cx - 5.5, cy - 6, 4, 12, color), Rect(cx + 1.5, cy - 6, 4, 12, color)]
    if state == "degraded":
        return [Ellipse(cx + dx, cy, 2.2, 2.2, fill=color) for dx in (-6.0, 0.0, 6.0)]
    if state == "needs_action":
        return [Rect(cx - 1.9, cy - 9, 3.8, 11, color), Ellipse(cx, cy + 6, 2.2, 2.2, fill=color)]
    return [Rect(cx - 6, cy - 1.75, 12, 3.5, color)]


def color_icon(state: str) -> list[Shape]:
    idle = state == "idle"
    body, top, rim = ("#9e9e9e", "#c7c7c7", "#c7c7c7") if idle else ("#37474f", "#78909c", "#78909c")
    return (cylinder(body, top, rim)
            + [Ellipse(47, 47, 14.5, 14.5, fill=BADGE[state], stroke=WHITE, width=3)]
            + badge_symbol(state, WHITE))


def template_icon(state: str) -> list[Shape]:
    """Black on transparent; the badge's shape (none, dot, ring, '!') tells the state."""
    shapes: list[Shape] = [
        Ellipse(22, 12, 16, 5.5, stroke=BLACK, width=3.5),
        Rect(4.25, 12, 3.5, 36, BLACK),
        Rect(36.25, 12, 3.5, 36, BLACK),
        Arc(22, 48, 16, 5.5, BLACK, 3.5),
        Arc(22, 30, 16, 5.5, BLACK, 3.5),
    ]
    badge = {
        "idle": [],
        "ok": [Ellipse(50, 50, 10, 10, fill=BLACK)],
        "partial": [Rect(43.5, 41, 5, 18, BLACK), Rect(51.5, 41, 5, 18, BLACK)],
        "degraded": [Ellipse(50, 50, 8.5, 8.5, stroke=BLACK, width=3.5)],
        "needs_action": [Rect(47.5, 36, 5, 17, BLACK), Ellipse(50, 59, 3, 3, fill=BLACK)],
    }[state]
    return shapes + badge


def artwork() -> dict[str, list[Shape]]:
    """Every icon by file stem: 'ok', 'template-ok', ..."""
    out = {s: color_icon(s) for s in STATES}
    out.update({f"template-{s}": template_icon(s) for s in STATES})
    return out


# ---- SVG ------------------------------------------------------------------------------------

def _num(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".")


def _paint(fill: str, stroke: str = "", width: float = 0.0) -> str:
    attrs = f' fill="{fill or "none"}"'
    if stroke:
        attrs += f' stroke="{stroke}" stroke-width="{_num(width)}"'
    return attrs


def svg_element(shape: Shape) -> str:
    if isinstance(shape, Ellipse):
        return (f'<ellipse cx="{_num(shape.cx)}" cy="{_num(shape.cy)}" rx="{_num(shape.rx)}" '
                f'ry="{_num(shape.ry)}"{_paint(shape.fill, shape.stroke, shape.width)}/>')
    if isinstance(shape, Rect):
        return (f'<rect x="{_num(shape.x)}" y="{_num(shape.y)}" width="{_num(shape.w)}" '
                f'height="{_num(shape.h)}" fill="{shape.fill}"/>')
    if isinstance(shape, Arc):
        d = (f"M {_num(shape.cx + shape.rx)} {_num(shape.cy)} A {_num(shape.rx)} {_num(shape.ry)} 0 0 1 "
             f"{_num(shape.cx - shape.rx)} {_num(shape.cy)}")
        return f'<path d="{d}"{_paint("", shape.stroke, shape.width)}/>'
    pts = " ".join(f"{_num(x)},{_num(y)}" for x, y in shape.points)
    return (f'<polyline points="{pts}"{_paint("", shape.stroke, shape.width)} '
            f'stroke-linejoin="round" stroke-linecap="round"/>')


def to_svg(shapes: list[Shape], title: str) -> str:
    body = "\n".join("  " + svg_element(s) for s in shapes)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{UNITS}" height="{UNITS}" '
            f'viewBox="0 0 {UNITS} {UNITS}">\n  <title>{title}</title>\n{body}\n</svg>\n')


# ---- Pillow ---------------------------------------------------------------------------------

def render(shapes: list[Shape], size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    k = big / UNITS
    for shape in shapes:
        _draw(draw, shape, k)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _box(cx, cy, rx, ry, k):
    return [(cx - rx) * k, (cy - ry) * k, (cx + rx) * k, (cy + ry) * k]


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, k: float) -> None:
    if isinstance(shape, Ellipse):
        _draw_ellipse(draw, shape, k)
    elif isinstance(shape, Rect):
        draw.rectangle([shape.x * k, shape.y * k, (shape.x + shape.w) * k - 1, (shape.y + shape.h) * k - 1],
                       fill=shape.fill)
    elif isinstance(shape, Arc):
        half = shape.width / 2   # Pillow strokes inside the box; SVG centres the stroke on the path
        draw.arc(_box(shape.cx, shape.cy, shape.rx + half, shape.ry + half, k), 0, 180,
                 fill=shape.stroke, width=round(shape.width * k))
    else:
        _draw_polyline(draw, shape, k)


def _draw_ellipse(draw: ImageDraw.ImageDraw, e: Ellipse, k: float) -> None:
    half = e.width / 2 if e.stroke else 0.0
    if e.stroke:
        draw.ellipse(_box(e.cx, e.cy, e.rx + half, e.ry + half, k), fill=e.stroke)
        inner = _box(e.cx, e.cy, e.rx - half, e.ry - half, k)
        draw.ellipse(inner, fill=e.fill or (0, 0, 0, 0))
    elif e.fill:
        draw.ellipse(_box(e.cx, e.cy, e.rx, e.ry, k), fill=e.fill)


def _draw_polyline(draw: ImageDraw.ImageDraw, p: Polyline, k: float) -> None:
    pts = [(x * k, y * k) for x, y in p.points]
    width = round(p.width * k)
    draw.line(pts, fill=p.stroke, width=width, joint="curve")
    r = p.width * k / 2
    for x, y in (pts[0], pts[-1]):             # round caps, as the SVG says
        draw.ellipse([x - r, y - r, x + r, y + r], fill=p.stroke)


# ---- files ----------------------------------------------------------------------------------

def sizes_for(stem: str) -> tuple[int, ...]:
    return TEMPLATE_SIZES if stem.startswith("template-") else COLOR_SIZES


def expected_files() -> dict[str, bytes | Image.Image]:
    """Relative path -> SVG text bytes or PNG image, everything this script writes."""
    out: dict[str, bytes | Image.Image] = {}
    for stem, shapes in artwork().items():
        out[f"assets/{stem}.svg"] = to_svg(shapes, f"dbtunneld {stem.replace('-', ' ')}").encode()
        for size in sizes_for(stem):
            out[f"dbtunneld/icons/{stem}-{size}.png"] = render(shapes, size)
    return out


def write_all(root: Path = ROOT) -> list[Path]:
    written = []
    for rel, content in expected_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path, "PNG", optimize=True)
        written.append(path)
    return written


def main() -> int:
    for path in write_all():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
