"""Clipboard: copies are readable by other programs, secrets are marked, and the value is cleared
after the delay only while it is still ours. Runs against a real X server (Xvfb) read by xclip."""

from __future__ import annotations

import os
import signal
import sys
import subprocess
import threading

import pytest

from dbtunneld.ui import clipboard
from dbtunneld.ui.clipboard import (CLEARED, KEPT, PASSWORD_HINT, REPLACED, ClipboardUnavailable,
                                 X11Clipboard, system_clipboard)

from helpers.xsession import children_of, desktop, missing_tools, stop_pid, wait_for

MISSING = missing_tools(("Xvfb", "xclip"))
needs_x = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (Debian: xvfb xclip)")


@pytest.fixture(scope="module")
def x(tmp_path_factory):
    with desktop(tmp_path_factory.mktemp("x"), bus=False) as d:
        yield d


@pytest.fixture
def board(x):
    cb = X11Clipboard(x.display)
    yield cb
    cb.close()


def read(x, target: str = "UTF8_STRING") -> subprocess.CompletedProcess:
    return x.run(["xclip", "-o", "-selection", "clipboard", "-t", target])


def own_children() -> list[int]:
    return children_of(os.getpid())


@needs_x
def test_copied_secret_is_readable_and_marked_for_clipboard_managers(x, board):
    before = own_children()
    handle = board.copy("pä$$wörd-1", secret=True, clear_after=None)
    assert handle.wait(1) == KEPT
    assert read(x).stdout.decode() == "pä$$wörd-1"
    assert read(x, "STRING").stdout == "pä$$wörd-1".encode("latin-1")
    targets = read(x, "TARGETS").stdout.decode().split()
    assert PASSWORD_HINT in targets and "UTF8_STRING" in targets and "TEXT" in targets
    assert read(x, PASSWORD_HINT).stdout == b"secret"
    assert own_children() == before, "no helper process may hold the secret"


@needs_x
def test_plain_values_are_not_marked(x, board):
    board.copy("mysql://u@127.0.0.1:13306/app")
    assert read(x).stdout == b"mysql://u@127.0.0.1:13306/app"
    assert PASSWORD_HINT not in read(x, "TARGETS").stdout.decode().split()
    assert read(x, PASSWORD_HINT).returncode != 0


@needs_x
def test_cleared_after_the_delay(x, board):
    handle = board.copy("short-lived", secret=True, clear_after=0.3)
    assert read(x).stdout == b"short-lived"
    assert handle.wait(10) == CLEARED
    gone = read(x)
    assert gone.returncode != 0 and gone.stdout == b""
    assert x.selection_owner("CLIPBOARD") == 0


@needs_x
def test_left_alone_when_another_program_copied_since(x, board):
    handle = board.copy("mine", secret=True, clear_after=1.0)
    other = subprocess.Popen(["xclip", "-i", "-selection", "clipboard", "-quiet"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=x.env)
    try:
        other.stdin.write(b"theirs")
        other.stdin.close()
        assert handle.wait(10) == REPLACED
        assert read(x).stdout == b"theirs"
    finally:
        stop_pid(other)


@needs_x
def test_a_new_copy_replaces_the_pending_one(x, board):
    first = board.copy("one", secret=True, clear_after=30)
    second = board.copy("two", secret=True, clear_after=0.2)
    assert first.wait(1) == REPLACED
    assert read(x).stdout == b"two"
    assert second.wait(10) == CLEARED


@needs_x
def test_close_gives_up_the_selection(x):
    cb = X11Clipboard(x.display)
    handle = cb.copy("closing", secret=True, clear_after=60)
    cb.close()
    cb.close()                                   # idempotent
    assert handle.wait(1) == CLEARED
    assert read(x).returncode != 0
    with pytest.raises(ClipboardUnavailable):
        cb.copy("after close")


def test_no_display_is_a_clear_error():
    with pytest.raises(ClipboardUnavailable) as info:
        system_clipboard(platform="linux", env={})
    assert "DISPLAY" in info.value.message and "dbtunneld creds" in info.value.hint


@needs_x
def test_unreachable_display_is_a_clear_error(tmp_path):
    with pytest.raises(ClipboardUnavailable) as info:
        X11Clipboard(":4097")
    assert ":4097" in info.value.message


class FakeBoard(clipboard._CounterClipboard):
    """The counter logic shared by macOS and Windows, on an in-memory clipboard."""

    def __init__(self):
        super().__init__()
        self.text, self.count, self.marked = "", 0, False

    def _write(self, text, secret):
        self.text, self.marked = text, secret
        self.count += 1
        return self.count

    def _counter(self):
        return self.count

    def _clear(self):
        self.text = ""
        self.count += 1

    def someone_copies(self, text):
        self.text, self.marked = text, False
        self.count += 1


def test_counter_backends_clear_only_their_own_value():
    fb = FakeBoard()
    mine = fb.copy("pw", secret=True, clear_after=0.05)
    assert fb.marked
    assert mine.wait(5) == CLEARED and fb.text == ""
    theirs = fb.copy("pw2", secret=True, clear_after=0.05)
    fb.someone_copies("theirs")
    assert theirs.wait(5) == REPLACED and fb.text == "theirs"
    first = fb.copy("a", clear_after=30)
    fb.copy("b", clear_after=None)
    assert first.wait(1) == REPLACED
    fb.close()


@needs_x
def test_copy_secret_for_the_command_line_waits_until_cleared(x):
    said = []
    board = X11Clipboard(x.display)
    result = {}
    worker = threading.Thread(target=lambda: result.update(note=clipboard.copy_secret(
        "cli-secret", clear_after=0.5, board=board, announce=said.append)))
    worker.start()
    wait_for(lambda: said, 5, "the copy to be announced")
    assert read(x).stdout == b"cli-secret"                      # held while the command runs
    worker.join(10)
    assert result["note"] == "cleared after 0.5 s"
    assert read(x).returncode != 0
    assert "cleared in 0.5 s" in said[0]


# ----------------------------------------------------------------------------- closing clears (quit, Ctrl-C)

@needs_x
def test_ctrl_c_on_the_command_line_clears_the_real_x_clipboard(x):
    """`dbtunneld creds NAME --copy` interrupted: the value is gone and the note says what happened."""
    script = ("import sys; from dbtunneld.ui import clipboard; "
              "print(clipboard.copy_secret('ctrl-c-secret', clear_after=60), flush=True)")
    env = dict(x.env, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert b"Ctrl-C clears it now" in proc.stderr.readline()
        assert read(x).stdout == b"ctrl-c-secret"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        stop_pid(proc)
    assert out.decode().strip() == "cleared now"
    assert read(x).returncode != 0


@needs_x
def test_ctrl_c_leaves_another_programs_copy_alone_and_says_so(x):
    board = X11Clipboard(x.display)
    other = None

    def someone_copies_then_ctrl_c(text):
        nonlocal other
        other = subprocess.Popen(["xclip", "-i", "-selection", "clipboard", "-quiet"], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=x.env)
        other.stdin.write(b"theirs")
        other.stdin.close()
        wait_for(lambda: read(x).stdout == b"theirs", 5, "xclip to own the clipboard")
        raise KeyboardInterrupt

    try:
        note = clipboard.copy_secret("mine", clear_after=60, board=board, announce=someone_copies_then_ctrl_c)
        assert note == "another copy replaced it; left alone"
        assert read(x).stdout == b"theirs"
    finally:
        if other is not None:
            stop_pid(other)


@pytest.fixture
def pasteboard():
    """MacClipboard on the fake NSPasteboard (tests/helpers/macfakes/AppKit.py: changeCount rules)."""
    from helpers import macos

    with macos.installed():
        import AppKit

        yield clipboard.MacClipboard(), AppKit.NSPasteboard.generalPasteboard()


def test_mac_close_clears_a_pending_secret_when_still_current(pasteboard):
    board, pb = pasteboard
    handle = board.copy("pw-mac", secret=True, clear_after=60)
    assert pb.stringForType_("public.utf8-plain-text") == "pw-mac"
    assert clipboard.CONCEALED_TYPE in pb.types()
    board.close()                                    # the tray quits
    assert handle.wait(1) == CLEARED
    assert pb.stringForType_("public.utf8-plain-text") is None
    board.close()                                    # idempotent


def test_mac_close_leaves_a_newer_copy_of_another_app_alone(pasteboard):
    board, pb = pasteboard
    handle = board.copy("pw-mac", secret=True, clear_after=60)
    pb.simulate_other_app_copies("someone else's text")
    board.close()
    assert handle.wait(1) == REPLACED
    assert pb.stringForType_("public.utf8-plain-text") == "someone else's text"


def test_mac_ctrl_c_on_the_command_line_clears_and_says_so(pasteboard):
    board, pb = pasteboard

    def ctrl_c(text):
        raise KeyboardInterrupt

    assert clipboard.copy_secret("pw-cli", clear_after=30, board=board, announce=ctrl_c) == "cleared now"
    assert pb.stringForType_("public.utf8-plain-text") is None


def test_counter_close_clears_a_kept_value_too():
    fb = FakeBoard()
    kept = fb.copy("no-delay", secret=True, clear_after=None)
    assert kept.wait(1) == KEPT
    fb.close()
    assert fb.text == "" and kept.outcome == CLEARED


# ----------------------------------------------------------------------------- the real platforms (CI runners)

@pytest.mark.skipif(sys.platform != "darwin", reason="the real NSPasteboard (macOS runners)")
def test_real_macos_pasteboard_marks_then_clears_on_close():
    AppKit = pytest.importorskip("AppKit")
    board = clipboard.MacClipboard()
    pb = AppKit.NSPasteboard.generalPasteboard()
    handle = board.copy("real-mac-secret", secret=True, clear_after=60)
    assert pb.stringForType_(AppKit.NSPasteboardTypeString) == "real-mac-secret"
    assert clipboard.CONCEALED_TYPE in list(pb.types())
    board.close()
    assert handle.wait(1) == CLEARED and pb.stringForType_(AppKit.NSPasteboardTypeString) is None


@pytest.mark.skipif(sys.platform != "win32", reason="the real Windows clipboard (Windows runners)")
def test_real_windows_clipboard_clears_on_close_only_while_current():
    board = clipboard.WindowsClipboard()
    handle = board.copy("real-win-secret", secret=True, clear_after=60)
    before = board._counter()
    board.close()
    assert handle.wait(1) == CLEARED and board._counter() != before
