"""The SSM stand-in: StartSession & co. plus the agent side of the data channel, on loopback.

moto has no Session Manager, and no SSM agent can run here, so this stand-in plays both AWS
parts a session touches, following their wire behaviour (see ``ssm_agent`` for the agent):

* the SSM JSON 1.1 API (``X-Amz-Target: AmazonSSM.<Operation>``, SigV4 verified by
  ``ssm_sigv4``): StartSession (``AWS-StartSSHSession``,
  ``AWS-StartPortForwardingSessionToRemoteHost``), ResumeSession, TerminateSession,
  DescribeSessions, DescribeInstanceInformation (``ssm_inventory``); other operations are forwarded to ``--forward-url`` (moto) when given;
* the data-channel websockets at ``ws://HOST:PORT/v1/data-channel/<session-id>`` (the stream
  URL StartSession returns, its query holding ``/``, ``+`` and ``=`` as real ones may): the
  upgrade must be SigV4-signed for ``ssmmessages`` (Authorization header, canonical query as
  aws-sdk-go v1 builds it; or a presigned URL) and the first message must carry the session's
  current token (OpenDataChannel); each ResumeSession issues a new token;
* the service's preferences, the idle session timeout and the max session duration, ending a
  session as the service does (the session table, ``ssm_sessions``, cites the sources);
* the VPC's DNS as the agent sees it (``ssm_vpc_dns``);
* a control API for tests and the sandbox (``ssm_control``; no auth, loopback only: health, the
  session table, faults, closing / terminating / pausing / freezing a session, the DNS table,
  the managed nodes).

KMS-encrypted sessions (``kms``, ``ssm_kms``: the account's Session Manager preference) and a
``stream_base`` for stream URLs behind a TLS front are set at start (``ssm_standin_cli``).

Modes: ``realistic`` (the default) paces and resends like the agent (~1 MB/s); ``fast`` is for
tests of the client's own throughput (say so in the test). The command line is in
``ssm_standin_cli`` (``--vpc-dns-seed MOTO_SEED.json``: moto's Aurora endpoint names resolve to
127.0.0.1, standing in for the VPC's DNS). In-process: ``SsmStandIn(...).start_background()``
returns once listening (``.url``); ``stop_background()`` ends every session and stops. Tokens are
never logged.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import logging
import re
import secrets
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

from .ssm_agent import DEFAULT_AGENT_VERSION, AgentSession, Faults
from .ssm_agent_port import PortPlugin, Resolver, system_resolve
from .ssm_control import ControlApi
from .ssm_kms import KmsEncryption, KmsSettings
from .ssm_inventory import InventoryError, ManagedInstances
from .ssm_http import HttpRequest, HttpResponse, HttpServer, WsConnection
from .ssm_sessions import ACTIVE, SessionRecord, SessionTable
from .ssm_sigv4 import SignatureError, SignedBy, Verifier
from .ssm_vpc_dns import VpcDns

log = logging.getLogger("dbtunneld.sandbox.ssm_standin")

SSH_DOCUMENT = "AWS-StartSSHSession"
REMOTE_DOCUMENT = "AWS-StartPortForwardingSessionToRemoteHost"
JSON_11 = "application/x-amz-json-1.1"
STREAM_PATH = re.compile(r"^/v1/data-channel/([A-Za-z0-9_.@-]+)$")
TARGET_SYNTAX = re.compile(r"^((i|mi)-[0-9a-f]{8,17}|ecs:[^_\s]+_[^_\s]+_\S+)$")
OPEN_TIMEOUT = 10.0


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class SsmStandIn:
    """The stand-in server. Asyncio: ``await start()`` / ``await stop()``, or the *_background pair."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        targets: dict[str, tuple[str, int]] | None = None,
        allow_remote: list[str] | tuple[str, ...] = (),
        faults: Faults | None = None,
        agent_version: str = DEFAULT_AGENT_VERSION,
        forward_url: str | None = None,
        allow_unsigned_websocket: bool = False,
        vpc_dns_file: str | None = None,
        credentials: dict[str, str] | None = None,
        accept_unknown_keys: bool = False,
        resolve: Resolver = system_resolve,
        stream_base: str = "",
        kms: KmsSettings | None = None,
    ) -> None:
        self.host = host
        self.vpc_dns_file = vpc_dns_file
        self.stream_base = stream_base.rstrip("/")  # scheme://host[:port] of stream URLs (a TLS front)
        self.kms = kms  # the account encrypts sessions with this KMS key
        self.vpc_dns = VpcDns(vpc_dns_file, resolve)   # moto's Aurora names, the /_standin/dns table
        self.dns = self.vpc_dns.table  # /_standin/dns answers, before ``resolve``
        self.allow_unsigned_websocket = allow_unsigned_websocket
        self.verifier = Verifier(credentials, accept_unknown_keys=accept_unknown_keys)
        self.resolve = self.vpc_dns.resolve  # how agents look up remote hosts (once per session): the DNS seam
        self.port = port
        self.targets = dict(targets or {})
        self.allow_remote = list(allow_remote)
        self.faults = faults or Faults()
        self.agent_version = agent_version
        self.forward_url = forward_url
        self.table = SessionTable(self.faults)
        self.sessions = self.table.sessions
        self.instances = ManagedInstances(vpc_dns_file)  # DescribeInstanceInformation's nodes
        self._control = ControlApi(self.table, self.faults, self.vpc_dns, self.instances)
        self._server = HttpServer(self._http, self._websocket, self._authorize_websocket)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        self.port = await self._server.start(self.host, self.port)
        log.info("SSM stand-in listening on %s (targets: %s)", self.url, ", ".join(self.targets) or "none")
        return self.url

    async def stop(self) -> None:
        await self.table.end_all("the stand-in stopped")
        await self._server.stop()

    # --- in-process use ---------------------------------------------------------------------------

    def start_background(self, timeout: float = 10.0) -> "SsmStandIn":
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stopped = asyncio.Event()
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_until_complete(self._stopped.wait())
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="ssm-standin", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"SSM stand-in did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop_background(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout)

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the background loop (tests poke sessions this way)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- HTTP dispatch ----------------------------------------------------------------------------

    async def _http(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/_standin/"):
            return await self._control.handle(request)
        target = request.header("x-amz-target")
        if request.method == "POST" and target.startswith("AmazonSSM."):
            return await self._api(request, target.split(".", 1)[1])
        return HttpResponse.json({"message": f"no route for {request.method} {request.path}"}, 404)

    async def _api(self, request: HttpRequest, operation: str) -> HttpResponse:
        try:
            owner = self._check_signature(request, "ssm")
            handler = getattr(self, f"_op_{operation}", None)
            if handler is None:
                return await self._forward(request, operation)
            return HttpResponse.json(await handler(request.json(), owner), content_type=JSON_11)
        except ApiError as exc:
            return HttpResponse.json({"__type": exc.code, "message": exc.message}, exc.status, content_type=JSON_11, **{"x-amzn-ErrorType": exc.code})
        except (ValueError, KeyError, TypeError) as exc:
            return HttpResponse.json({"__type": "ValidationException", "message": str(exc)}, 400, content_type=JSON_11)

    def _check_signature(self, request: HttpRequest, service: str) -> str:
        return self._verify(request, service).access_key

    def _verify(self, request: HttpRequest, service: str) -> SignedBy:
        try:
            return self.verifier.verify(request.method, request.target, request.headers, request.body, service, now=_utcnow())
        except SignatureError as exc:
            raise ApiError(exc.code, exc.message, 403) from None

    async def _forward(self, request: HttpRequest, operation: str) -> HttpResponse:
        if not self.forward_url:
            raise ApiError("UnknownOperationException", f"the SSM stand-in does not implement {operation}")
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "connection", "content-length")}
        req = urllib.request.Request(self.forward_url, data=request.body, headers=headers, method="POST")

        def call() -> HttpResponse:
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return HttpResponse(resp.status, resp.read(), {"Content-Type": resp.headers.get("Content-Type", JSON_11)})
            except urllib.error.HTTPError as exc:
                return HttpResponse(exc.code, exc.read(), {"Content-Type": exc.headers.get("Content-Type", JSON_11)})

        return await asyncio.get_running_loop().run_in_executor(None, call)

    # --- SSM operations ---------------------------------------------------------------------------

    async def _op_StartSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        target = str(body.get("Target") or "")
        if self._target_address(target) is None:
            raise ApiError("InvalidTarget", f"{target} is not connected to the stand-in (known: {', '.join(self.targets) or 'none'})")
        document = str(body.get("DocumentName") or "")
        plugin = self._plugin_for(target, document, body.get("Parameters") or {})
        session_id = f"{re.sub(r'[^A-Za-z0-9]', '', owner)[:32] or 'standin'}-{secrets.token_hex(9)}"
        record = SessionRecord(session_id, target, document, body.get("Parameters") or {}, owner, agent=None)  # type: ignore[arg-type]
        record.agent = AgentSession(
            session_id,
            plugin,
            self.faults,
            agent_version=self.agent_version,
            on_end=lambda reason, r=record: self.table.end(r, reason),
            on_state=lambda state, r=record: self.table.set_state(r, state),
        )
        if self.kms is not None:
            record.agent.actions.append(KmsEncryption(self.kms, session_id, target))
        self.table.add(record)
        log.info("StartSession %s: %s on %s (%s mode)", session_id, document, target, record.agent.mode)
        return self._grant(record)

    def _plugin_for(self, target: str, document: str, params: dict[str, Any]) -> PortPlugin:
        def param(name: str, default: str | None = None) -> str:
            values = params.get(name) or ([default] if default is not None else [])
            if not values:
                raise ApiError("InvalidParameters", f"parameter {name} is required by {document}")
            return str(values[0])

        if document == SSH_DOCUMENT:
            port = param("portNumber", "22")
            address = self._target_address(target)
            assert address is not None
            return PortPlugin({"portNumber": port}, *address, resolve=self.resolve)
        if document == REMOTE_DOCUMENT:
            host, port = param("host"), param("portNumber")
            address = self.vpc_dns.address(host)
            if not self._remote_allowed(address, port):
                raise ApiError("InvalidParameters", f"the stand-in only forwards to --allow-remote hosts; {host}:{port} is not one")
            props = {"portNumber": port, "type": "LocalPortForwarding", "host": host, "localPortNumber": param("localPortNumber", "0")}
            return PortPlugin(props, host, int(port), resolve=self.resolve)
        raise ApiError("InvalidDocument", f"document {document!r} is not supported by the stand-in")

    def _target_address(self, target: str) -> tuple[str, int] | None:
        """Where SSH sessions to ``target`` go: its own ``--target`` or the ``*`` one."""
        if target in self.targets:
            return self.targets[target]
        if "*" in self.targets and TARGET_SYNTAX.match(target):
            return self.targets["*"]
        return None

    def _remote_allowed(self, host: str, port: str) -> bool:
        return host in self.allow_remote or f"{host}:{port}" in self.allow_remote

    def _grant(self, record: SessionRecord) -> dict[str, Any]:
        return self.table.grant(record, self.stream_base or f"ws://{self.host}:{self.port}")

    async def _op_ResumeSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        record = self._session(body)
        if record.status not in ACTIVE:
            return {"SessionId": record.session_id}  # no token: the session is over
        log.info("ResumeSession %s", record.session_id)
        return self._grant(record)

    async def _op_TerminateSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        record = self._session(body)
        await self.table.end(record, "terminated by TerminateSession")
        return {"SessionId": record.session_id}

    async def _op_DescribeSessions(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        state = body.get("State")
        if state not in ("Active", "History"):
            raise ApiError("ValidationException", "State must be Active or History")
        wanted = {f.get("key"): f.get("value") for f in body.get("Filters") or []}
        return {"Sessions": self.table.describe(state, wanted)}

    async def _op_DescribeInstanceInformation(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        try:
            return self.instances.describe(body)
        except InventoryError as exc:
            raise ApiError(exc.code, exc.message) from None

    def _session(self, body: dict[str, Any]) -> SessionRecord:
        record = self.sessions.get(str(body.get("SessionId") or ""))
        if record is None:
            raise ApiError("DoesNotExistException", f"session {body.get('SessionId')!r} does not exist")
        return record

    # --- data channel websockets ------------------------------------------------------------------

    def _authorize_websocket(self, request: HttpRequest) -> HttpResponse | None:
        match = STREAM_PATH.match(request.path)
        record = self.sessions.get(match.group(1)) if match else None
        if record is None or record.status not in ACTIVE:
            return HttpResponse.json({"message": "no such active session"}, 404)
        if self.allow_unsigned_websocket and not request.header("authorization") and "X-Amz-Signature" not in request.query:
            return None
        try:
            self._verify(request, "ssmmessages")
        except ApiError as exc:
            log.warning("session %s: websocket upgrade refused: %s: %s", record.session_id, exc.code, exc.message)
            return HttpResponse.json({"__type": exc.code, "message": f"the websocket upgrade must be SigV4-signed for ssmmessages: {exc.message}"}, 403)
        return None

    async def _websocket(self, conn: WsConnection) -> None:
        match = STREAM_PATH.match(conn.request.path)
        record = self.sessions.get(match.group(1)) if match else None
        if record is None:
            await conn.close(1008, "no such session")
            return
        try:
            first = await asyncio.wait_for(conn.__anext__(), OPEN_TIMEOUT)
            opened = json.loads(first) if isinstance(first, str) else {}
        except (asyncio.TimeoutError, StopAsyncIteration, ValueError):
            opened = {}
        token = str(opened.get("TokenValue") or "")
        if not record.token or not hmac.compare_digest(token.encode(), record.token.encode()):
            log.warning("session %s: OpenDataChannel with a wrong or stale token; closing", record.session_id)
            await conn.close(1008, "invalid token")
            return
        await record.agent.serve(conn)

# --- the sandbox stack --------------------------------------------------------------------------


def stack_service(services: Any) -> Any:
    """The stand-in as a service of the sandbox stack (``services``: the stack's
    ``stack_services.StackServices``): SSH sessions to any target reach the stack's sshd; port
    sessions may reach the stack's MariaDB ports."""
    from .procs import http_probe

    port = services.port("ssm")
    args = ["--port", str(port), "--target", f"*=127.0.0.1:{services.port('sshd')}",
            "--vpc-dns-seed", str(services.seed_file), "--accept-unknown-keys"]  # moto mints the keys
    for db in services.mariadb.values():
        args += ["--allow-remote", f"127.0.0.1:{db.port}", "--allow-remote", f"localhost:{db.port}"]
    ready = http_probe(f"http://127.0.0.1:{port}/_standin/health")
    return services.python_service("ssm-standin", "dbtunneld.sandbox.ssm_standin", args, ready, port)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


if __name__ == "__main__":
    from .ssm_standin_cli import main

    sys.exit(main())
