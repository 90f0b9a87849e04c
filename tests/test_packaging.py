"""Packaging: packaging/build.sh builds the sdist and a wheel from it (offline, in a copy of the
tree), the archives carry the icons and templates, and the wheel installed into a fresh venv runs
`dbtunneld --version`, `python -m dbtunneld --version` and writes login items pointing at itself."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from dbtunneld import __version__

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", ".hypothesis", "test-artifacts", "results", ".ci")


def run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "DBTUNNELD", "XDG_", "DISPLAY", "DBUS"))}
    return {**env, **extra}


def source_pngs() -> list[str]:
    pngs = sorted(p.name for p in (ROOT / "dbtunneld" / "icons").glob("*.png"))
    assert pngs, "no dbtunneld/icons/*.png in the tree: the tray icons must ship as package data"
    return pngs


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """packaging/build.sh --no-isolation, run in a copy of the tree (the shared tree stays clean)."""
    tree = tmp_path_factory.mktemp("tree") / "dbtunneld-src"
    shutil.copytree(ROOT, tree, ignore=SKIP)
    out = tmp_path_factory.mktemp("dist")
    r = run([str(tree / "packaging" / "build.sh"), "--no-isolation", "--outdir", str(out)],
            env=clean_env(PYTHON=sys.executable), cwd=tree)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "check_dist: ok" in r.stdout
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel (--no-deps: --version and autostart import nothing else)."""
    v = tmp_path_factory.mktemp("venv") / "fresh venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True)
    wheel = next(dist.glob("*.whl"))
    r = run([sys.executable, "-m", "pip", "--python", str(v / "bin" / "python"), "install", "-q",
             "--no-deps", "--no-index", str(wheel)], env=clean_env())
    assert r.returncode == 0, r.stderr
    return v


def test_wheel_carries_icons_templates_and_the_entry_points(dist: Path) -> None:
    wheel = next(dist.glob(f"dbtunneld-{__version__}-py3-none-any.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(f"dbtunneld-{__version__}.dist-info/entry_points.txt").decode()
    for png in source_pngs():
        assert f"dbtunneld/icons/{png}" in names
    for tpl in ("launchd.plist", "autostart.desktop", "dbtunneld.service"):
        assert f"dbtunneld/templates/{tpl}" in names
    assert "dbtunneld/__main__.py" in names and "dbtunneld = dbtunneld.ui.cli:main" in entry_points


def test_sdist_carries_what_a_rebuild_needs(dist: Path) -> None:
    with tarfile.open(next(dist.glob("*.tar.gz"))) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = ["setup.cfg", "pyproject.toml", "MANIFEST.in", "packaging/build.sh",
              "packaging/README.md", "dbtunneld/templates/dbtunneld.service"]
    wanted += [f"dbtunneld/icons/{p}" for p in source_pngs()]
    assert not [n for n in wanted if n not in names]


def test_installed_wheel_runs_version(venv: Path, tmp_path: Path) -> None:
    expected = f"dbtunneld {__version__}"
    for argv in ([str(venv / "bin" / "dbtunneld"), "--version"],
                 [str(venv / "bin" / "python"), "-m", "dbtunneld", "--version"]):
        r = run(argv, env=clean_env(), cwd=tmp_path)  # cwd outside the tree: no source import
        assert (r.returncode, r.stdout.strip()) == (0, expected), r.stderr


def test_installed_wheel_writes_login_items_pointing_at_itself(venv: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = clean_env(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "cfg"),
                    XDG_RUNTIME_DIR=str(run_dir), DISPLAY=":99")
    cli = [str(venv / "bin" / "dbtunneld"), "autostart"]
    r = run([*cli, "enable", "--mode", "tray", "--no-start"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    entry = (tmp_path / "cfg" / "autostart" / "dbtunneld.desktop").read_text().splitlines()
    assert f'Exec="{venv / "bin" / "dbtunneld"}" tray' in entry, entry  # quoted: "fresh venv"
    icon = Path(next(line for line in entry if line.startswith("Icon="))[5:])
    assert icon.is_file() and venv in icon.parents, icon  # the installed copy, not the tree
    r = run([*cli, "enable", "--mode", "daemon", "--no-start"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = (tmp_path / "cfg" / "systemd" / "user" / "dbtunneld.service").read_text()
    assert f'ExecStart="{venv / "bin" / "dbtunneld"}" "daemon"' in unit.splitlines()
    assert run([*cli, "disable"], env=env, cwd=tmp_path).returncode == 0


def test_check_dist_catches_a_wheel_without_icons(dist: Path, tmp_path: Path) -> None:
    """Negative control for packaging/check_dist.py, which build.sh runs."""
    spec = importlib.util.spec_from_file_location("check_dist", ROOT / "packaging" / "check_dist.py")
    check_dist = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(check_dist)  # type: ignore[union-attr]
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(next(dist.glob("*.tar.gz")), bad)
    with zipfile.ZipFile(next(dist.glob("*.whl"))) as src, \
            zipfile.ZipFile(bad / "dbtunneld-0-py3-none-any.whl", "w") as dst:
        for item in src.infolist():
            if "/icons/" not in item.filename:
                dst.writestr(item, src.read(item))
    assert check_dist.main(str(dist)) == 0
    assert check_dist.main(str(bad)) == 1
