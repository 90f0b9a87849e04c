"""`dbtunneld doctor`: check each layer in order and name the first broken one with its fix.

Layers, each relying on the ones before: config -> AWS profile and SSO sign-in -> Vault
(reachable, then the AWS IAM login) -> bastion discovery -> SSM / SSH reachability -> DB login
through a tunnel with a freshly minted user. It runs in the caller's process with the same
adapters the daemon uses (so it also works when the daemon cannot start), revokes what it
minted, and can write a redacted report (secrets masked, file 0600) for a bug ticket.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from .. import __version__
from ..adapters import log as logmask
from ..core.config import ClusterConfig, Config, load_config
from ..core.errors import ConfigError, DbtunneldError, NeedsUserError, PermissionDeniedError, SignInNeededError, TransientError
from ..core.exitcodes import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, EXIT_SIGN_IN, EXIT_UNHEALTHY  # noqa: F401
from ..core.paths import Paths, default_paths

log = logging.getLogger(__name__)

LAYERS = ("config", "aws", "vault", "bastion", "transport", "database")
TUNNEL_UP_WAIT = 30.0
DB_TIMEOUT = 10
LOG_TAIL_LINES = 200


@dataclass
class CheckResult:
    layer: str
    status: str                  # "ok" | "fail" | "skip"
    detail: str = ""
    fix: str = ""
    error_type: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"layer": self.layer, "status": self.status, "detail": self.detail, "fix": self.fix,
                "error_type": self.error_type}


@dataclass
class DoctorState:
    """What the layers found so far (each layer uses what the earlier ones left here)."""

    config_path: Path
    cluster_name: str | None = None
    config: Config | None = None
    cluster: ClusterConfig | None = None
    aws: Any = None              # aws.AwsSession
    aws_creds: Any = None
    vault: Any = None            # vault.VaultClient holding our token
    transport: Any = None
    lease_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the layers

def check_config(st: DoctorState) -> str:
    st.config = load_config(st.config_path)
    st.cluster = _pick_cluster(st.config, st.cluster_name)
    n = len(st.config.clusters)
    return f"{st.config_path}: {n} cluster{'s' if n != 1 else ''}; checking the path to \"{st.cluster.name}\""


def _pick_cluster(config: Config, name: str | None) -> ClusterConfig:
    if not name:
        return config.clusters[0]
    try:
        return config.cluster(name)
    except KeyError as exc:
        raise NeedsUserError(str(exc.args[0]), "pass --cluster with one of the names in the config") from None


def check_aws(st: DoctorState) -> str:
    from ..adapters.aws import AwsSession

    st.aws = AwsSession(st.config.aws)
    sso_note = _sso_state(st.aws)
    st.aws_creds = st.aws.credentials()
    for secret in (st.aws_creds.secret_key, st.aws_creds.token):
        logmask.register_secret(secret)
    return f"profile {st.aws.profile}: {st.aws.caller_arn()}{sso_note}"


def _sso_state(session: Any) -> str:
    """The SSO sign-in as the refresh decides it (an expired access token is refreshed)."""
    from ..adapters.sso import refresh_sso_token

    if session.sso_settings() is None:
        return ""
    expires = refresh_sso_token(session)     # SignInNeededError when it cannot be refreshed
    return f" (SSO access token valid for {_span(expires - time.time())}, refreshed as needed)"


def check_vault(st: DoctorState) -> str:
    from ..adapters.vault import VaultClient

    reach = _vault_health(st.config)
    st.vault = VaultClient(st.config.vault)
    c = st.aws_creds
    token = st.vault.login_aws_iam(c.access_key, c.secret_key, c.token, profile_region=st.aws.profile_region)
    logmask.register_secret(token.secret)
    st.vault.use_token(token.secret)
    policies = ", ".join(token.info.policies) or "none"
    return f"{reach}; AWS IAM login to role {st.config.vault.role!r} ok (policies: {policies}; token ttl {_span(token.info.ttl)})"


def _vault_health(config: Config) -> str:
    import requests

    from ..adapters.vault import tls_verify

    cfg = config.vault
    url = f"{cfg.address}/v1/sys/health?standbyok=true&perfstandbyok=true"
    try:
        resp = requests.get(url, timeout=cfg.timeout, verify=tls_verify(cfg))
    except requests.exceptions.SSLError as exc:
        raise NeedsUserError(f"TLS to Vault at {cfg.address} failed: {_first_line(exc)}",
                             "set vault.ca_cert to the PEM of Vault's CA") from None
    except requests.exceptions.RequestException as exc:
        raise TransientError(f"cannot reach Vault at {cfg.address}: {_first_line(exc)}",
                             "check vault.address and your network / VPN") from None
    if resp.status_code in (501, 503):
        state = "not initialized" if resp.status_code == 501 else "sealed"
        raise TransientError(f"Vault at {cfg.address} is {state}", "ask the Vault operators")
    version = _json(resp).get("version", "")
    return f"{cfg.address} reachable{f' (version {version})' if version else ''}"


def check_bastion(st: DoctorState) -> str:
    kind = st.cluster.effective_transport(st.config.bastion)
    b = st.config.bastion
    if kind == "ssh":
        try:
            addrs = {a[4][0] for a in socket.getaddrinfo(b.host, b.port, type=socket.SOCK_STREAM)}
        except socket.gaierror as exc:
            raise NeedsUserError(f"bastion host {b.host!r} does not resolve: {exc}",
                                 "check bastion.host (and your VPN / DNS)") from None
        return f"transport ssh: {b.host}:{b.port} resolves to {', '.join(sorted(addrs))}"
    from ..adapters.discovery import find_bastion

    found = find_bastion(st.aws.client("ec2"), instance_id=b.instance_id, tags=b.tags)
    how = "configured" if b.instance_id else "found by tags " + ", ".join(f"{k}={v}" for k, v in b.tags.items())
    return f"transport {kind}: {found.instance_id} ({how}{f', {found.name}' if found.name else ''})"


def check_transport(st: DoctorState) -> str:
    from ..adapters.transport_config import build_transport

    factory = st.aws.boto3 if st.aws is not None else None
    st.transport = build_transport(st.config, st.cluster, session_factory=factory)
    st.transport.connect()
    return f"connected: {st.transport.describe()}"


def check_database(st: DoctorState) -> str:
    from ..engine.tunnel import Tunnel

    c = st.cluster
    grant = st.vault.database_creds(c.db_role)
    st.lease_ids.append(grant.lease_id)
    logmask.register_secret(grant.password)
    tunnel = Tunnel(f"doctor-{c.name}", 0, c.endpoint, c.port, st.transport, st.config.tunnels)
    tunnel.start()
    try:
        _wait_up(tunnel)
        who, version = _login(tunnel.local_port, grant.username, grant.password, c.database)
    finally:
        tunnel.stop()
        st.transport = None          # the tunnel closed it
    return f"logged in as {who} through the tunnel to {c.endpoint}:{c.port} (server {version})"


def _wait_up(tunnel: Any) -> None:
    from ..core.model import TunnelState

    deadline = time.monotonic() + TUNNEL_UP_WAIT
    while tunnel.state != TunnelState.UP:
        st = tunnel.status()
        if st.state in (TunnelState.FAILED, TunnelState.NEEDS_SIGN_IN) or time.monotonic() > deadline:
            raise TransientError(f"the tunnel did not come up ({st.state.value}): {st.last_error}",
                                 st.hint or "see the lines above")
        time.sleep(0.05)


def _login(port: int, user: str, password: str, database: str) -> tuple[str, str]:
    import pymysql

    try:
        conn = pymysql.connect(host="127.0.0.1", port=port, user=user, password=password,
                               database=database or None, connect_timeout=DB_TIMEOUT,
                               read_timeout=DB_TIMEOUT, write_timeout=DB_TIMEOUT)
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else 0
        if code in (1044, 1045, 1698):
            raise PermissionDeniedError(f"the database refused user {user}: {exc.args[-1]}",
                                        "check the Vault role's creation_statements and grants for this database") from None
        raise TransientError(f"cannot log into the database: {exc.args[-1] if exc.args else exc}",
                             "check the cluster endpoint and port in the config") from None
    with conn:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER(), VERSION()")
            who, version = cur.fetchone()
    return who, version


CHECKS: tuple[tuple[str, Callable[[DoctorState], str]], ...] = (
    ("config", check_config), ("aws", check_aws), ("vault", check_vault),
    ("bastion", check_bastion), ("transport", check_transport), ("database", check_database),
)


# ----------------------------------------------------------------------------- running

def diagnose(config_path: str | Path, cluster: str | None = None,
             on_result: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run the layers in order; stop at the first failure (later ones are 'skip'); clean up."""
    st = DoctorState(Path(config_path).expanduser(), cluster)
    results: list[CheckResult] = []
    try:
        for layer, check in CHECKS:
            result = _run_check(layer, check, st) if not _failed(results) else CheckResult(layer, "skip")
            results.append(result)
            if on_result:
                on_result(result)
    finally:
        _clean_up(st)
    return results


def _failed(results: list[CheckResult]) -> bool:
    return any(r.status == "fail" for r in results)


def _run_check(layer: str, check: Callable[[DoctorState], str], st: DoctorState) -> CheckResult:
    try:
        return CheckResult(layer, "ok", check(st))
    except ConfigError as exc:
        return CheckResult(layer, "fail", exc.message, exc.hint, "ConfigError")
    except DbtunneldError as exc:
        return CheckResult(layer, "fail", exc.message, exc.hint, type(exc).__name__)
    except Exception as exc:  # a bug or an unclassified library error: still name the layer
        log.debug("doctor: %s check crashed", layer, exc_info=True)
        return CheckResult(layer, "fail", f"{type(exc).__name__}: {_first_line(exc)}",
                           "unexpected: please attach `dbtunneld doctor --report FILE` to a bug report",
                           type(exc).__name__)


def _clean_up(st: DoctorState) -> None:
    """Revoke what the doctor minted and close what it opened (never raises)."""
    if st.transport is not None:
        _quietly(st.transport.close)
    if st.vault is not None:
        for lease_id in st.lease_ids:
            _quietly(st.vault.revoke_lease, lease_id)
        _quietly(st.vault.revoke_self)
        _quietly(st.vault.close)


def _quietly(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:
        log.debug("doctor cleanup: %s", exc)


def exit_code(results: list[CheckResult]) -> int:
    failed = next((r for r in results if r.status == "fail"), None)
    if failed is None:
        return EXIT_OK
    if failed.layer == "config":
        return EXIT_CONFIG
    return EXIT_SIGN_IN if failed.error_type == "SignInNeededError" else EXIT_UNHEALTHY


# ----------------------------------------------------------------------------- output

def render_result(r: CheckResult) -> str:
    mark = {"ok": "ok  ", "fail": "FAIL", "skip": "skip"}[r.status]
    line = f"  {mark}  {r.layer:<10} {r.detail if r.status != 'skip' else '(not checked: an earlier layer is broken)'}"
    if r.fix:
        line += f"\n        {'':<10} fix: {r.fix}"
    return logmask.mask(line)


def verdict(results: list[CheckResult]) -> str:
    failed = next((r for r in results if r.status == "fail"), None)
    if failed is None:
        return "every layer works"
    return f"first broken layer: {failed.layer}" + (f" -> {failed.fix}" if failed.fix else "")


def daemon_summary(paths: Paths) -> str:
    from .client import Client, DaemonNotRunning

    try:
        st = Client(paths.socket_path, timeout=5).request("status")
    except DaemonNotRunning:
        return "daemon: not running"
    except DbtunneldError as exc:
        return f"daemon: {exc.one_line()}"
    states = ", ".join(f"{t['name']} {t['state']}" for t in st.get("tunnels", []))
    return f"daemon: pid {st.get('pid')}, health {st.get('health', '?')}; {states or 'no clusters'}"


def write_report(path: str | Path, config_path: Path, results: list[CheckResult], paths: Paths) -> Path:
    """A redacted report (secrets masked, file 0600) for a bug ticket."""
    out = Path(path).expanduser()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(logmask.mask(_report_text(config_path, results, paths)))
    os.chmod(out, 0o600)
    return out


def _report_text(config_path: Path, results: list[CheckResult], paths: Paths) -> str:
    parts = [
        "# dbtunneld doctor report",
        f"dbtunneld {__version__}, Python {platform.python_version()}, {platform.platform()}",
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", "",
        "## checks", *(render_result(r) for r in results), "", verdict(results), "",
        "## daemon", daemon_summary(paths), "",
        "## config", f"path: {config_path}", "```", _read_text(config_path), "```", "",
        f"## log (last {LOG_TAIL_LINES} lines of {paths.log_file})", "```", _tail(paths.log_file), "```", "",
        "## results (json)", json.dumps([r.to_dict() for r in results], indent=2), "",
    ]
    return "\n".join(parts)


def run_doctor(config_path: str | Path | None = None, *, report: str | None = None,
               cluster: str | None = None, out: TextIO | None = None, paths: Paths | None = None) -> int:
    """The body of `dbtunneld doctor`: print each layer as it is checked; return the exit code."""
    out = out or sys.stdout
    paths = paths or default_paths()
    path = Path(config_path or paths.config_file).expanduser()
    print(f"dbtunneld doctor: {path}", file=out, flush=True)
    results = diagnose(path, cluster, on_result=lambda r: print(render_result(r), file=out, flush=True))
    print(verdict(results), file=out)
    print(daemon_summary(paths), file=out)
    if report:
        print(f"report written to {write_report(report, path, results, paths)} (secrets masked)", file=out)
    return exit_code(results)


# ----------------------------------------------------------------------------- small helpers

def _span(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def _json(resp: Any) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc})"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log yet)"
