"""The clipboard: copy a value, mark secrets for clipboard managers, clear it after a delay.

``system_clipboard()`` picks the platform's backend. ``copy(text, secret=, clear_after=)``
returns a ``Copied`` handle; after ``clear_after`` seconds the value is cleared only if the
clipboard still holds what we put there (X11: we still own the selection; macOS and Windows:
the clipboard's change counter has not moved). ``close()`` (quit, Ctrl-C) clears a value still
held the same way, so a secret never outlives the program that copied it. Secrets are marked so that clipboard managers
and history skip them:

* X11: this process owns the CLIPBOARD selection (python-xlib, one thread serves
  SelectionRequest events) and offers ``x-kde-passwordManagerHint: secret`` next to
  UTF8_STRING / TEXT / STRING. No helper process (xclip, xsel) is ever left holding the value;
  it lives in this process until cleared, replaced, or the process exits.
* macOS: NSPasteboard with ``org.nspasteboard.ConcealedType`` through pyobjc when present,
  otherwise ``pbcopy`` (which exits at once) and a warning that the value is not marked.
* Windows: CF_UNICODETEXT plus ``ExcludeClipboardContentFromMonitorProcessing`` (and the
  history / cloud-clipboard opt-outs) through ctypes.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.errors import NeedsUserError

log = logging.getLogger(__name__)

PASSWORD_HINT = "x-kde-passwordManagerHint"
CONCEALED_TYPE = "org.nspasteboard.ConcealedType"

CLEARED, REPLACED, KEPT, FAILED = "cleared", "replaced", "kept", "failed"


class ClipboardUnavailable(NeedsUserError):
    """No clipboard this process can use (no display, or an unsupported platform)."""

    hint = "copy from the command line instead: `dbtunneld creds NAME --field password`"


@dataclass
class Copied:
    """One copy: ``wait()`` returns what happened at its deadline (cleared / replaced / kept)."""

    secret: bool
    clear_after: float | None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    outcome: str = ""

    def finish(self, outcome: str) -> None:
        if not self._done.is_set():
            self.outcome = outcome
            self._done.set()

    def settle(self, outcome: str) -> None:
        """What closing did to a value that was pending or kept (closing decides it at last)."""
        if not self._done.is_set() or self.outcome == KEPT:
            self.outcome = outcome
            self._done.set()

    def wait(self, timeout: float | None = None) -> str:
        self._done.wait(timeout)
        return self.outcome


class Clipboard:
    """The interface every backend offers."""

    def copy(self, text: str, *, secret: bool = False, clear_after: float | None = None) -> Copied:
        raise NotImplementedError

    def close(self) -> None:
        """Stop serving; a value still held is dropped (idempotent)."""

    def __enter__(self) -> "Clipboard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def system_clipboard(platform: str = sys.platform, env: dict[str, str] | None = None) -> Clipboard:
    env = dict(os.environ if env is None else env)
    if platform == "darwin":
        return MacClipboard()
    if platform.startswith("win"):
        return WindowsClipboard()
    if env.get("DISPLAY"):
        return X11Clipboard(env["DISPLAY"])
    raise ClipboardUnavailable("no X display to put the clipboard on (DISPLAY is not set)")


def copy_secret(value: str, clear_after: float | None = 30.0, *, board: Clipboard | None = None,
                announce: Callable[[str], None] | None = None) -> str:
    """For a command-line copy: copy, then stay until the value is cleared (or Ctrl-C clears it now).

    The CLI process is what holds (X11) or later clears (macOS, Windows) the value, so it waits
    instead of leaving the secret behind. Returns a note for the caller to print.
    """
    board = board or system_clipboard()
    say = announce or (lambda text: print(text, file=sys.stderr, flush=True))
    wait = clear_after if clear_after and clear_after > 0 else None
    handle: Copied | None = None
    interrupted = False
    try:
        handle = board.copy(value, secret=True, clear_after=wait)
        say(f"copied; the clipboard is cleared in {wait:g} s (Ctrl-C clears it now)" if wait
            else "copied; the clipboard holds it while this command runs (Ctrl-C clears it)")
        handle.wait() if wait else threading.Event().wait()    # no delay: hold it until Ctrl-C
    except KeyboardInterrupt:
        interrupted = True
    finally:
        board.close()                        # clears the value when the clipboard still holds it
    return _outcome_note(handle, wait, interrupted)


def _outcome_note(handle: Copied | None, wait: float | None, interrupted: bool) -> str:
    """What really happened to the copy, read from its handle after ``close()``."""
    outcome = handle.outcome if handle is not None else ""
    if outcome == CLEARED:
        return "cleared now" if interrupted else f"cleared after {wait:g} s"
    if outcome == REPLACED:
        return "another copy replaced it; left alone"
    return outcome or ("interrupted before the copy" if interrupted else "")


# ----------------------------------------------------------------------------- polling backends

class _CounterClipboard(Clipboard):
    """Shared logic for clipboards with a change counter (macOS, Windows): one timer per copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: tuple[Copied, int] | None = None
        self._timer: threading.Timer | None = None

    def copy(self, text: str, *, secret: bool = False, clear_after: float | None = None) -> Copied:
        handle = Copied(secret, clear_after)
        with self._lock:
            self._supersede()
            counter = self._write(text, secret)
            self._current = (handle, counter)
            if clear_after is not None:
                self._timer = threading.Timer(clear_after, self._expire, args=(handle,))
                self._timer.daemon = True
                self._timer.start()
            else:
                handle.finish(KEPT)
        return handle

    def _supersede(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._current:
            self._current[0].finish(REPLACED)
        self._current = self._timer = None

    def _expire(self, handle: Copied) -> None:
        with self._lock:
            if not self._current or self._current[0] is not handle:
                return
            handle.finish(self._clear_if_ours(self._current[1]))
            self._current = None

    def close(self) -> None:
        """Clear a pending value now if the clipboard still holds it (quit, Ctrl-C); idempotent."""
        with self._lock:
            if self._timer:
                self._timer.cancel()
            current, self._current, self._timer = self._current, None, None
            if current is not None:
                current[0].settle(self._clear_if_ours(current[1]))

    def _clear_if_ours(self, counter: int) -> str:
        """CLEARED after clearing when the change counter has not moved since our write, else REPLACED."""
        if self._counter() != counter:
            return REPLACED
        self._clear()
        return CLEARED

    def _write(self, text: str, secret: bool) -> int:
        raise NotImplementedError

    def _counter(self) -> int:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError


class MacClipboard(_CounterClipboard):
    def __init__(self) -> None:
        super().__init__()
        try:
            from AppKit import NSPasteboard
            self._board = NSPasteboard.generalPasteboard()
        except ImportError:
            self._board = None
            log.warning("pyobjc is not installed: copied secrets are not marked %s "
                        "(clipboard history may keep them); `pip install pyobjc-framework-Cocoa`", CONCEALED_TYPE)

    def _write(self, text: str, secret: bool) -> int:
        if self._board is None:
            subprocess.run(["pbcopy"], input=text.encode(), check=True, timeout=10)
            return hash(text)
        from AppKit import NSPasteboardTypeString
        self._board.clearContents()
        types = [NSPasteboardTypeString] + ([CONCEALED_TYPE] if secret else [])
        self._board.declareTypes_owner_(types, None)
        self._board.setString_forType_(text, NSPasteboardTypeString)
        if secret:
            self._board.setString_forType_("", CONCEALED_TYPE)
        return int(self._board.changeCount())

    def _counter(self) -> int:
        if self._board is None:
            out = subprocess.run(["pbpaste"], capture_output=True, timeout=10).stdout
            return hash(out.decode(errors="replace"))
        return int(self._board.changeCount())

    def _clear(self) -> None:
        if self._board is None:
            subprocess.run(["pbcopy"], input=b"", check=True, timeout=10)
        else:
            self._board.clearContents()


class WindowsClipboard(_CounterClipboard):
    """CF_UNICODETEXT with the formats that keep it out of history and clipboard monitors."""

    CF_UNICODETEXT = 13
    GMEM_MOVEABLE = 0x0002
    MARKERS = ("ExcludeClipboardContentFromMonitorProcessing", "CanIncludeInClipboardHistory",
               "CanUploadToCloudClipboard")

    def __init__(self) -> None:
        super().__init__()
        import ctypes
        from ctypes import wintypes

        self._ct = ctypes
        windll = getattr(ctypes, "WinDLL")          # Windows only (not in the other platforms' stubs)
        self.user32 = windll("user32", use_last_error=True)
        self.kernel32 = windll("kernel32", use_last_error=True)
        self.kernel32.GlobalAlloc.restype = wintypes.HGLOBAL
        self.kernel32.GlobalLock.restype = ctypes.c_void_p
        self.kernel32.GlobalLock.argtypes = [wintypes.HGLOBAL]
        self.kernel32.GlobalUnlock.argtypes = [wintypes.HGLOBAL]
        self.user32.SetClipboardData.argtypes = [wintypes.UINT, wintypes.HANDLE]
        self.user32.SetClipboardData.restype = wintypes.HANDLE
        self.user32.RegisterClipboardFormatW.restype = wintypes.UINT
        self.user32.GetClipboardSequenceNumber.restype = wintypes.DWORD

    def _open(self) -> None:
        for _ in range(50):                      # another program may hold it for a moment
            if self.user32.OpenClipboard(None):
                return
            time.sleep(0.02)
        raise ClipboardUnavailable("the Windows clipboard is held by another program")

    def _global(self, data: bytes) -> Any:
        handle = self.kernel32.GlobalAlloc(self.GMEM_MOVEABLE, len(data))
        ptr = self.kernel32.GlobalLock(handle)
        self._ct.memmove(ptr, data, len(data))
        self.kernel32.GlobalUnlock(handle)
        return handle

    def _write(self, text: str, secret: bool) -> int:
        self._open()
        try:
            self.user32.EmptyClipboard()
            self.user32.SetClipboardData(self.CF_UNICODETEXT, self._global((text + "\0").encode("utf-16-le")))
            if secret:
                for name in self.MARKERS:
                    fmt = self.user32.RegisterClipboardFormatW(name)
                    # the first is a presence flag; the other two are a DWORD 0 ("no")
                    self.user32.SetClipboardData(fmt, self._global(b"\0\0\0\0"))
        finally:
            self.user32.CloseClipboard()
        return int(self.user32.GetClipboardSequenceNumber())

    def _counter(self) -> int:
        return int(self.user32.GetClipboardSequenceNumber())

    def _clear(self) -> None:
        self._open()
        try:
            self.user32.EmptyClipboard()
        finally:
            self.user32.CloseClipboard()


# ----------------------------------------------------------------------------- X11

@dataclass
class _Held:
    data: bytes
    secret: bool
    handle: Copied
    deadline: float | None


class X11Clipboard(Clipboard):
    """Owns the CLIPBOARD selection from a private X connection served by one thread."""

    TEXT_TARGETS = ("UTF8_STRING", "text/plain;charset=utf-8", "TEXT", "STRING", "text/plain")

    def __init__(self, display_name: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            from Xlib import X, Xatom, display as xdisplay, error as xerror
        except ImportError:
            raise ClipboardUnavailable("python-xlib is not installed", "install the tray extra: pip install 'dbtunneld[tray]'") from None
        try:
            self._d = xdisplay.Display(display_name)
        except (xerror.DisplayError, OSError) as exc:
            raise ClipboardUnavailable(f"cannot open X display {display_name or os.environ.get('DISPLAY', '')!r}: {exc}") from None
        self._X, self._Xatom, self._clock = X, Xatom, clock
        screen = self._d.screen()
        self._win = screen.root.create_window(-10, -10, 1, 1, 0, screen.root_depth, event_mask=X.PropertyChangeMask)
        self._atoms = {n: self._d.intern_atom(n) for n in
                       ("CLIPBOARD", "TARGETS", "TIMESTAMP", PASSWORD_HINT) + self.TEXT_TARGETS}
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._held: _Held | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="clipboard-x11", daemon=True)
        self._thread.start()

    # -- public, any thread
    def copy(self, text: str, *, secret: bool = False, clear_after: float | None = None) -> Copied:
        handle = Copied(secret, clear_after)
        done = threading.Event()
        self._command(("copy", text.encode("utf-8"), handle, done))
        done.wait(5.0)
        if handle.outcome == FAILED:
            raise ClipboardUnavailable("another program took the X clipboard at once; try again")
        return handle

    def close(self) -> None:
        if self._closed:
            return
        self._command(("close",))
        self._thread.join(5.0)
        self._closed = True
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _command(self, cmd: tuple[Any, ...]) -> None:
        if self._closed:
            raise ClipboardUnavailable("the clipboard was closed")
        self._commands.put(cmd)
        os.write(self._wake_w, b"x")

    # -- the serving thread
    def _serve(self) -> None:
        try:
            while self._serve_once():
                pass
        except Exception:
            log.exception("the X11 clipboard thread stopped")
        finally:
            held, ours = self._release()
            if held:
                held.handle.settle(CLEARED if ours else REPLACED)
            self._d.close()

    def _serve_once(self) -> bool:
        if not self._d.pending_events():
            timeout = self._time_left()
            ready, _, _ = select.select([self._d.fileno(), self._wake_r], [], [], timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
        while not self._commands.empty():
            if not self._run_command(self._commands.get_nowait()):
                return False
        for _ in range(self._d.pending_events()):
            self._handle_event(self._d.next_event())
        self._expire_if_due()
        return True

    def _time_left(self) -> float | None:
        held = self._held
        if held is None or held.deadline is None:
            return None
        return max(0.0, held.deadline - self._clock())

    def _run_command(self, cmd: tuple[Any, ...]) -> bool:
        if cmd[0] == "close":
            return False
        _, data, handle, done = cmd
        self._take(data, handle)
        done.set()
        return True

    def _take(self, data: bytes, handle: Copied) -> None:
        if self._held:
            self._held.handle.finish(REPLACED)
        board = self._atoms["CLIPBOARD"]
        self._win.set_selection_owner(board, self._X.CurrentTime)
        if self._d.get_selection_owner(board) != self._win:
            self._held = None
            handle.finish(FAILED)
            return
        deadline = None if handle.clear_after is None else self._clock() + handle.clear_after
        self._held = _Held(data, handle.secret, handle, deadline)
        if deadline is None:
            handle.finish(KEPT)
        log.info("copied a %s to the clipboard%s", "secret" if handle.secret else "value",
                 f" (cleared in {handle.clear_after:g} s)" if deadline is not None else "")

    def _expire_if_due(self) -> None:
        held = self._held
        if held is None or held.deadline is None or self._clock() < held.deadline:
            return
        _, ours = self._release()
        held.handle.finish(CLEARED if ours else REPLACED)
        log.info("clipboard %s", "cleared" if ours else "left alone: another program owns it now")

    def _release(self) -> tuple[_Held | None, bool]:
        """Forget the value; give up the selection only while we still own it (then True)."""
        held, self._held = self._held, None
        board = self._atoms["CLIPBOARD"]
        ours = held is not None and self._d.get_selection_owner(board) == self._win
        if ours:
            from Xlib.protocol import request

            request.SetSelectionOwner(display=self._d.display, window=self._X.NONE, selection=board,
                                      time=self._X.CurrentTime)
            self._d.flush()
        return held, ours

    def _handle_event(self, ev: Any) -> None:
        X = self._X
        if ev.type == X.SelectionRequest:
            self._answer(ev)
        elif ev.type == X.SelectionClear and ev.window == self._win:
            held, self._held = self._held, None      # someone else copied: drop our value
            if held:
                held.handle.finish(REPLACED)

    def _answer(self, ev: Any) -> None:
        from Xlib.protocol import event as xevent

        prop = ev.property if ev.property != self._X.NONE else ev.target
        if not self._write_target(ev.requestor, prop, ev.target):
            prop = self._X.NONE
        notify = xevent.SelectionNotify(time=ev.time, requestor=ev.requestor, selection=ev.selection,
                                        target=ev.target, property=prop)
        ev.requestor.send_event(notify, event_mask=0)
        self._d.flush()

    def _write_target(self, requestor: Any, prop: int, target: int) -> bool:
        held, a = self._held, self._atoms
        if held is None:
            return False
        name = next((n for n, atom in a.items() if atom == target), None)
        if name == "TARGETS":
            offered = ["TARGETS", "TIMESTAMP", *self.TEXT_TARGETS] + ([PASSWORD_HINT] if held.secret else [])
            requestor.change_property(prop, self._Xatom.ATOM, 32, [a[n] for n in offered])
        elif name == "TIMESTAMP":
            requestor.change_property(prop, self._Xatom.INTEGER, 32, [self._X.CurrentTime])
        elif name == PASSWORD_HINT and held.secret:
            requestor.change_property(prop, target, 8, b"secret")
        elif name == "STRING":
            requestor.change_property(prop, self._Xatom.STRING, 8, held.data.decode().encode("latin-1", "replace"))
        elif name in self.TEXT_TARGETS:
            kind = a["UTF8_STRING"] if name == "TEXT" else target
            requestor.change_property(prop, kind, 8, held.data)
        else:
            return False
        return True
