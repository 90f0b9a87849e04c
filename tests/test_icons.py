"""Icons: the shipped artwork and PNGs are exactly what packaging/render_icons.py produces.

The SVGs in assets/ must equal the script's output byte for byte; the PNGs are compared pixel
by pixel with a small tolerance (Pillow's resampling may differ by a unit between versions).
When rsvg-convert is installed, the SVG artwork itself is rendered and compared with the PNG,
so the two can never drift apart.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from dbtunneld.core.model import Health

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("render_icons", ROOT / "packaging" / "render_icons.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


render_icons = _load_script()
EXPECTED = render_icons.expected_files()
PNGS = sorted(k for k, v in EXPECTED.items() if not isinstance(v, bytes))
SVGS = sorted(k for k, v in EXPECTED.items() if isinstance(v, bytes))


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    diff = ImageChops.difference(a.convert("RGBA"), b.convert("RGBA"))
    return max(hi for _, hi in diff.getextrema())


def _on_white(image: Image.Image) -> Image.Image:
    base = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(base, image.convert("RGBA")).convert("RGB")


def test_every_state_has_artwork_and_two_png_sizes():
    for state in Health:
        for stem in (state.value, f"template-{state.value}"):
            assert f"assets/{stem}.svg" in SVGS
            assert len([p for p in PNGS if Path(p).name.startswith(stem + "-")]) == 2, stem


@pytest.mark.parametrize("rel", SVGS)
def test_shipped_svg_is_what_the_script_writes(rel):
    shipped = ROOT / rel
    assert shipped.is_file(), f"{rel} missing: run python packaging/render_icons.py"
    assert shipped.read_bytes() == EXPECTED[rel], f"{rel} is stale: run python packaging/render_icons.py"


@pytest.mark.parametrize("rel", PNGS)
def test_shipped_png_matches_the_rendering(rel):
    shipped = Image.open(ROOT / rel)
    expected = EXPECTED[rel]
    assert shipped.size == expected.size
    assert _max_diff(shipped, expected) <= 3, f"{rel} is stale: run python packaging/render_icons.py"


def test_states_look_different():
    images = {rel: EXPECTED[rel] for rel in PNGS if rel.endswith("-64.png")}
    rels = sorted(images)
    for i, a in enumerate(rels):
        for b in rels[i + 1:]:
            assert _max_diff(images[a], images[b]) > 64, f"{a} and {b} look the same"


def test_template_icons_are_black_on_transparent():
    for rel in PNGS:
        if "/template-" not in rel:
            continue
        image = EXPECTED[rel]
        r, g, b, a = image.split()
        assert a.getextrema()[1] > 200, rel                            # something is drawn
        for channel in (r, g, b):
            assert channel.getextrema()[1] == 0, f"{rel} has colour; macOS template images must be black"


def test_icons_are_package_data():
    icons = importlib.resources.files("dbtunneld") / "icons"
    for rel in PNGS:
        with (icons / Path(rel).name).open("rb") as f:
            assert Image.open(f).size[0] in render_icons.COLOR_SIZES + render_icons.TEMPLATE_SIZES
    setup_cfg = (ROOT / "setup.cfg").read_text()
    assert "icons/*.png" in setup_cfg


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(_on_white(a), _on_white(b))).mean) / 3


@pytest.mark.skipif(not shutil.which("rsvg-convert"), reason="rsvg-convert (librsvg2-bin) is not installed")
@pytest.mark.parametrize("stem", sorted(render_icons.artwork()))
def test_svg_artwork_renders_like_the_png(stem, tmp_path):
    size = 128                    # large enough that anti-aliasing at the edges stays small
    out = tmp_path / f"{stem}.png"
    subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), "-o", str(out),
                    str(ROOT / "assets" / f"{stem}.svg")], check=True, timeout=30)
    art = render_icons.artwork()
    theirs = Image.open(out)
    same = _mean_diff(render_icons.render(art[stem], size), theirs)
    assert same < 4.0, f"{stem}: the SVG and the PNG differ (mean {same:.1f}/255)"
    other = next(s for s in sorted(art) if s != stem and s.startswith("template-") == stem.startswith("template-"))
    assert _mean_diff(render_icons.render(art[other], size), theirs) > 2 * same, "the comparison cannot tell states apart"
