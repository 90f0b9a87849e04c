"""Which SSM sessions this daemon has open, kept in a file so a crash does not leave them open.

A session left open at AWS (daemon SIGKILLed, machine powered off) keeps its websocket slot
and its agent-side process until Session Manager's idle timeout (20 min by default), and shows
as Active in the console. The daemon therefore writes each session id when StartSession
returns and removes it once TerminateSession succeeds; at its next start it terminates what
a dead daemon left behind (``sweep_leftovers``).

The file (``<state dir>/ssm-sessions.json``, mode 0600) holds session ids and the pid of the
daemon that opened them, nothing else: no token, no stream URL. The registry is installed once
per process by the daemon (``install``); library users and tests without it record nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

FILE_NAME = "ssm-sessions.json"
SWEEP_DELAYS = (0.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)


def _pid_alive(pid: int) -> bool:
    from ...core.paths import pid_alive
    return pid_alive(pid)


class SessionRegistry:
    """Session ids with the pid that opened them, in a private file; thread-safe."""

    def __init__(self, path: Path, pid: int | None = None) -> None:
        self.path = Path(path)
        self.pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()

    def add(self, session_id: str) -> None:
        with self._lock:
            records = [r for r in self._read() if r["id"] != session_id]
            self._write(records + [{"id": session_id, "pid": self.pid}])

    def remove(self, session_id: str) -> None:
        with self._lock:
            records = self._read()
            kept = [r for r in records if r["id"] != session_id]
            if len(kept) != len(records):
                self._write(kept)

    def ids(self) -> list[str]:
        with self._lock:
            return [r["id"] for r in self._read()]

    def leftovers(self) -> list[str]:
        """Sessions opened by daemons that no longer run (this process's own are not leftovers)."""
        with self._lock:
            return [r["id"] for r in self._read() if r["pid"] != self.pid and not _pid_alive(r["pid"])]

    def _read(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s); starting a new list of SSM sessions", self.path, exc)
            return []
        rows = data.get("sessions", []) if isinstance(data, dict) else []
        return [{"id": str(r["id"]), "pid": int(r.get("pid") or 0)} for r in rows if isinstance(r, dict) and r.get("id")]

    def _write(self, records: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "sessions": records}, f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


_installed: SessionRegistry | None = None


def install(registry: SessionRegistry | None) -> None:
    """Make ``registry`` the one ``SsmApi`` reports to in this process (None: stop recording)."""
    global _installed
    _installed = registry


def opened(session_id: str) -> None:
    registry = _installed
    if registry is not None:
        _quietly(registry.add, session_id)


def ended(session_id: str) -> None:
    registry = _installed
    if registry is not None:
        _quietly(registry.remove, session_id)


def _quietly(action: Callable[[str], None], session_id: str) -> None:
    try:
        action(session_id)
    except OSError as exc:  # a full disk must not break a session; the sweep is best effort
        log.warning("could not update the SSM session list for %s: %s", session_id, exc)


def terminate_leftovers(registry: SessionRegistry, terminate: Callable[[str], None]) -> list[str]:
    """TerminateSession for every leftover; returns the ids still left (transient failures).

    ``terminate`` is ``SsmApi.terminate_session``: success or "does not exist" both end it.
    """
    from ...core.errors import NeedsUserError

    left = []
    for session_id in registry.leftovers():
        try:
            terminate(session_id)
            log.info("SSM session %s left open by an earlier run: terminated", session_id)
        except NeedsUserError as exc:  # DoesNotExist / invalid: nothing left to end
            log.info("SSM session %s left by an earlier run is already gone (%s)", session_id, exc.message)
        except Exception as exc:
            log.warning("SSM session %s left by an earlier run: TerminateSession failed (%s); will retry", session_id, exc)
            left.append(session_id)
            continue
        registry.remove(session_id)
    return left


def sweep_leftovers(registry: SessionRegistry, make_terminate: Callable[[], Callable[[str], None]],
                    stop: threading.Event, delays: tuple[float, ...] = SWEEP_DELAYS) -> threading.Thread | None:
    """In a thread: terminate leftovers, retrying (``delays``) while credentials or the network are
    missing; None when there is nothing to do."""
    if not registry.leftovers():
        return None

    def run() -> None:
        for delay in delays:
            if stop.wait(delay):
                return
            try:
                if not terminate_leftovers(registry, make_terminate()):
                    return
            except Exception as exc:  # no credentials yet, no region...: the next round may have them
                log.warning("SSM sessions left by an earlier run not terminated yet (%s); next try in %.0f s", exc, delay)
        log.warning("SSM sessions left by an earlier run were not terminated; Session Manager ends them at its idle timeout")

    thread = threading.Thread(target=run, name="dbtunneld-ssm-leftovers", daemon=True)
    thread.start()
    return thread


def install_for_daemon(state_dir: Path) -> SessionRegistry:
    """Record this process's sessions in ``<state_dir>/ssm-sessions.json`` from now on."""
    registry = SessionRegistry(Path(state_dir) / FILE_NAME)
    install(registry)
    return registry


def sweep_for_daemon(registry: SessionRegistry, aws: Any, session_factory: Callable[[], Any],
                     stop: threading.Event) -> threading.Thread | None:
    """End, in a thread, the sessions a crashed run left open. ``aws`` is the config's
    ``AwsConfig`` (region, ``endpoint_urls["ssm"]``); ``session_factory`` gives the engine's
    boto3 session, asked again at each try (sign-in may come later)."""
    from .api import SsmApi

    def make_terminate() -> Callable[[str], None]:
        api = SsmApi(session_factory(), region=aws.region, endpoint_url=aws.endpoint_urls.get("ssm"))
        return api.terminate_session

    return sweep_leftovers(registry, make_terminate, stop)
