"""Run dbtunneld's macOS paths on Linux: the fake Cocoa modules of ``macfakes/`` put first on
sys.path for one test, and the real ``pystray/_darwin.py`` imported against them.

``installed()`` yields the fakes' shared state (``calls``, ``violations``); on exit every module
it imported (the fakes, and pystray when it was first imported here) is removed again.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FAKES = Path(__file__).resolve().parent / "macfakes"
FAKE_MODULES = ("_cocoa_state", "AppKit", "Foundation", "objc", "PyObjCTools", "PyObjCTools.AppHelper",
                "PyObjCTools.MachSignals")


@contextmanager
def installed() -> Iterator[object]:
    before = set(sys.modules)
    shadowed = {name: sys.modules.pop(name) for name in FAKE_MODULES if name in sys.modules}
    sys.path.insert(0, str(FAKES))
    try:
        state = importlib.import_module("_cocoa_state").reset()
        yield state
    finally:
        sys.path.remove(str(FAKES))
        for name in set(sys.modules) - before:
            if name in FAKE_MODULES or name == "pystray" or name.startswith("pystray."):
                del sys.modules[name]
        sys.modules.update(shadowed)


def darwin_pystray() -> types.SimpleNamespace:
    """pystray as `import pystray` gives it with PYSTRAY_BACKEND=darwin (call inside ``installed()``)."""
    old = os.environ.get("PYSTRAY_BACKEND")
    os.environ["PYSTRAY_BACKEND"] = "darwin"
    try:
        base = importlib.import_module("pystray._base")
        darwin = importlib.import_module("pystray._darwin")
    finally:
        if old is None:
            os.environ.pop("PYSTRAY_BACKEND", None)
        else:
            os.environ["PYSTRAY_BACKEND"] = old
    return types.SimpleNamespace(Icon=darwin.Icon, Menu=base.Menu, MenuItem=base.MenuItem, _darwin=darwin)
