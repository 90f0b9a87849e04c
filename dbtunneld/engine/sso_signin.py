"""The engine's SSO sign-in: one flow at a time, finished by a task on the engine loop (its
blocking wait for the browser or the device-code polls run on the loop's worker pool).

The authorization-code flow with PKCE (the browser comes back to a loopback listener) is the
default, as ``aws sso login`` since late 2024; the device flow serves ``use_device_code``
(``dbtunneld login --no-browser``, headless machines) and legacy profiles, which have no
sso-session. Asking for the other flow while one runs cancels the running one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..adapters.aws import AwsSession
from ..adapters.sso import SsoAuthCodeLogin, SsoDeviceLogin
from ..core.errors import DbtunneldError, TransientError
from ..core.timing import Clock
from .keeper import Tuning, short_error

if TYPE_CHECKING:
    from .engine_loop import EngineLoop

log = logging.getLogger(__name__)


class SsoSignIn:
    """Runs sign-ins for ``aws``; ``on_done(ok, detail)`` is called when one ends."""

    def __init__(self, aws: AwsSession, *, clock: Clock, tuning: Tuning, stopping: threading.Event,
                 on_done: Callable[[bool, str], None], engine: Callable[[], "EngineLoop"]) -> None:
        self.aws = aws
        self.clock = clock
        self.tuning = tuning
        self.stopping = stopping
        self.on_done = on_done
        self._engine = engine
        self._lock = threading.Lock()
        self._task: concurrent.futures.Future[None] | None = None
        self._cancel = threading.Event()
        self._info: dict[str, Any] | None = None

    def start(self, use_device_code: bool = False) -> tuple[dict[str, Any], bool]:
        """Start a sign-in (or return the running one of the same flow): (public info, new?)."""
        sso = self.aws.sso_settings()
        device = use_device_code or (sso is not None and sso.session_name is None)
        flow_name = "device_code" if device else "authorization_code"
        with self._lock:
            if self._running() and self._info and self._info.get("flow") == flow_name:
                return dict(self._info), False
            self._cancel.set()                      # a running sign-in of the other flow ends
            self._cancel = cancel = threading.Event()
            if device:
                flow = SsoDeviceLogin(self.aws, clock=self.clock)
                auth = flow.start()
                info, target, args = auth.public(), self._finish_device, (flow, auth, cancel)
            else:
                code_flow = SsoAuthCodeLogin(self.aws, clock=self.clock)
                info, target, args = code_flow.start(), self._finish_auth_code, (code_flow, cancel)
            self._info = info
            engine = self._engine()
            self._task = engine.submit(engine.run_blocking(target, *args))
        return dict(info), True

    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    def join(self, timeout: float) -> None:
        """End the running sign-in (its flow checks the cancel flag) and wait up to ``timeout``."""
        self._cancel.set()
        task = self._task
        if task is not None:
            concurrent.futures.wait([task], max(0.0, timeout))

    def _finish_auth_code(self, flow: SsoAuthCodeLogin, cancel: threading.Event) -> None:
        stop = _either(self.stopping, cancel)
        try:
            flow.finish(stop)
        except DbtunneldError as exc:
            if not stop.is_set():
                log.warning("SSO sign-in failed: %s", short_error(exc))
                self.on_done(False, short_error(exc))
            return
        self.on_done(True, "")

    def _finish_device(self, flow: SsoDeviceLogin, auth: Any, cancel: threading.Event) -> None:
        interval = max(self.tuning.sso_poll_floor, auth.interval)
        while not (self.stopping.is_set() or cancel.is_set()):
            self.clock.wait(cancel, interval)
            if self.stopping.is_set() or cancel.is_set():
                return
            try:
                result = flow.poll(auth, interval)
            except TransientError as exc:
                log.warning("SSO sign-in: polling failed (%s); retry in %.1f s", short_error(exc), interval)
                continue
            except DbtunneldError as exc:
                log.warning("SSO sign-in failed: %s", short_error(exc))
                return self.on_done(False, short_error(exc))
            interval = max(self.tuning.sso_poll_floor, result.interval)
            if result.done:
                return self.on_done(True, "")


class _either:
    """An event view that is set when either of two events is (for a flow's stop check)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self._a, self._b = a, b

    def is_set(self) -> bool:
        return self._a.is_set() or self._b.is_set()
