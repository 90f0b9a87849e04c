"""Stable ports: persistence across restarts, 127.0.0.1 only, the holder named on conflict."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dbtunneld.adapters import ports
from dbtunneld.adapters.ports import PortBook, PortRangeExhaustedError, bind_listener, find_holder
from dbtunneld.core.errors import PortInUseError


def free_range(width: int = 8) -> tuple[int, int]:
    """A range of currently free ports (probed, never hard-coded)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            lo = s.getsockname()[1]
        if lo + width < 65535 and all(ports.port_is_free(p) for p in range(lo, lo + width)):
            return lo, lo + width - 1
    pytest.skip("no free port range found")


def test_assigned_port_is_persisted_and_reused(tmp_path):
    rng = free_range()
    book = PortBook(tmp_path / "state" / "ports.json", rng)
    first = book.port_for("orders")
    assert rng[0] <= first <= rng[1]
    again = PortBook(tmp_path / "state" / "ports.json", rng)  # a restarted daemon
    assert again.port_for("orders") == first
    assert again.port_for("billing") != first
    data = json.loads((tmp_path / "state" / "ports.json").read_text())
    assert data["ports"] == {"billing": again.port_for("billing"), "orders": first}
    assert oct((tmp_path / "state" / "ports.json").stat().st_mode & 0o777) == "0o600"


def test_persisted_port_survives_being_busy_at_restart(tmp_path):
    rng = free_range()
    book = PortBook(tmp_path / "ports.json", rng)
    port = book.port_for("orders")
    holder = bind_listener(port)
    try:
        # never moved silently: the book still answers the same port; binding reports the conflict
        assert PortBook(tmp_path / "ports.json", rng).port_for("orders") == port
    finally:
        holder.close()


def test_pinned_port_wins_and_reserved_ports_are_skipped(tmp_path):
    rng = free_range()
    book = PortBook(tmp_path / "ports.json", rng)
    assert book.port_for("orders", pinned=rng[0]) == rng[0]
    assert not (tmp_path / "ports.json").exists()  # pinned ports are not written
    assert book.port_for("billing", reserved=[rng[0]]) == rng[0] + 1


def test_busy_ports_are_skipped_when_assigning(tmp_path):
    rng = free_range()
    busy = bind_listener(rng[0])
    try:
        assert PortBook(tmp_path / "ports.json", rng).port_for("orders") == rng[0] + 1
    finally:
        busy.close()


def test_exhausted_range_says_what_to_change(tmp_path):
    lo, _ = free_range(2)
    book = PortBook(tmp_path / "ports.json", (lo, lo))
    book.port_for("a")
    with pytest.raises(PortRangeExhaustedError) as info:
        book.port_for("b")
    assert "port_range" in info.value.hint and '"b"' in str(info.value)


def test_forget_frees_the_assignment(tmp_path):
    rng = free_range()
    book = PortBook(tmp_path / "ports.json", rng)
    port = book.port_for("a")
    book.forget("a")
    assert "a" not in book.assignments()
    assert book.port_for("b") == port


def test_corrupt_ports_file_is_not_fatal(tmp_path):
    path = tmp_path / "ports.json"
    path.write_text("{not json")
    rng = free_range()
    assert rng[0] <= PortBook(path, rng).port_for("a") <= rng[1]


def test_listener_binds_loopback_only():
    lo, _ = free_range(1)
    sock = bind_listener(lo)
    try:
        assert sock.getsockname() == ("127.0.0.1", lo)
    finally:
        sock.close()


@pytest.fixture
def foreign_listener():
    """Another process (not us) listening on a free port; stopped by pid."""
    code = ("import socket,sys;s=socket.socket();s.bind(('127.0.0.1',0));s.listen();"
            "print(s.getsockname()[1],flush=True);sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, "holder-marker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield proc, port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_port_in_use_names_port_pid_and_command(foreign_listener):
    proc, port = foreign_listener
    with pytest.raises(PortInUseError) as info:
        bind_listener(port)
    err = info.value
    assert err.port == port
    assert str(port) in str(err)
    if sys.platform.startswith("linux"):
        assert f"pid {proc.pid}" in err.holder and "python" in err.holder
        assert f"pid {proc.pid}" in str(err)
    assert "never moved silently" in err.hint


def test_find_holder_of_free_port_is_empty():
    lo, _ = free_range(1)
    assert find_holder(lo) == ""


def test_lsof_fallback_parses_pid_and_command(monkeypatch):
    class Done:
        stdout = "p4242\ncpython3\nf5\n"

    monkeypatch.setattr(ports.subprocess, "run", lambda *a, **k: Done())
    assert ports._lsof_holder(1) == "pid 4242 (python3)"
