"""The SSM stand-in: StartSession & co. plus the agent side of the data channel, on loopback.

moto has no Session Manager, and no SSM agent can run here, so this stand-in plays both AWS
parts a session touches, following their wire behaviour (see ``ssm_agent`` for the agent):

* the SSM JSON 1.1 API (``X-Amz-Target: AmazonSSM.<Operation>``, a SigV4 ``Authorization``
  header required): StartSession (``AWS-StartSSHSession``,
  ``AWS-StartPortForwardingSessionToRemoteHost``), ResumeSession, TerminateSession,
  DescribeSessions; other operations are forwarded to ``--forward-url`` (moto) when given;
* the data-channel websockets at ``ws://HOST:PORT/v1/data-channel/<session-id>`` (the stream
  URL StartSession returns): the upgrade must carry a SigV4 ``Authorization`` for
  ``ssmmessages`` and the first message the session's current token (OpenDataChannel); each
  ResumeSession issues a new token;
* a control API for tests and the sandbox (no auth; loopback only):
  ``GET /_standin/health``; ``GET /_standin/sessions`` (the session table: status
  Connecting / Connected / Disconnected / Terminated, with stats); ``GET|POST /_standin/faults``
  (JSON: ``drop``, ``delay_ms``, ``jitter_ms``, ``close_after_messages``, ``agent_payload``,
  ``seed``); ``POST /_standin/sessions/<id>/close-websocket`` (``{"mode": "close"|"abort"}``);
  ``POST /_standin/sessions/<id>/terminate`` (``{"reason": "..."}``: a service-side end);
  ``POST /_standin/sessions/<id>/pause`` (``{"seconds": 1}``: pause/start publication);
  ``GET|POST /_standin/dns`` (``{"name": "db.example", "addresses": ["127.0.0.2"]}``: what the
  VPC's resolver answers; a port session resolves its host once, at StartSession, like the agent).

Command line (prints one line ``READY http://HOST:PORT`` on stdout when it listens, logs on
stderr, runs until SIGTERM/SIGINT or until its parent exits)::

    python -m dbtunneld.sandbox.ssm_standin --port 0 \\
        --target i-0abc0123456789def=127.0.0.1:2222   # SSH sessions to this target reach this sshd
        --target ecs:demo_task_runtime=127.0.0.1:2222 # ECS targets too (repeat --target)
        --target '*=127.0.0.1:2222'                   # any instance id / ECS target (the sandbox)
        --allow-remote 127.0.0.1[:PORT]               # hosts port sessions may reach (repeatable)
        [--host 127.0.0.1] [--drop 0.05] [--delay-ms 0] [--jitter-ms 0]
        [--close-after-messages 0] [--agent-payload 1024] [--seed N]
        [--agent-version 3.3.1142.0] [--forward-url http://127.0.0.1:MOTO]
        [--allow-unsigned-websocket] [--stream-base wss://NAME[:PORT]] [--log-level INFO]
        [--kms-key-id KEY --kms-endpoint http://127.0.0.1:MOTO [--kms-require-challenge]]

In-process: ``SsmStandIn(...).start_background()`` returns once listening (``.url``);
``stop_background()`` ends every session and stops. Tokens are never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .ssm_agent import DEFAULT_AGENT_VERSION, AgentSession, Faults, PortPlugin
from .ssm_kms import AgentCipher, KmsSettings
from .ssm_http import HttpRequest, HttpResponse, HttpServer, WsConnection

log = logging.getLogger("dbtunneld.sandbox.ssm_standin")

SSH_DOCUMENT = "AWS-StartSSHSession"
REMOTE_DOCUMENT = "AWS-StartPortForwardingSessionToRemoteHost"
JSON_11 = "application/x-amz-json-1.1"
STREAM_PATH = re.compile(r"^/v1/data-channel/([A-Za-z0-9_.@-]+)$")
CONTROL_SESSION = re.compile(r"^/_standin/sessions/([A-Za-z0-9_.@-]+)/(close-websocket|terminate|pause)$")
SIGV4 = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, ?SignedHeaders=[^,]+, ?Signature=[0-9a-f]{64}$")
TARGET_SYNTAX = re.compile(r"^((i|mi)-[0-9a-f]{8,17}|ecs:[^_\s]+_[^_\s]+_\S+)$")
OPEN_TIMEOUT = 10.0
ACTIVE = ("Connecting", "Connected", "Disconnected")


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class SessionRecord:
    session_id: str
    target: str
    document: str
    parameters: dict[str, list[str]]
    owner: str
    agent: AgentSession
    token: str = field(repr=False, default="")
    status: str = "Connecting"
    reason: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    connections: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "SessionId": self.session_id,
            "Target": self.target,
            "DocumentName": self.document,
            "Status": self.status,
            "Owner": self.owner,
            "StartDate": self.started,
            "EndDate": self.ended,
            "Reason": self.reason,
            "Connections": self.connections,
            "ClientVersion": self.agent.client_version,
            "Stats": dict(self.agent.stats),
        }


def parse_sigv4(header: str) -> tuple[str, str, str] | None:
    """(access key, region, service) from a SigV4 Authorization header, or None."""
    match = SIGV4.match(header.strip())
    return (match.group(1), match.group(3), match.group(4)) if match else None


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
        stream_base: str = "",
        kms: KmsSettings | None = None,
    ) -> None:
        self.kms = kms
        self.dns: dict[str, list[str]] = {}  # the VPC resolver's answers (tests flip them: failover)
        self.host = host
        self.stream_base = stream_base.rstrip("/")
        self.allow_unsigned_websocket = allow_unsigned_websocket
        self.port = port
        self.targets = dict(targets or {})
        self.allow_remote = list(allow_remote)
        self.faults = faults or Faults()
        self.agent_version = agent_version
        self.forward_url = forward_url
        self.sessions: dict[str, SessionRecord] = {}
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
        for record in list(self.sessions.values()):
            if record.status in ACTIVE:
                await self._end(record, "the stand-in stopped")
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
            return await self._control(request)
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
        parsed = parse_sigv4(request.header("authorization"))
        if parsed is None:
            raise ApiError("IncompleteSignatureException", "a SigV4 Authorization header is required", 403)
        access_key, _region, signed_for = parsed
        if signed_for != service:
            raise ApiError("InvalidSignatureException", f"signed for service {signed_for!r}, expected {service!r}", 403)
        return access_key

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
            on_end=lambda reason, r=record: self._end(r, reason),
            on_state=lambda state, r=record: self._set_state(r, state),
            cipher=AgentCipher(self.kms, session_id, target) if self.kms else None,
        )
        self.sessions[session_id] = record
        log.info("StartSession %s: %s on %s", session_id, document, target)
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
            return PortPlugin({"portNumber": port}, *address)
        if document == REMOTE_DOCUMENT:
            host, port = param("host"), param("portNumber")
            if not self._remote_allowed(host, port):
                raise ApiError("InvalidParameters", f"the stand-in only forwards to --allow-remote hosts; {host}:{port} is not one")
            props = {"portNumber": port, "type": "LocalPortForwarding", "host": host, "localPortNumber": param("localPortNumber", "0")}
            return PortPlugin(props, self._resolve_once(host), int(port))
        raise ApiError("InvalidDocument", f"document {document!r} is not supported by the stand-in")

    def _target_address(self, target: str) -> tuple[str, int] | None:
        """Where SSH sessions to ``target`` go: its own ``--target`` or the ``*`` one."""
        if target in self.targets:
            return self.targets[target]
        if "*" in self.targets and TARGET_SYNTAX.match(target):
            return self.targets["*"]
        return None

    def _resolve_once(self, host: str) -> str:
        """The address the agent dials for the whole session (port.go resolves ``host`` once, at
        session start): the ``/_standin/dns`` table's first answer, else ``host`` itself."""
        addresses = self.dns.get(host.lower())
        if addresses:
            log.info("resolved %s to %s for this session", host, addresses[0])
            return addresses[0]
        return host

    def _set_dns(self, body: dict[str, Any]) -> None:
        name = str(body.get("name") or "").lower()
        addresses = [str(a) for a in body.get("addresses") or []]
        if not name:
            raise ValueError("dns: name is required")
        if addresses:
            self.dns[name] = addresses
        else:
            self.dns.pop(name, None)
        log.info("dns: %s -> %s", name, addresses or "(removed)")

    def _remote_allowed(self, host: str, port: str) -> bool:
        return host in self.allow_remote or f"{host}:{port}" in self.allow_remote

    def _grant(self, record: SessionRecord) -> dict[str, Any]:
        record.token = secrets.token_urlsafe(32)
        base = self.stream_base or f"ws://{self.host}:{self.port}"
        stream_url = f"{base}/v1/data-channel/{record.session_id}?role=publish_subscribe&cell-number={secrets.token_urlsafe(12)}"
        return {"SessionId": record.session_id, "TokenValue": record.token, "StreamUrl": stream_url}

    async def _op_ResumeSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        record = self._session(body)
        if record.status not in ACTIVE:
            return {"SessionId": record.session_id}  # no token: the session is over
        log.info("ResumeSession %s", record.session_id)
        return self._grant(record)

    async def _op_TerminateSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        record = self._session(body)
        await self._end(record, "terminated by TerminateSession")
        return {"SessionId": record.session_id}

    async def _op_DescribeSessions(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        state = body.get("State")
        if state not in ("Active", "History"):
            raise ApiError("ValidationException", "State must be Active or History")
        wanted = {f.get("key"): f.get("value") for f in body.get("Filters") or []}
        rows = []
        for record in self.sessions.values():
            if (record.status in ACTIVE) != (state == "Active"):
                continue
            if "SessionId" in wanted and record.session_id != wanted["SessionId"]:
                continue
            if "Target" in wanted and record.target != wanted["Target"]:
                continue
            row = {k: v for k, v in record.row().items() if k in ("SessionId", "Target", "Status", "StartDate", "EndDate", "DocumentName", "Owner", "Reason")}
            rows.append({k: v for k, v in row.items() if v not in (None, "")})
        return {"Sessions": rows}

    def _session(self, body: dict[str, Any]) -> SessionRecord:
        record = self.sessions.get(str(body.get("SessionId") or ""))
        if record is None:
            raise ApiError("DoesNotExistException", f"session {body.get('SessionId')!r} does not exist")
        return record

    async def _end(self, record: SessionRecord, reason: str) -> None:
        if record.status not in ACTIVE:
            return
        record.status = "Terminated"
        record.reason = reason
        record.ended = time.time()
        record.token = ""
        log.info("session %s terminated: %s", record.session_id, reason)
        await record.agent.end(reason)

    def _set_state(self, record: SessionRecord, state: str) -> None:
        if record.status in ACTIVE:
            record.status = state
            if state == "Connected":
                record.connections += 1

    # --- data channel websockets ------------------------------------------------------------------

    def _authorize_websocket(self, request: HttpRequest) -> HttpResponse | None:
        match = STREAM_PATH.match(request.path)
        record = self.sessions.get(match.group(1)) if match else None
        if record is None or record.status not in ACTIVE:
            return HttpResponse.json({"message": "no such active session"}, 404)
        parsed = parse_sigv4(request.header("authorization"))
        unsigned_ok = self.allow_unsigned_websocket and not request.header("authorization")
        if not unsigned_ok and (parsed is None or parsed[2] != "ssmmessages" or not request.header("x-amz-date")):
            return HttpResponse.json({"message": "the websocket upgrade must be SigV4-signed for ssmmessages"}, 403)
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

    # --- control API ------------------------------------------------------------------------------

    async def _control(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        try:
            if path == "/_standin/health":
                return HttpResponse.json({"ok": True, "sessions": len(self.sessions)})
            if path == "/_standin/sessions" and request.method == "GET":
                return HttpResponse.json({"sessions": [r.row() for r in self.sessions.values()]})
            if path == "/_standin/faults":
                if request.method == "POST":
                    self.faults.update(request.json())
                    log.info("faults now %s", self.faults.to_dict())
                return HttpResponse.json(self.faults.to_dict())
            if path == "/_standin/dns":
                if request.method == "POST":
                    self._set_dns(request.json())
                return HttpResponse.json(self.dns)
            match = CONTROL_SESSION.match(path)
            if match and request.method == "POST":
                return await self._session_action(match.group(1), match.group(2), request.json())
        except (ValueError, TypeError) as exc:
            return HttpResponse.json({"message": str(exc)}, 400)
        return HttpResponse.json({"message": f"no control route {request.method} {path}"}, 404)

    async def _session_action(self, session_id: str, action: str, body: dict[str, Any]) -> HttpResponse:
        record = self.sessions.get(session_id)
        if record is None:
            return HttpResponse.json({"message": f"no session {session_id}"}, 404)
        if action == "close-websocket":
            done = await record.agent.close_websocket(str(body.get("mode") or "close"))
            return HttpResponse.json({"closed": done})
        if action == "terminate":
            await self._end(record, str(body.get("reason") or "terminated by the service"))
            return HttpResponse.json(record.row())
        asyncio.ensure_future(record.agent.pause(float(body.get("seconds") or 1.0)))
        return HttpResponse.json({"paused": True})


# --- the sandbox stack --------------------------------------------------------------------------


def stack_service(stack: Any) -> Any:
    """The stand-in as a service of the sandbox stack (``dbtunneld.sandbox.stack``): SSH sessions
    to any target reach the stack's sshd; port sessions may reach the stack's MariaDB ports."""
    from .procs import http_probe

    port = stack._port("ssm")
    args = ["--port", str(port), "--target", f"*=127.0.0.1:{stack._port('sshd')}"]
    for db in stack.mariadb.values():
        args += ["--allow-remote", f"127.0.0.1:{db.port}", "--allow-remote", f"localhost:{db.port}"]
    ready = http_probe(f"http://127.0.0.1:{port}/_standin/health")
    return stack._python_service("ssm-standin", "dbtunneld.sandbox.ssm_standin", args, ready, port)


# --- command line -------------------------------------------------------------------------------


def parse_target(text: str) -> tuple[str, tuple[str, int]]:
    name, _, address = text.partition("=")
    host, _, port = address.rpartition(":")
    if not name or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--target wants ID=HOST:PORT, got {text!r}")
    return name, (host, int(port))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dbtunneld.sandbox.ssm_standin", description="SSM Session Manager stand-in (API + agent side)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--target", action="append", type=parse_target, default=[], help="ID=HOST:PORT: SSH sessions to ID reach this sshd")
    p.add_argument("--allow-remote", action="append", default=[], help="HOST or HOST:PORT port sessions may reach (repeatable, comma lists ok)")
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--close-after-messages", type=int, default=0)
    p.add_argument("--agent-payload", type=int, default=1024)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--agent-version", default=DEFAULT_AGENT_VERSION)
    p.add_argument("--forward-url", default=None, help="where other AmazonSSM.* calls go (moto)")
    p.add_argument("--allow-unsigned-websocket", action="store_true", help="accept upgrades without SigV4 (older session-manager-plugin releases)")
    p.add_argument("--stream-base", default="", help="scheme://host[:port] of the stream URLs handed out (e.g. wss://ssmmessages.example behind a TLS front); default ws://HOST:PORT")
    p.add_argument("--kms-key-id", default="", help="encrypt every session with this KMS key (Session Manager preference); the agent's credentials come from the environment")
    p.add_argument("--kms-endpoint", default="", help="the KMS API the agent calls (moto)")
    p.add_argument("--kms-region", default="us-east-1")
    p.add_argument("--kms-require-challenge", action="store_true", help="the agent's RequireKMSChallengeResponse")
    p.add_argument("--log-level", default="INFO")
    return p


def standin_from_args(args: argparse.Namespace) -> SsmStandIn:
    faults = Faults()
    faults.update({"drop": args.drop, "delay_ms": args.delay_ms, "jitter_ms": args.jitter_ms, "close_after_messages": args.close_after_messages, "agent_payload": args.agent_payload, "seed": args.seed})
    allow = [h.strip() for item in args.allow_remote for h in item.split(",") if h.strip()]
    return SsmStandIn(host=args.host, port=args.port, targets=dict(args.target), allow_remote=allow, faults=faults, agent_version=args.agent_version, forward_url=args.forward_url, allow_unsigned_websocket=args.allow_unsigned_websocket, stream_base=args.stream_base, kms=_kms_settings(args))


def _kms_settings(args: argparse.Namespace) -> KmsSettings | None:
    if not args.kms_key_id:
        return None
    if not args.kms_endpoint:
        raise SystemExit("--kms-key-id needs --kms-endpoint (the KMS API the agent calls)")
    return KmsSettings(args.kms_key_id, args.kms_endpoint, args.kms_region, require_challenge=args.kms_require_challenge)


async def _serve_until_stopped(standin: SsmStandIn) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = await standin.start()
    print(f"READY {url}", flush=True)
    parent = os.getppid()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            if os.getppid() != parent:
                break
    await standin.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve_until_stopped(standin_from_args(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
