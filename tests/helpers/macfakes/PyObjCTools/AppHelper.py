"""Fake of ``PyObjCTools.AppHelper.callAfter``: pyobjc documents it as "Call a function on the main
thread. Returns immediately." (PyObjCTools/AppHelper.py posts a helper object with
``performSelectorOnMainThread_withObject_waitUntilDone_(..., False)``). Like the real one, the
function runs only when the main thread's run loop turns, i.e. inside ``NSApplication.run()``."""

from __future__ import annotations

import _cocoa_state


def callAfter(func, *args, **kwargs):  # noqa: N802 - PyObjC's name
    _cocoa_state.state().record("AppHelper.callAfter", getattr(func, "__name__", repr(func)), main_only=False)
    _cocoa_state.state().main_queue.put(("call", lambda: func(*args, **kwargs)))
