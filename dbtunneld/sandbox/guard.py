"""Nothing outlives the tests: stacks are stopped at exit and on SIGTERM/SIGHUP, and what a
killed owner left behind (processes, temp dir) is swept by the next stack start."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import weakref
from pathlib import Path
from typing import Any

from .procs import pid_alive, processes_using

log = logging.getLogger(__name__)

DIR_PREFIX = "dbtunneld-sandbox-"

live_stacks: "weakref.WeakSet" = weakref.WeakSet()   # every started, not yet stopped Stack


def sweep_stale_stacks(base_dir: Path | None = None) -> list[str]:
    """Remove what stacks of dead owners left behind (their owner was SIGKILLed, so no
    teardown ran): SIGKILL each process whose command line or working directory is inside
    such a stack's dir, then delete the dir. Returns the dirs swept."""
    base = Path(base_dir or tempfile.gettempdir())
    swept = []
    for d in base.glob(DIR_PREFIX + "*"):
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or pid_alive(owner):
            continue
        for pid in processes_using(d):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        log.warning("swept a stale sandbox stack: %s (owner pid %s is gone)", d, owner)
        swept.append(str(d))
    return swept


def stop_all_stacks() -> None:
    """Stop every stack this process started (atexit and signal guard)."""
    for stack in list(live_stacks):
        with contextlib.suppress(Exception):
            stack.stop()


def install_signal_guard() -> None:
    """On SIGTERM/SIGHUP stop every live stack, then die of the signal as usual.

    Call from the main thread (pytest's conftest and ``dbtunneld sandbox`` do)."""
    def handler(signum: int, _frame: Any) -> None:
        stop_all_stacks()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, handler)



atexit.register(stop_all_stacks)
