"""Platform paths: the hint for a control-socket path that is too long names a fix that works
on that platform (macOS has no XDG_RUNTIME_DIR)."""

from __future__ import annotations

import sys

import pytest

from dbtunneld import control, paths
from dbtunneld.errors import PermissionDeniedError


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
