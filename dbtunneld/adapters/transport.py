"""How bytes reach the cluster: one ``Transport`` interface, four ways to build the upstream.

* ``ssh``: paramiko over TCP to a reachable bastion.
* ``ssm-ssh``: paramiko over an SSM ``AWS-StartSSHSession`` stream (``dbtunneld.adapters.ssm``).
* ``ssm-port-forward``: an SSM port session to the cluster, one smux stream per client; no SSH.
* ``plugin``: paramiko over AWS's ``session-manager-plugin`` run as a ProxyCommand (opt-in).

A transport is reusable: ``connect()`` builds a fresh upstream (dropping any old one),
``open_channel(host, port)`` gives each client connection its own socket-like stream. It never
retries; the tunnel that owns it does. ``transport_config.build_transport`` makes one from the config.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, Callable

from ..core.errors import ClosedError, NeedsUserError, TransientError
from . import ssh
from .discovery import classify_aws_error

log = logging.getLogger(__name__)

SessionFactory = Callable[[], Any]      # returns a boto3.Session (credentials kept fresh by its owner)


class Transport(ABC):
    """One way to reach the cluster; ``connect`` (re)builds the upstream."""

    kind = ""
    # Whether the tunnel may pin its threads to one CPU (see tunnel.data_path_cpu). Only where it
    # was measured to help: plain SSH. Over SSM, pinned threads cut 50-connection transfers short
    # (the SSH socket's writes failed), so those paths stay unpinned until that is understood.
    pin_data_path = False
    # True: the tunnel hands accepted client sockets to ``await adopt(client, host, port, timeout)``
    # on its engine loop (a handle with close() / done / on_end) and never moves their bytes
    # (``openssh_transport``).
    adopts_clients = False
    ssh_client = ""          # who speaks SSH: "paramiko", "openssh"; "" without SSH (ssm-port-forward)

    @abstractmethod
    def connect(self) -> None:
        """Build a fresh upstream, replacing any previous one. Raises dbtunneld errors."""

    @abstractmethod
    def open_channel(self, host: str, port: int, timeout: float) -> Any:
        """A socket-like stream (recv / sendall / close; shutdown_write or shutdown) to host:port."""

    @abstractmethod
    def is_alive(self) -> bool:
        """False once the upstream is known to be gone."""

    def ping(self, timeout: float) -> bool:
        """Does the far side answer within ``timeout``? (SSH keepalive; liveness otherwise.)"""
        return self.is_alive()

    async def adopt(self, client: socket.socket, host: str, port: int, timeout: float) -> Any:
        """Forward ``client`` to host:port itself (only when ``adopts_clients``), handed over on the
        running asyncio loop (the engine's); a handle with ``on_end`` / ``abort`` / ``received``,
        like a ``forward_link.Link``."""
        raise NotImplementedError(f"transport {self.kind!r} does not adopt client sockets")

    def adopt_blocking(self, client: socket.socket, host: str, port: int, timeout: float) -> Any:
        """``adopt`` for a caller on no loop: blocks the calling thread."""
        raise NotImplementedError(f"transport {self.kind!r} does not adopt client sockets")

    def ping_interval(self, keepalive_interval: float) -> float:
        """How often the tunnel pings while up (an upstream that keeps itself alive: never)."""
        return keepalive_interval

    def keepalive(self, answered: Callable[[], None], wait: bool = False) -> bool | None:
        """Send one keepalive without waiting for its reply; ``answered()`` runs (any thread) when
        the far side replies. True: sent; False: the upstream is gone; None: not sent (it would
        block, or this transport has none that answers by event): the tunnel then calls ``ping``
        on a worker thread."""
        return None

    def on_closed(self, callback: Callable[[], None]) -> None:
        """``callback()`` once (any thread) when the current upstream ends, underneath or by
        ``close``; at once when there is none. Every dbtunneld transport signals it by event
        (``upstream_end.UpstreamEnd``); this fallback, for stand-ins, waits in ``wait_closed``."""
        if not self.is_alive():
            callback()
            return
        threading.Thread(target=lambda: (self.wait_closed(None), callback()), name=f"{self.kind}-end-watch",
                         daemon=True).start()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the current upstream dies (or ``timeout``); True when it is gone."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.is_alive():
            left = 1.0 if end is None else min(1.0, end - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)   # fallback for upstreams that cannot signal their end
        return not self.is_alive()

    @abstractmethod
    def close(self) -> None:
        """Drop the upstream; idempotent."""

    def describe(self) -> str:
        return self.kind

    def why_closed(self) -> str:
        """Why the upstream ended, when it knows more than "it closed" ('' otherwise)."""
        return ""


# ---- SSH-based transports --------------------------------------------------------------------

class SshBasedTransport(Transport):
    """paramiko over some carrier (TCP, SSM stream, ProxyCommand). ``channel_window``, when set,
    caps the SSH channel window the options ask for."""

    ssh_client = "paramiko"
    channel_window: int | None = None

    def __init__(self, options_for: Callable[[str], ssh.SshOptions]) -> None:
        self._options_for = options_for
        self._conn: ssh.SshConnection | None = None
        self._pending: Any = None
        self._lock = threading.Lock()
        self._label = ""

    @abstractmethod
    def _open_carrier(self) -> tuple[Any, str]:
        """The socket-like to run SSH over, and the bastion's known_hosts name."""

    def _before_auth(self, label: str, options: ssh.SshOptions) -> ssh.SshOptions:
        return options

    def connect(self) -> None:
        self.close()
        carrier, label = self._open_carrier()
        with self._lock:
            self._pending = carrier              # close() during the handshake cuts it short
        try:
            options = self._before_auth(label, self._options_for(label))
            if self.channel_window is not None and options.window_size > self.channel_window:
                options = replace(options, window_size=self.channel_window)
            conn = ssh.connect(carrier, options)
        except BaseException:
            _close(carrier)
            raise
        finally:
            with self._lock:
                self._pending = None
        with self._lock:
            self._conn, self._label = conn, label

    def _current(self) -> ssh.SshConnection:
        conn = self._conn
        if conn is None:
            raise TransientError(f"{self.kind}: not connected")
        return conn

    def open_channel(self, host: str, port: int, timeout: float) -> Any:
        return self._current().open_channel(host, port, timeout)

    def is_alive(self) -> bool:
        conn = self._conn
        return conn is not None and conn.is_alive()

    def ping(self, timeout: float) -> bool:
        conn = self._conn
        return conn is not None and conn.ping(timeout)

    def keepalive(self, answered: Callable[[], None], wait: bool = False) -> bool | None:
        conn = self._conn
        return False if conn is None else conn.keepalive(answered, wait)

    def on_closed(self, callback: Callable[[], None]) -> None:
        conn = self._conn
        if conn is None:
            callback()
        else:
            conn.on_closed(callback)     # paramiko's reader ends: EOF from the carrier, or close()

    def wait_closed(self, timeout: float | None = None) -> bool:
        conn = self._conn
        return True if conn is None else conn.wait_closed(timeout)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            pending = self._pending
        if conn is not None:
            conn.close()
        if pending is not None:
            _shutdown(pending)
        self._close_carrier_extras()

    def _close_carrier_extras(self) -> None:
        """Release what the carrier held besides the socket (an SSM session)."""

    def describe(self) -> str:
        return f"{self.kind} via {self._label}" if self._label else self.kind


class SshTransport(SshBasedTransport):
    """Plain SSH to ``host:port`` (TCP with TCP_NODELAY)."""

    kind = "ssh"
    pin_data_path = True

    def __init__(self, host: str, port: int, options_for: Callable[[str], ssh.SshOptions],
                 ephemeral: Callable[[ssh.SshOptions], ssh.SshOptions] | None = None,
                 connect_timeout: float = 10.0) -> None:
        super().__init__(options_for)
        self.host, self.port = host, port
        self._ephemeral = ephemeral
        self._connect_timeout = connect_timeout

    def _open_carrier(self) -> tuple[Any, str]:
        return (ssh.tcp_connect(self.host, self.port, self._connect_timeout),
                ssh.known_hosts_name(self.host, self.port))

    def _before_auth(self, label: str, options: ssh.SshOptions) -> ssh.SshOptions:
        return self._ephemeral(options) if self._ephemeral else options


# The SSH channel window over an SSM data channel. The channel is one ordered stream and the
# agent queues without limit (amazon-ssm-agent datachannel.go SendStreamDataMessage: no window;
# its port plugin reads the bastion's socket as fast as it comes), so whatever sshd may send ahead
# (the sum of the channels' windows) sits in front of every other channel's bytes: a new client's
# open confirmation or a small query's answer waits behind it (~1 s per MB at the agent's pace).
# 1 MiB still exceeds the data channel's bandwidth-delay product (a few MB/s x ~0.1 s).
SSM_CHANNEL_WINDOW = 1024 * 1024


class SsmSshTransport(SshBasedTransport):
    """SSH over an SSM ``AWS-StartSSHSession`` stream (dbtunneld's own SSM client)."""

    kind = "ssm-ssh"
    channel_window = SSM_CHANNEL_WINDOW

    def __init__(self, session_factory: SessionFactory, target: Callable[[], str],
                 options_for: Callable[[str], ssh.SshOptions],
                 ephemeral: Callable[[str, ssh.SshOptions], ssh.SshOptions] | None = None,
                 endpoint_url: str | None = None, region: str | None = None, port: int = 22,
                 kms_endpoint_url: str | None = None) -> None:
        super().__init__(options_for)
        self._session_factory = session_factory
        self._target = target
        self._ephemeral = ephemeral
        self._endpoint_url, self._region, self._port = endpoint_url, region, port
        self._kms_endpoint_url = kms_endpoint_url
        self._ssm: Any = None

    def _open_carrier(self) -> tuple[Any, str]:
        from .ssm import start_ssh_session

        target = self._target()
        try:
            session = start_ssh_session(self._session_factory(), target, port=self._port,
                                        endpoint_url=self._endpoint_url, region=self._region,
                                        kms_endpoint_url=self._kms_endpoint_url)
        except Exception as exc:
            raise classify_aws_error(exc, f"SSM StartSession to {target}") from None
        self._ssm = session
        return session.sock, target

    def is_alive(self) -> bool:
        session = self._ssm
        return super().is_alive() and session is not None and session.is_alive()

    def _before_auth(self, label: str, options: ssh.SshOptions) -> ssh.SshOptions:
        return self._ephemeral(label, options) if self._ephemeral else options

    def _close_carrier_extras(self) -> None:
        session, self._ssm = self._ssm, None
        if session is not None:
            _close(session)


class PluginTransport(SshBasedTransport):
    """SSH over AWS's ``session-manager-plugin`` as ProxyCommand (``dbtunneld.adapters.ssm.PluginProxy``:
    the session token travels in the environment, the plugin is stopped with SIGINT)."""

    kind = "plugin"
    channel_window = SSM_CHANNEL_WINDOW

    def __init__(self, session_factory: SessionFactory, target: Callable[[], str],
                 options_for: Callable[[str], ssh.SshOptions], plugin_path: str = "",
                 endpoint_url: str | None = None, region: str | None = None, port: int = 22) -> None:
        super().__init__(options_for)
        self._session_factory = session_factory
        self._target = target
        self._plugin_path = plugin_path or None
        self._endpoint_url, self._region, self._port = endpoint_url, region, port

    def _open_carrier(self) -> tuple[Any, str]:
        from .ssm import PluginProxy, find_plugin

        find_plugin(self._plugin_path)        # a clear error before any session is started
        target = self._target()
        try:
            proxy = PluginProxy.start(self._session_factory(), target, port=self._port, region=self._region,
                                      endpoint_url=self._endpoint_url, plugin_path=self._plugin_path)
        except Exception as exc:
            raise classify_aws_error(exc, f"SSM StartSession to {target} (plugin)") from None
        return proxy, target


# ---- SSM port forwarding (no SSH) --------------------------------------------------------------

class SsmPortForwardTransport(Transport):
    """An SSM port session to the cluster endpoint; each client gets its own smux stream.

    The session is closed (so the tunnel rebuilds it) when it goes stale after an Aurora
    failover: the endpoint's DNS answer changed, the agent could not dial, or the writer answered
    read-only (``ssm.failover``). ``resolve`` and ``dns_interval`` (None: no DNS watch) tune it."""

    kind = "ssm-port-forward"

    def __init__(self, session_factory: SessionFactory, target: Callable[[], str], host: str, port: int,
                 endpoint_url: str | None = None, region: str | None = None,
                 kms_endpoint_url: str | None = None, resolve: Callable[[str], frozenset] | None = None,
                 dns_interval: float | None = 5.0) -> None:
        from .ssm.failover import is_writer_endpoint, system_resolver

        self._session_factory = session_factory
        self._target = target
        self.host, self.port = host, port
        self._endpoint_url, self._region = endpoint_url, region
        self._kms_endpoint_url = kms_endpoint_url
        self._resolve = resolve or system_resolver
        self._dns_interval = dns_interval
        self._writer = is_writer_endpoint(host)
        self._dns_watch: Any = None
        self._session: Any = None
        self._label = ""

    def connect(self) -> None:
        from .ssm import start_port_forward

        self.close()
        target = self._target()
        try:
            session = start_port_forward(self._session_factory(), target, self.host, self.port,
                                         endpoint_url=self._endpoint_url, region=self._region,
                                         kms_endpoint_url=self._kms_endpoint_url)
        except Exception as exc:
            raise classify_aws_error(exc, f"SSM port session to {target}") from None
        self._session, self._label = session, target
        self._watch_for_failover(session)

    def _watch_for_failover(self, session: Any) -> None:
        from .ssm.failover import EndpointWatch

        session.on_connect_error = lambda: self._stale(session, f"the agent could not connect to {self.host}:{self.port}")
        if self._dns_interval and self._writer:
            self._dns_watch = EndpointWatch(self.host, lambda why: self._stale(session, why),
                                            resolve=self._resolve, interval=self._dns_interval)

    def _stale(self, session: Any, why: str) -> None:
        """Close a session that reaches the wrong server; the tunnel sees it die and rebuilds."""
        if session is not self._session or not session.is_alive():
            return
        log.warning("ssm-port-forward via %s: %s; starting a new SSM session (Aurora failover?)", self._label, why)
        session.last_error = TransientError(f"SSM port session went stale: {why}")
        threading.Thread(target=_close, args=(session,), name="ssm-failover-close", daemon=True).start()

    def _read_only(self, session: Any, code: int) -> None:
        self._stale(session, f"{self.host} answered with MySQL error {code} (read-only) on the writer endpoint")

    def open_channel(self, host: str, port: int, timeout: float) -> Any:
        session = self._session
        if session is None:
            raise TransientError("ssm-port-forward: not connected")
        if (host, port) != (self.host, self.port):
            raise ClosedError(f"this port session reaches {self.host}:{self.port}, not {host}:{port}")
        try:
            stream = session.open_stream(timeout)
        except Exception as exc:
            raise _as_transient(exc, f"ssm-port-forward via {self._label}: cannot open a stream") from None
        if not self._writer:
            return stream
        from .ssm.failover import ReadOnlyWatch
        return ReadOnlyWatch(stream, lambda code: self._read_only(session, code))

    def is_alive(self) -> bool:
        session = self._session
        return session is not None and session.is_alive()

    def keepalive(self, answered: Callable[[], None], wait: bool = False) -> bool | None:
        """The session keeps itself alive (WebSocket pings); a keepalive is its liveness flag."""
        if not self.is_alive():
            return False
        answered()
        return True

    def on_closed(self, callback: Callable[[], None]) -> None:
        session = self._session
        if session is None:
            callback()
        else:
            session.on_closed(callback)   # the data channel closed (underneath, or close())

    def wait_closed(self, timeout: float | None = None) -> bool:
        session = self._session
        return True if session is None else bool(session.wait_closed(timeout))

    def why_closed(self) -> str:
        session = self._session
        error = getattr(session, "last_error", None)
        return error.message if error is not None else ""

    def close(self) -> None:
        session, self._session = self._session, None
        watch, self._dns_watch = self._dns_watch, None
        if watch is not None:
            watch.stop()
        if session is not None:
            _close(session)

    def describe(self) -> str:
        return f"{self.kind} via {self._label}" if self._label else self.kind


def _as_transient(exc: Exception, doing: str) -> Exception:
    if isinstance(exc, (TransientError, NeedsUserError, ClosedError)):
        return exc
    return TransientError(f"{doing}: {exc or type(exc).__name__}")


def _shutdown(carrier: Any) -> None:
    """Cut a carrier mid-handshake (its owner closes it)."""
    try:
        if isinstance(carrier, socket.socket):
            carrier.shutdown(socket.SHUT_RDWR)
        else:
            carrier.close()
    except Exception as exc:
        log.debug("shutdown %r: %s", carrier, exc)


def _close(obj: Any) -> None:
    try:
        obj.close()
    except Exception as exc:  # closing must not raise
        log.debug("close %r: %s", obj, exc)
