"""The headless daemon and the CLI need no GUI stack (issue 16): ``install_requires`` names none,
and with pystray, Pillow, python-xlib, PyGObject, PyObjC and sshtunnel made unimportable the CLI
answers ``--help`` and ``config check`` and every module below the front-ends imports."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUI_AND_TEST_ONLY = {"pystray", "pillow", "python-xlib", "pygobject", "pyobjc-framework-cocoa", "sshtunnel"}
BLOCKED_MODULES = ("pystray", "PIL", "Xlib", "gi", "AppKit", "objc", "sshtunnel")

BLOCKER = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: headless install)")
        return None
sys.meta_path.insert(0, Blocker())
"""


def _requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(line.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower())
    return names


def test_install_requires_has_no_gui_stack_and_declares_what_the_engine_imports():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = _requirement_names(cfg["options"]["install_requires"])
    assert not required & GUI_AND_TEST_ONLY, required & GUI_AND_TEST_ONLY
    assert {"requests", "platformdirs", "hvac", "boto3", "paramiko", "keyring"} <= required
    tray = _requirement_names(cfg["options.extras_require"]["tray"])
    assert {"pystray", "pillow", "python-xlib"} <= tray
    assert "sshtunnel" in _requirement_names(cfg["options.extras_require"]["test"])


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "DBTUNNELD_HOME": str(tmp_path), "DISPLAY": ":0"}
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)


def test_cli_and_engine_run_without_the_gui_stack(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[aws]\nprofile = "dev"\n[vault]\naddress = "http://127.0.0.1:8200"\nrole = "r"\n'
        '[bastion]\ntransport = "ssh"\nhost = "127.0.0.1"\n'
        '[[clusters]]\nname = "orders"\nendpoint = "orders.example"\ndb_role = "orders-ro"\n')
    code = """
import importlib
from test_layers import modules_below
from dbtunneld.ui.cli import main
from dbtunneld.ui.tray_desktop import DesktopUnavailable
from dbtunneld.ui.tray_pystray import import_pystray
for m in modules_below(4):
    importlib.import_module(m)
for argv in (["--help"], ["config", "check"]):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    print("rc", argv, rc)
try:
    import_pystray("xorg")
except DesktopUnavailable as exc:
    print("tray:", exc.message, "hint:", exc.hint)
"""
    proc = _run_blocked(code, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rc ['--help'] 0" in out and "rc ['config', 'check'] 0" in out, out
    assert "ok (1 cluster)" in out, out
    assert "tray: the tray is not installed" in out and "dbtunneld[tray]" in out, out
