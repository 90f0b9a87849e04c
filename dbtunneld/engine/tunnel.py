"""A tunnel unit: one cluster's listener on 127.0.0.1:PORT and the upstream that heals itself.

The port is bound once and stays bound while the upstream is rebuilt: a client that connects
during a rebuild waits (up to ``tunnels.connect_wait``) and then flows. Client side:
``tunnel_clients``; bytes: ``forward.Forwarder`` (one loop thread); state table and retries:
``tunnel_state``; checks while up: ``tunnel_health``; keepalives, the upstream's end: ``keepalive``.

The keeper is a unit of the engine's ``scheduler.Scheduler``: ``Tunnel.step()`` does what the
state calls for (connect, check, leave backoff, re-ask for credentials) and returns the delay to
its next step, never waiting inside it; wakes (``check_now``, ``reconnect``, a waiting client, a
dead or silent upstream) make it due at once. An idle tunnel that is up has no steps. The first
retry after losing a proven upstream is immediate.

The API the supervisor uses (``scheduler`` and ``engine`` go together: the scheduler that
``Scheduler.drive(engine)`` runs; the loop accepts clients, its pool runs steps and channel opens):

    tunnel = Tunnel(name, port, host, db_port, transport, settings, ..., scheduler=s, engine=e)
    # or Tunnel(...) then tunnel.attach_scheduler(s, e) while stopped
    tunnel.start()      # binds the port, adds the tunnel to the scheduler, accepts on the loop
    tunnel.stop()       # removes it from the scheduler, closes the port, every client, the upstream

Without them (standalone use, tests) each ``start`` creates an ``own_schedule.OwnSchedule`` (an
``EngineLoop`` and a ``Scheduler`` for this tunnel alone) and ``stop`` ends it. Time comes from an
injected ``timing.Clock``.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from typing import Any, Callable

from ..adapters import forward, ports
from ..adapters.log import RetryLog, unit_logger
from ..adapters.transport import Transport
from ..core.config import TunnelSettings
from ..core.errors import DbtunneldError, NeedsUserError, PortInUseError, SignInNeededError, TransientError
from ..core.model import TunnelState, TunnelStatus
from ..core.timing import SYSTEM_CLOCK, Clock
from .engine_loop import EngineLoop
from .own_schedule import DUE_SLACK, OwnSchedule
from .scheduler import Scheduler
from .tunnel_clients import BeforeRelay, ClientSide, data_path_cpu, on_cpu, pin_this_thread
from .keepalive import WatchSlot
from .tunnel_health import Finding, Probe, UpstreamHealth, probe_mysql
from .tunnel_state import RETRY_CYCLE, RetrySchedule, StateMachine

log = logging.getLogger(__name__)

S = TunnelState

# A client that arrives while the upstream has been failing this long (or never came up) gets
# the error as soon as one more attempt fails, instead of waiting ``connect_wait``; a shorter
# outage (a bastion restarting) is waited through.
PROMPT_REFUSAL_AFTER = 5.0
FAILURE_LOG_INTERVAL = 60.0       # a failure that repeats is logged at most this often
CREDENTIALS_RECHECK = 2.0         # waiting_credentials re-asks the prerequisite this often


class Tunnel:
    """127.0.0.1:``local_port`` -> (transport) -> ``remote_host``:``remote_port``.

    ``prerequisite`` (optional) is asked before each (re)connect: False means "wait for
    credentials" (state waiting_credentials; ``check_now()`` when they arrive skips the wait);
    it may raise dbtunneld errors (sign-in needed, ...). ``on_change`` is called after every
    state move, outside the unit's locks (connection counts are read with ``status()``).
    ``local_port=0`` binds an ephemeral port (tests). ``before_relay(client, channel)`` (optional)
    runs once per connection on the fresh channel before any byte is relayed (the local login,
    ``local_login.LocalLogin``) and returns the socket to relay (the client, or one that stands for
    it), or a ``command_watch.Handoff`` (that socket and a watch on its upload); None ends the
    connection (it has told the client why). ``scheduler``/``engine``: see the module's docstring.
    """

    def __init__(self, name: str, local_port: int, remote_host: str, remote_port: int,
                 transport: Transport, settings: TunnelSettings = TunnelSettings(), *,
                 clock: Clock = SYSTEM_CLOCK, prerequisite: Callable[[], bool] | None = None,
                 on_change: Callable[[TunnelStatus], None] | None = None, probe: Probe = probe_mysql,
                 rnd: Callable[[], float] = random.random, refuse_as_mysql: bool = True,
                 before_relay: BeforeRelay | None = None, scheduler: Scheduler | None = None,
                 engine: EngineLoop | None = None) -> None:
        self.name = name
        self.local_port = local_port
        self.remote = (remote_host, remote_port)
        self.transport = transport
        self.settings = settings
        self._clock = clock
        self._prerequisite = prerequisite
        self._on_change = on_change
        self._log = unit_logger(log, tunnel=name)
        self._lock = threading.RLock()
        self._machine = StateMachine(clock)
        self._retry = RetrySchedule(settings, rnd)
        self._reasons: set[str] = set()
        self._generation = 0              # id of the current upstream; bumped when it is dropped
        self._checks = 0                  # completed upstream checks (clients wait on it)
        self._ever_up = False
        self._last_attempt = float("-inf")
        self._reconnects = 0
        # this tunnel's data path runs on one CPU, where the transport allows it
        self._cpu = data_path_cpu() if transport.pin_data_path else None
        self._clients = ClientSide(self, self._log, cpu=self._cpu, refuse_as_mysql=refuse_as_mysql,
                                   before_relay=before_relay, on_client=self._client_arrived)
        self._health = UpstreamHealth(settings, clock, transport, probe, self.remote, self._clients.traffic,
                                      self._log)
        self._listener: Any = None
        self._upstream_watch = WatchSlot()      # keepalives and the end of the current upstream
        self._forwarder: forward.Forwarder | None = None
        self._run: object | None = None   # the current run's token; None while stopped
        self._step_run = threading.local()   # .run: the run the step on this thread belongs to
        self._connecting = threading.Lock()
        self._failed_attempts = 0         # connects that failed into backoff (clients wait on it)
        self._trouble_since: float | None = None   # when the tunnel last left ``up`` (or started)
        self._failure_log = RetryLog(self._log, settings.backoff_initial, FAILURE_LOG_INTERVAL)
        self._scheduler: Scheduler | None = None
        self._engine: EngineLoop | None = None
        self._own: OwnSchedule | None = None     # a standalone run's loop and scheduler
        if scheduler is not None or engine is not None:
            self.attach_scheduler(scheduler, engine)

    def attach_scheduler(self, scheduler: Scheduler | None, engine: EngineLoop | None) -> None:
        """Be stepped by ``scheduler`` (driven on ``engine``) from the next ``start`` on."""
        if scheduler is None or engine is None:
            raise ValueError(f"tunnel {self.name!r}: pass both scheduler= and engine= (the ones "
                             "Scheduler.drive(engine) runs), or neither (it then runs its own)")
        with self._lock:
            if self._run is not None:
                raise RuntimeError(f"tunnel {self.name!r}: attach a scheduler while stopped")
            self._scheduler, self._engine = scheduler, engine

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the port and start keeping the upstream. Idempotent; a busy port -> failed state
        (call ``start`` or ``retry`` again once it is free)."""
        with self._lock:
            if self._run is not None:
                return
        try:
            self._bind()
        except PortInUseError as exc:
            self._log.warning("cannot listen: %s", exc.message)
            self._move(S.FAILED, error=exc.message, hint=exc.hint)
            return
        scheduler, engine = self._schedule()
        forwarder = forward.Forwarder(f"tunnel-{self.name}-forward", on_start=lambda: pin_this_thread(self._cpu))
        forwarder.start()
        with self._lock:
            self._run = object()
            self._forwarder = forwarder
        self._move(S.CONNECTING)
        self._clients.open(self._listener, forwarder, engine)
        if self._own is not None:
            self._own.add(self)
        else:
            scheduler.add(self)
        self._log.info("listening on 127.0.0.1:%d -> %s:%d (%s)", self.local_port, *self.remote,
                       self.transport.kind)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener, every client connection and the upstream. Idempotent."""
        with self._lock:
            self._run = None
            own = self._own
            scheduler = own.scheduler if own is not None else self._scheduler
        if scheduler is not None:
            scheduler.remove(self)
        self._clients.close()
        self._listener = None
        self._upstream_watch.clear()
        self.transport.close()
        self._clients.abort(lambda pipe: True)
        with self._lock:
            forwarder, self._forwarder = self._forwarder, None
            own, self._own = self._own, None
        if forwarder is not None:
            forwarder.close()
        if own is not None:
            own.stop(timeout)
        if self.state != S.STOPPED:
            self._move(S.STOPPED)
            self._log.info("stopped")

    def retry(self) -> None:
        """Try again now: after a busy port, a sign-in, a fixed host key, or during backoff."""
        if self._run is None:
            self.start()
        else:
            self.check_now()

    def check_now(self) -> None:
        """Check the upstream at once (after sleep/wake, new credentials, or a user's click)."""
        self.kick("check")

    def reconnect(self) -> None:
        """Rebuild the upstream now even if it looks healthy (the listener stays bound)."""
        self.kick("rebuild")

    def __enter__(self) -> "Tunnel":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state(self) -> TunnelState:
        return self._machine.state

    def status(self) -> TunnelStatus:
        with self._lock:
            now = self._machine.now
            reconnects = self._reconnects
        open_now, total = self._clients.counts()
        return TunnelStatus(name=self.name, local_port=self.local_port, state=now.state, since=now.since,
                            last_error=now.last_error, hint=now.hint, next_retry_at=now.next_retry_at,
                            transport=self.transport.kind, ssh_client=self.transport.ssh_client,
                            endpoint=f"{self.remote[0]}:{self.remote[1]}",
                            connections_open=open_now, connections_total=total, reconnects=reconnects)

    def _bind(self) -> None:
        if self._listener is None:
            self._listener = ports.bind_listener(self.local_port)
            self.local_port = self._listener.getsockname()[1]

    # ---- who steps the keeper ----------------------------------------------------------------

    def _schedule(self) -> tuple[Scheduler, EngineLoop]:
        """The scheduler and loop of this run: the attached ones, or a fresh pair of its own."""
        if self._scheduler is not None and self._engine is not None:
            return self._scheduler, self._engine
        own = OwnSchedule(f"tunnel-{self.name}-engine", self._clock)
        with self._lock:
            self._own = own
        return own.scheduler, own.engine

    def kick(self, reason: str) -> None:
        """Wake the keeper: its next step runs now and sees ``reason``. Any thread."""
        with self._lock:
            self._reasons.add(reason)
            own, scheduler = self._own, self._scheduler
        if own is not None:
            own.wake(self)
        elif scheduler is not None:
            scheduler.wake(self)

    def _take_reasons(self) -> set[str]:
        with self._lock:
            reasons, self._reasons = self._reasons, set()
            return reasons

    # ---- state moves -------------------------------------------------------------------------

    def _move(self, target: TunnelState, **details: Any) -> None:
        with self._lock:
            step_run = getattr(self._step_run, "run", None)
            if step_run is not None and step_run is not self._run:
                return                           # a step of a stopped run: its news is stale
            before = self._machine.state
            self._machine.move(target, **details)
            self._note_trouble(target)
        self._clients.news()
        if before != target:
            error = details.get("error")
            level = logging.DEBUG if (before, target) in RETRY_CYCLE else logging.INFO
            self._log.log(level, "%s -> %s%s", before.value, target.value, f" ({error})" if error else "")
        self._notify()

    def _note_trouble(self, target: TunnelState) -> None:
        """Under ``_lock``: when the current outage began (None while up)."""
        if target == S.UP:
            self._trouble_since = None
        elif self._trouble_since is None:
            self._trouble_since = self._clock.time()

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self.status())
            except Exception:
                self._log.exception("status listener failed")

    # ---- the keeper: one step at a time --------------------------------------------------------

    def step(self) -> float:
        """Do what the current state calls for; the delay (seconds) to the next step. Blocking
        (connect, keepalive, probe): the scheduler runs it on the engine's worker pool."""
        run = self._run
        if run is None:
            return math.inf
        self._step_run.run = run
        try:
            delay = on_cpu(self._cpu, self._step_in_state, run)
        except Exception:   # a bug must not kill the unit silently
            self._log.exception("keeper step failed in state %s", self.state.value)
            delay = 1.0
        finally:
            self._step_run.run = None
        return 0.0 if self._run is not run else max(0.0, delay)

    def _step_in_state(self, run: object) -> float:
        steps: dict[TunnelState, Callable[[object], float]] = {
            S.CONNECTING: self._attempt, S.RECONNECTING: self._attempt, S.UP: self._watch,
            S.BACKOFF: self._leave_backoff, S.WAITING_CREDENTIALS: self._recheck_credentials,
            S.FAILED: self._wait_user, S.NEEDS_SIGN_IN: self._wait_user}
        step = steps.get(self.state)
        return math.inf if step is None else step(run)

    def _attempt(self, run: object) -> float:
        self._last_attempt = self._clock.time()
        with self._connecting:     # one connect at a time, even with a step of a stopped run
            if self._run is not run:
                return 0.0
            try:
                if not self._credentials_ready():
                    return CREDENTIALS_RECHECK
                self.transport.connect()
            except Exception as exc:
                if self._run is run:
                    self._fail(exc)
                return 0.0
            if self._run is not run:
                self.transport.close()           # stopped meanwhile: drop what we just built
                return 0.0
        self._went_up()
        return 0.0

    def _credentials_ready(self) -> bool:
        if self._prerequisite is None or self._prerequisite():
            return True
        if self.state != S.WAITING_CREDENTIALS:
            self._move(S.WAITING_CREDENTIALS, hint="waiting for database credentials")
        return False

    def _went_up(self) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
            if self._ever_up:
                self._reconnects += 1
            self._ever_up = True
        self._clients.reset_refusal_log()
        self._failure_log.recovered()
        self._retry.connected()
        self._health.reset()
        self._watch_upstream(generation)
        self._move(S.UP)

    def _watch_upstream(self, generation: int) -> None:
        """Keepalives and the upstream's end, by events (``keepalive``): trouble kicks the keeper."""
        def trouble(reason: str) -> None:
            if self._run is not None and generation == self.current_generation():
                self.kick(reason)
        engine = self._own.engine if self._own is not None else self._engine
        if engine is not None:
            self._upstream_watch.watch(engine, self.transport, self.settings, self._clients.traffic, trouble)

    def _client_arrived(self) -> None:
        """The first client since the last probe: the keeper looks again (when a probe is due)."""
        if self._health.client_arrived() and self.state == S.UP:
            self.kick("arrived")

    def _fail(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, DbtunneldError) else TransientError(f"{type(exc).__name__}: {exc}")
        if isinstance(error, SignInNeededError):
            self._move(S.NEEDS_SIGN_IN, error=error.message, hint=error.hint)
        elif isinstance(error, NeedsUserError):
            self._move(S.FAILED, error=error.message, hint=error.hint)
        else:
            delay = self._retry.failed()
            with self._lock:
                self._failed_attempts += 1
            self._failure_log.failed(error.message, delay)
            self._move(S.BACKOFF, error=error.message, hint=error.hint or "dbtunneld retries by itself",
                       next_retry_at=self._clock.time() + delay)

    def _reconnect_state(self) -> TunnelState:
        return S.RECONNECTING if self._ever_up else S.CONNECTING

    def _watch(self, run: object) -> float:
        """While up: greeting probes when due, checks when asked, the upstream watch's news."""
        reasons = self._take_reasons()
        try:
            self._check_upstream(reasons)
        finally:
            with self._lock:
                self._checks += 1
            self._clients.news()
        return max(0.0, self._health.due_in()) if self.state == S.UP else 0.0

    def _check_upstream(self, reasons: set[str]) -> None:
        if "rebuild" in reasons:
            self._log.info("rebuilding the upstream on request")
            self._drop_upstream()
            return self._move(self._reconnect_state())
        self._apply(self._health.check(reasons))

    def _apply(self, finding: Finding) -> None:
        """What a health check's finding does to the state."""
        if finding.kind == "lost":
            self._lost(finding.error)
        elif finding.kind == "unusable":
            self._drop_upstream()
            self._move(S.FAILED, error=finding.error, hint=finding.hint)
        elif finding.kind == "proven":
            self._retry.proven()
            if finding.error:
                self._log.warning(finding.error)
                self._move(S.UP, error=finding.error, hint=finding.hint)
            elif self._machine.now.last_error:
                self._move(S.UP)

    def _lost(self, why: str) -> None:
        self._drop_upstream()
        if self._retry.immediate():
            self._log.warning("upstream lost (%s); reconnecting now", why)
            self._move(self._reconnect_state(), error=why)
            return
        self._fail(TransientError(f"upstream lost: {why}"))

    def _drop_upstream(self) -> None:
        with self._lock:
            generation = self._generation
            self._generation += 1               # clients of the old upstream wait for a new one
        self._upstream_watch.clear()
        self.transport.close()      # first: it wakes any thread blocked writing to a dead bastion
        self._clients.abort(lambda pipe: pipe.generation <= generation)

    def _leave_backoff(self, run: object) -> float:
        now = self._clock.time()
        retry_at = self._machine.now.next_retry_at or now
        if self._clients.waiting():              # a client is waiting: don't make it wait long
            retry_at = min(retry_at, self._last_attempt + self.settings.backoff_initial)
        reasons = self._take_reasons()
        if not reasons & {"check", "rebuild"} and retry_at - now > DUE_SLACK:
            return retry_at - now
        if self._run is run and self.state == S.BACKOFF:
            self._move(self._reconnect_state(), error=self._machine.now.last_error)
        return 0.0

    def _recheck_credentials(self, run: object) -> float:
        self._take_reasons()
        try:
            ready = self._credentials_ready()
        except Exception as exc:
            self._fail(exc)
            return 0.0
        if not ready:
            return CREDENTIALS_RECHECK
        self._move(self._reconnect_state())
        return 0.0

    def _wait_user(self, run: object) -> float:
        if self._take_reasons() & {"check", "rebuild"}:
            self._move(S.CONNECTING)
            return 0.0
        return math.inf

    # ---- what the client side asks (``tunnel_clients.UpstreamGate``) -----------------------------

    def failures_so_far(self) -> int:
        with self._lock:
            return self._failed_attempts

    def current_generation(self) -> int:
        with self._lock:
            return self._generation

    def client_verdict(self, failed_on: int, checks: int, failures_seen: int) -> tuple[int, int] | str | None:
        """Go ahead on (upstream id, checks) once up on an upstream other than ``failed_on`` (or
        that one passed a check since); a refusal's text; None: keep waiting."""
        with self._lock:
            state = self._machine.state
            if self._run is None:
                return "the tunnel is stopping"
            if state in (S.FAILED, S.NEEDS_SIGN_IN):
                return self.describe_trouble()
            if state == S.BACKOFF and self._failed_attempts > failures_seen and self._cannot_come_up():
                return self.describe_trouble()
            if state == S.UP and (self._generation != failed_on or self._checks > checks):
                return self._generation, self._checks
        if state == S.BACKOFF:
            self.kick("client")                  # a waiting client shortens the backoff
        return None

    def _cannot_come_up(self) -> bool:
        """Under ``_lock``: never up in this process, or down for PROMPT_REFUSAL_AFTER already: a
        client then gets the error once one more attempt fails, not after ``connect_wait``."""
        since = self._trouble_since
        return not self._ever_up or (since is not None and self._clock.time() - since >= PROMPT_REFUSAL_AFTER)

    def describe_trouble(self) -> str:
        now = self._machine.now
        text = f"dbtunneld: tunnel {self.name!r} is {now.state.value.replace('_', ' ')}"
        if now.last_error:
            text += f": {now.last_error}"
        if now.hint:
            text += f" (hint: {now.hint})"
        return text
