"""Platform paths: the hint for a control-socket path that is too long names a fix that works
on that platform (macOS has no XDG_RUNTIME_DIR)."""

from __future__ import annotations

import os
import sys

import pytest

from dbtunneld.core import paths
from dbtunneld.core.errors import PermissionDeniedError
from dbtunneld.process import control


def test_long_socket_path_on_macos_names_dbtunneld_home_not_xdg(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    long_path = tmp_path / ("x" * 120) / "control.sock"
    with pytest.raises(PermissionDeniedError) as info:
        control.bind_control_socket(long_path)
    assert "XDG_RUNTIME_DIR" not in info.value.hint
    assert "DBTUNNELD_HOME" in info.value.hint and "autostart enable" in info.value.hint


def test_long_socket_path_hint_per_platform():
    assert "XDG_RUNTIME_DIR" in paths.short_socket_hint("linux")
    assert "XDG_RUNTIME_DIR" not in paths.short_socket_hint("win32")
    assert "DBTUNNELD_HOME" in paths.short_socket_hint("win32")


@pytest.mark.parametrize("xdg", [{}, {"XDG_CONFIG_HOME": "cfg", "XDG_STATE_HOME": "st", "XDG_RUNTIME_DIR": "rt"}])
def test_platformdirs_paths_match_the_documented_layout(tmp_path, monkeypatch, xdg):
    """This process's paths (platformdirs) equal the ones derived from its environment."""
    for name in ("DBTUNNELD_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, sub in xdg.items():
        monkeypatch.setenv(name, str(tmp_path / sub))
    mine = paths.default_paths()
    assert mine == paths.default_paths(dict(os.environ), sys.platform)
    if sys.platform.startswith("linux"):
        assert mine.config_file == tmp_path / xdg.get("XDG_CONFIG_HOME", ".config") / "dbtunneld" / "config.toml"


def test_dbtunneld_home_wins_over_platformdirs(tmp_path, monkeypatch):
    monkeypatch.setenv("DBTUNNELD_HOME", str(tmp_path))
    assert paths.default_paths().state_dir == tmp_path / "state"
