"""State shared by the fake Cocoa modules: every AppKit call with the thread it came from.

Real AppKit requires the main thread for NSApplication, NSStatusBar/NSStatusItem, NSMenu and
NSImage drawing ("NSWindow/NSStatusItem ... should only be used from the main thread"; macOS 26
terminates the process when an NSStatusItem is touched from another thread). The fake is stricter
than a warning: such a call is recorded as a violation and raises ``NSInternalInconsistencyException``.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field


class NSInternalInconsistencyException(RuntimeError):
    """What AppKit raises (and macOS 26 turns into a crash) for UI calls off the main thread."""


@dataclass
class Call:
    name: str
    thread: str
    main: bool
    args: tuple = ()


@dataclass
class CocoaState:
    calls: list[Call] = field(default_factory=list)
    violations: list[Call] = field(default_factory=list)
    main_queue: "queue.Queue" = field(default_factory=queue.Queue)   # the main run loop's sources
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, *args, main_only: bool = True) -> Call:
        t = threading.current_thread()
        call = Call(name, t.name, t is threading.main_thread(), args)
        with self.lock:
            self.calls.append(call)
        if main_only and not call.main:
            self.violations.append(call)
            raise NSInternalInconsistencyException(f"{name} must be used from the main thread only (called on {t.name})")
        return call

    def named(self, name: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.name == name]


STATE = CocoaState()


def reset() -> CocoaState:
    global STATE
    STATE = CocoaState()
    return STATE


def state() -> CocoaState:
    return STATE
