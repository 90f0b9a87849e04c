"""Check built archives: the wheel and the sdist carry every template and icon of the source tree,
``__main__`` and the console script. Usage: python packaging/check_dist.py DIST_DIR (exit 1 and a
list of what is missing otherwise). Stdlib only, so it runs with any Python."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_data() -> list[str]:
    """Package data in the source tree, as paths inside the package (``dbtunneld/...``)."""
    pkg = ROOT / "dbtunneld"
    files = sorted(pkg.glob("templates/*")) + sorted(pkg.glob("icons/*.png"))
    return [f"dbtunneld/{p.relative_to(pkg).as_posix()}" for p in files if p.is_file()]


def wheel_problems(wheel: Path, expected: list[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next((z.read(n).decode() for n in names if n.endswith("entry_points.txt")), "")
    problems = [f"{wheel.name}: missing {n}" for n in expected + ["dbtunneld/__main__.py"]
                if n not in names]
    if "dbtunneld = dbtunneld.ui.cli:main" not in entry_points:
        problems.append(f"{wheel.name}: no console script `dbtunneld = dbtunneld.ui.cli:main`")
    return problems


def sdist_problems(sdist: Path, expected: list[str]) -> list[str]:
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = expected + ["setup.cfg", "pyproject.toml", "MANIFEST.in", "packaging/build.sh"]
    return [f"{sdist.name}: missing {n}" for n in wanted if n not in names]


def main(dist: str) -> int:
    expected = package_data()
    problems = [] if any(n.endswith(".png") for n in expected) else ["no dbtunneld/icons/*.png in the tree"]
    wheels, sdists = sorted(Path(dist).glob("*.whl")), sorted(Path(dist).glob("*.tar.gz"))
    if not wheels or not sdists:
        problems.append(f"{dist}: expected a .whl and a .tar.gz")
    for w in wheels:
        problems += wheel_problems(w, expected)
    for s in sdists:
        problems += sdist_problems(s, expected)
    for p in problems:
        print(f"check_dist: {p}", file=sys.stderr)
    if not problems:
        print(f"check_dist: ok ({len(expected)} data files in {len(wheels)} wheel(s) and {len(sdists)} sdist(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "dist")))
