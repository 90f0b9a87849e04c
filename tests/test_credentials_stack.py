"""The credentials engine on the real stack: OpenBao behind the aws-auth stand-in, moto with
SigV4 enforcement, MariaDB, the SSO stand-in.

The 60 s soak with short TTLs runs on a private stack in the background from the first test of
this module to the last one, so the other scenarios run meanwhile on the session stack:
- a hard-killed engine process leaves a lease; the next start revokes it and the user is gone;
- Vault unreachable for a while: bounded backoff with logged delays, then recovery;
- an expired SSO session is "sign-in needed"; the device flow brings it back, no restart;
- the Vault token is resumed from the keyring after a restart;
- at the end, the logs of every run hold none of the test secrets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pymysql
import pytest

from dbtunneld.adapters import log as dlog
from dbtunneld.adapters.aws import AwsSession, format_utc
from dbtunneld.adapters.aws import classify as aws_classify
from dbtunneld.adapters.keystore import Keystore
from dbtunneld.adapters.sso import SsoDeviceLogin
from dbtunneld.adapters.vault import VaultClient
from dbtunneld.adapters.vault import classify as vault_classify
from dbtunneld.core.config import parse_config
from dbtunneld.core.errors import SignInNeededError
from dbtunneld.core.model import CredentialState
from dbtunneld.core.paths import Paths
from dbtunneld.core.timing import Backoff
from dbtunneld.engine.credentials import CredentialEngine
from dbtunneld.engine.keeper import Tuning
from dbtunneld.engine.lease_store import LeaseRecord, LeaseStore
from dbtunneld.sandbox.stack import start_stack
from helpers.keyrings import InMemoryKeyring

S = CredentialState
SOAK_SECONDS = 60
SOAK_TTLS = dict(token_ttl=5, token_max_ttl=20, lease_ttl=5, lease_max_ttl=20)
HELPERS = Path(__file__).parent / "helpers"
SECRETS: set[str] = set()          # every secret the tests saw, for the final log scan
LOG_FILES: list[Path] = []


# ------------------------------------------------------------------------------------------
# helpers


def wait_for(check, timeout: float, interval: float = 0.1, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def sign_in(stack, session: AwsSession) -> Path:
    """The product's device flow, approved at the stand-in as the user would in the browser."""
    flow = SsoDeviceLogin(session)
    auth = flow.start()
    assert stack.sso.approve(auth.user_code)
    interval, end = auth.interval, time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(interval)
        result = flow.poll(auth, interval)
        if result.done:
            remember_sso_secrets(result.cache_file)
            return result.cache_file
        interval = result.interval
    raise AssertionError("device authorization never completed")


def remember_sso_secrets(cache_file: Path) -> None:
    entry = json.loads(cache_file.read_text())
    SECRETS.update(v for k, v in entry.items() if k in ("accessToken", "refreshToken", "clientSecret") and v)


def paths_in(base: Path) -> Paths:
    return Paths(base / "config.toml", base / "state", base / "log", base / "run").ensure()


class Harness:
    """Engines on one stack, each with a private home (SSO cache) and state folder."""

    def __init__(self, stack, base: Path) -> None:
        self.stack = stack
        self.base = base
        self.config = parse_config(stack.daemon_config())
        self.home = base / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.engines: list[CredentialEngine] = []

    def session(self, home: Path | None = None) -> AwsSession:
        return AwsSession(self.config.aws, home=home or self.home, config_file=Path(self.stack.aws_config_file))

    def engine(self, name: str, *, keystore: Keystore | None = None, tuning: Tuning = Tuning(),
               events: list | None = None, home: Path | None = None) -> CredentialEngine:
        engine = CredentialEngine(self.config, paths_in(self.base / name), keystore or Keystore.memory(),
                                  aws=self.session(home), tuning=tuning,
                                  on_event=(events.append if events is not None else None))
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self.engines:
            engine.stop(revoke=True, timeout=5)


def remember(engine: CredentialEngine, *clusters: str) -> None:
    view = engine.tokens.current()
    if view is not None:
        SECRETS.add(view.secret)
    for name in clusters:
        creds = engine.current(name)
        if creds is not None:
            SECRETS.add(creds.password)


def mysql_login(cluster, creds) -> None:
    conn = pymysql.connect(host=cluster.host, port=cluster.port, user=creds.username, password=creds.password,
                           database=cluster.database, connect_timeout=3, read_timeout=3)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------
# module fixtures: one log file for every engine run in this process, the soak


@pytest.fixture(scope="module", autouse=True)
def module_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("credlog") / "dbtunneld.log"
    root = logging.getLogger()
    level = root.level
    handler = dlog.PrivateRotatingFileHandler(path, maxBytes=50 * 1024 * 1024, backupCount=1, encoding="utf-8")
    handler.setFormatter(logging.Formatter(dlog.FORMAT))
    dlog.install_masking(handler)
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    LOG_FILES.append(path)
    yield path
    root.removeHandler(handler)
    handler.close()
    root.setLevel(level)


@pytest.fixture(scope="module")
def harness(stack, tmp_path_factory):
    h = Harness(stack, tmp_path_factory.mktemp("cred"))
    sign_in(stack, h.session())
    yield h
    h.close()


class Soak:
    """Short TTLs on a private stack; a client logs in with the current credentials every second."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.failures: list[str] = []
        self.logins = 0
        self.users: set[str] = set()
        self.events: list = []
        self.done = threading.Event()
        self.started = 0.0

    def start(self) -> None:
        self._cm = start_stack(clusters=("orders",), ssh=False, ssm=False, base_dir=self.base, **SOAK_TTLS)
        self.stack = self._cm.__enter__()
        self.baseline = self.stack.count_dynamic_users()
        self.harness = Harness(self.stack, self.base / "engine")
        sign_in(self.stack, self.harness.session())
        self.engine = self.harness.engine("soak", events=self.events)
        self.engine.start()
        self.engine.want("orders", timeout=30)
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._client, name="soak-client", daemon=True)
        self.thread.start()

    def _client(self) -> None:
        cluster = self.stack.clusters["orders"]
        tick = 0
        while not self.done.wait(max(0.0, self.started + tick + 1 - time.monotonic())):
            tick += 1
            creds = self.engine.current("orders")
            remember(self.engine, "orders")
            if creds is None:
                self.failures.append(f"{time.monotonic() - self.started:.1f}s: no current credentials")
                continue
            self.users.add(creds.username)
            self.logins += 1
            try:
                mysql_login(cluster, creds)
            except Exception as exc:  # every failure is a finding
                self.failures.append(f"{time.monotonic() - self.started:.1f}s: {creds.username}: {exc}")

    def finish(self) -> None:
        left = SOAK_SECONDS - (time.monotonic() - self.started)
        if left > 0:
            self.done.wait(left)
        self.done.set()
        self.thread.join(5)
        t0 = time.monotonic()
        self.engine.stop(revoke=True, timeout=10)
        self.stop_seconds = time.monotonic() - t0
        self.users_after = self.stack.count_dynamic_users()

    def close(self) -> None:
        self.done.set()
        try:
            self.harness.close()
        finally:
            self._cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    s = Soak(tmp_path_factory.mktemp("soak"))
    try:
        s.start()
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------------------------
# tests (in file order: the soak starts first and is checked last)


def test_soak_starts_with_credentials_that_log_in(soak):
    creds = soak.engine.current("orders")
    assert creds is not None and creds.password not in repr(creds)
    mysql_login(soak.stack.clusters["orders"], creds)
    aws, vault, dbs = soak.engine.status()
    assert aws.state == S.VALID and ":assumed-role/db-developer/" in aws.identity
    assert vault.state == S.VALID and dbs["orders"].state == S.VALID
    assert dbs["orders"].identity == creds.username


def test_hard_killed_engine_leaves_an_orphan_that_the_next_start_revokes(stack, harness, tmp_path):
    dbt_home = tmp_path / "dbt"
    config = tmp_path / "config.toml"
    config.write_text(stack.daemon_config())
    env = dict(os.environ, HOME=str(harness.home), DBTUNNELD_HOME=str(dbt_home), DBTUNNELD_KEYRING="memory",
               AWS_CONFIG_FILE=stack.aws_config_file, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.Popen([sys.executable, str(HELPERS / "engine_proc.py"), str(config), "orders"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line, f"engine process gave no credentials: {proc.stderr.read()[-2000:]}"
        held = json.loads(line)
        assert held["username"] in stack.dynamic_users("orders")
        proc.kill()                                   # a crash: no cleanup runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    LOG_FILES.append(dbt_home / "log" / "dbtunneld.log")
    leases_file = dbt_home / "state" / "leases.json"
    assert stat.S_IMODE(leases_file.stat().st_mode) == 0o600
    assert [r.lease_id for r in LeaseStore(leases_file).records()] == [held["lease_id"]]
    assert held["username"] in stack.dynamic_users("orders")       # the orphan is still there

    events: list = []
    paths = Paths(dbt_home / "config.toml", dbt_home / "state", dbt_home / "log", dbt_home / "run")
    successor = CredentialEngine(harness.config, paths, Keystore.memory(), aws=harness.session(), on_event=events.append)
    harness.engines.append(successor)
    successor.start()
    wait_for(lambda: held["username"] not in stack.dynamic_users("orders"), 20, what="the orphan's user to be dropped")
    wait_for(lambda: LeaseStore(leases_file).records() == [], 5, what="the leases file to forget the orphan")
    remember(successor)
    successor.stop(revoke=True, timeout=5)


def test_vault_unreachable_backs_off_with_logged_delays_and_recovers(stack, harness, caplog):
    caplog.set_level(logging.WARNING, logger="dbtunneld")
    tuning = Tuning(backoff=Backoff(initial=0.5, maximum=2.0))
    holder = harness.engine("holder", tuning=tuning)
    holder.start()
    first = holder.want("orders", timeout=30)
    remember(holder, "orders")
    stack.vault_front.pause()
    try:
        newcomer = harness.engine("newcomer", tuning=tuning)
        newcomer.start()                               # logs in while Vault is down
        holder.renew_now("orders", timeout=5)          # renews while Vault is down
        outage = 7.0
        time.sleep(outage)
        assert newcomer.tokens.status().state == S.BACKOFF
        assert "unreachable" in newcomer.tokens.status().last_error
        assert holder.current("orders").username == first.username     # still valid meanwhile
    finally:
        stack.vault_front.resume()
    for unit in ("[vault=", "[db=orders]"):
        msgs = [r.getMessage() for r in caplog.records if unit in r.getMessage()]
        delays = [float(m) for m in re.findall(r"; retry \d+ in (\d+\.\d) s", "\n".join(msgs))]
        assert delays, f"no retry with its delay logged for {unit}"
        assert 3 <= len(delays) <= outage / 0.4 + 2, delays      # backed off, not a busy loop
        assert max(delays) <= 2.0 and delays[0] <= 0.6
    wait_for(lambda: newcomer.tokens.status().state == S.VALID, 15, what="the newcomer to log in")
    creds = newcomer.want("orders", timeout=15)
    remember(newcomer, "orders")
    mysql_login(stack.clusters["orders"], creds)
    wait_for(lambda: holder.status()[2]["orders"].last_error == "", 15, what="the holder's renewal to succeed")
    for engine in (holder, newcomer):
        engine.stop(revoke=True, timeout=5)
    assert first.username not in stack.dynamic_users("orders")


def test_expired_sso_session_is_sign_in_needed_and_the_device_flow_recovers(stack, harness, tmp_path):
    home = tmp_path / "home"
    session = harness.session(home)
    sso = session.sso_settings()
    session.write_sso_token(sso, {"startUrl": sso.start_url, "region": sso.region,
                                  "accessToken": "expired-sso-access-token-value",
                                  "expiresAt": format_utc(time.time() - 60)})
    SECRETS.add("expired-sso-access-token-value")
    events: list = []
    engine = harness.engine("sso", events=events, home=home)
    engine.start()
    wait_for(lambda: engine.tokens.status().state == S.NEEDS_SIGN_IN, 15, what="sign-in needed")
    assert engine.aws_status().state == S.NEEDS_SIGN_IN
    assert "dbtunneld login" in engine.tokens.status().last_error
    with pytest.raises(SignInNeededError):
        engine.want("orders", timeout=5)
    visited = []

    def browser(url: str) -> None:                     # the user approves in the browser
        with urllib.request.urlopen(url, timeout=10) as resp:
            visited.append(resp.status)

    info = engine.sso_login(open_browser=browser, use_device_code=True)
    assert info["user_code"] and info["verification_uri_complete"].startswith(stack.sso_endpoint)
    assert "device_code" not in info and "client_secret" not in info
    wait_for(lambda: any(e.kind == "sso.signed_in" for e in events), 20, what="the sign-in event")
    creds = engine.want("orders", timeout=20)
    remember(engine, "orders")
    remember_sso_secrets(session.cache_dir / f"{sso.cache_key}.json")
    mysql_login(stack.clusters["orders"], creds)
    assert visited == [200]
    needs = [e for e in events if e.kind == "status" and e.name == stack.vault_addr and e.status.state == S.NEEDS_SIGN_IN]
    assert len(needs) == 1                              # announced once, not a storm
    cache = json.loads((session.cache_dir / f"{sso.cache_key}.json").read_text())
    assert cache["accessToken"] != "expired-sso-access-token-value" and cache["refreshToken"]
    assert stat.S_IMODE((session.cache_dir / f"{sso.cache_key}.json").stat().st_mode) == 0o600
    engine.stop(revoke=True, timeout=5)


def test_vault_token_is_resumed_from_the_keyring_after_a_restart(harness):
    backend = InMemoryKeyring()
    first = harness.engine("resume", keystore=Keystore(backend))
    first.start()
    first.want("orders", timeout=30)
    accessor = first.tokens.current().accessor
    remember(first, "orders")
    first.stop(revoke=True, timeout=5)                   # a persistent keyring keeps the token
    second = harness.engine("resume", keystore=Keystore(backend))
    second.start()
    creds = second.want("orders", timeout=30)
    remember(second, "orders")
    assert second.tokens.logins == 0 and second.tokens.current().accessor == accessor
    mysql_login(harness.stack.clusters["orders"], creds)
    second.stop(revoke=True, timeout=5)
    assert second.tokens.revoke(5)


def test_soak_short_ttls_sixty_seconds_without_a_failed_login(soak):
    soak.finish()
    assert soak.failures == []
    assert soak.logins >= SOAK_SECONDS - 3
    assert len(soak.users) >= 3                                  # rotated several times meanwhile
    kinds = [e.kind for e in soak.events]
    assert kinds.count("db.rotated") >= 3 and kinds.count("vault.login") >= 3
    assert soak.users_after == soak.baseline                     # every user gone after stop
    assert soak.stop_seconds < 10


# ------------------------------------------------------------------------------------------
# a bug inside an adapter


class RenamedArgumentVault(VaultClient):
    """``renew_lease`` written against another hvac signature: hvac raises TypeError inside the
    adapter's classified block, the kind of bug an hvac upgrade brings."""

    def renew_lease(self, lease_id, increment):
        with self._classified(f"renewing lease {lease_id}"):
            self._client.sys.renew_lease(lease_id=lease_id, increment_seconds=int(increment))
        raise AssertionError("hvac accepted an unknown argument")


def test_a_bug_in_an_adapter_is_an_internal_error_logged_once_with_its_traceback(stack, harness, caplog):
    with pytest.raises(TypeError):                       # the classifiers let bugs through as they are
        vault_classify(TypeError("bad call"), "renewing", "http://vault")
    with pytest.raises(AttributeError):
        aws_classify(AttributeError("no attribute"), "loading credentials", "sandbox")
    caplog.set_level(logging.INFO)
    engine = CredentialEngine(harness.config, paths_in(harness.base / "bug"), Keystore.memory(),
                              aws=harness.session(), tuning=Tuning(bug_retry=Backoff(initial=0.5, maximum=1.0)),
                              make_vault=lambda cfg: RenamedArgumentVault(cfg))
    harness.engines.append(engine)
    engine.start()
    creds = engine.want("orders", timeout=30)
    remember(engine, "orders")
    keeper = engine.keepers["orders"]
    keeper.request_renewal()
    st = wait_for(lambda: (lambda s: s if s.state == S.FAILED else None)(engine.status()[2]["orders"]), 10,
                  what="the internal error in the status")
    assert st.last_error.startswith("internal error: TypeError:") and "see the log" in st.last_error
    time.sleep(3)                                        # retried slowly, never a busy loop
    assert 3 <= keeper.internal_errors <= 6, keeper.internal_errors
    mine = [r for r in caplog.records if r.name == "dbtunneld.engine.keeper" and "db orders" in r.getMessage()]
    with_traceback = [r for r in mine if r.exc_info]
    assert len(with_traceback) == 1 and with_traceback[0].levelno == logging.ERROR
    assert "increment_seconds" in str(with_traceback[0].exc_info[1])
    assert all("the same internal error" in r.getMessage() for r in mine if not r.exc_info)
    assert not [r for r in caplog.records if "renewing user" in r.getMessage() and "retry" in r.getMessage()]
    assert engine.current("orders").username == creds.username      # the lease stays usable meanwhile
    engine.stop(revoke=True, timeout=5)


# ------------------------------------------------------------------------------------------
# a Vault policy without sys/leases/revoke (as Vault's default policy)


@pytest.fixture(scope="module")
def no_revoke(tmp_path_factory):
    """A private stack whose developer policy lacks sys/leases/revoke, and a signed-in harness."""
    base = tmp_path_factory.mktemp("norevoke")
    with start_stack(clusters=("orders", "billing"), ssh=False, ssm=False, base_dir=base, lease_revoke=False) as s:
        h = Harness(s, base / "engine")
        sign_in(s, h.session())
        yield h
        h.close()


def revoke_warnings(caplog, lease_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and lease_id in r.getMessage()]


def test_denied_revoke_is_final_said_once_with_the_policy_line_and_the_users_end(no_revoke, caplog):
    caplog.set_level(logging.INFO)
    stack = no_revoke.stack
    engine = no_revoke.engine("denied")
    engine.start()
    creds = engine.want("orders", timeout=30)
    remember(engine, "orders")
    outcomes = engine.release("orders")
    assert len(outcomes) == 1
    out = outcomes[0]
    assert (out.revoked, out.retried, out.username) == (False, False, creds.username)
    assert 'path "sys/leases/revoke" { capabilities = ["update"] }' in out.hint
    assert out.valid_until == pytest.approx(creds.expires_at, abs=5)       # the lease's own end
    assert creds.username in stack.dynamic_users("orders")                 # Vault really refused
    assert engine.store.records() == []                  # final: the next start does not try again
    time.sleep(1.5)                                      # no retry loop behind our back
    said = revoke_warnings(caplog, creds.lease_id)
    assert len(said) == 1, said
    assert 'path "sys/leases/revoke"' in said[0] and "stays valid until" in said[0] and " UTC (in " in said[0]
    engine.stop(revoke=True, timeout=5)


def test_denied_orphan_is_dropped_after_one_try_with_its_end_from_lease_lookup(no_revoke, caplog):
    caplog.set_level(logging.INFO)
    stack = no_revoke.stack
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = no_revoke.engine("orphan-holder")
    holder.start()
    creds = holder.want("billing", timeout=30)
    remember(holder, "billing")
    rec = holder.store.records()[0]
    successor_paths = paths_in(no_revoke.base / "orphan-successor")
    LeaseStore(successor_paths.leases_file).add(LeaseRecord(rec.lease_id, rec.cluster, rec.username, rec.vault,
                                                            dead.pid, rec.issued_at))
    successor = CredentialEngine(no_revoke.config, successor_paths, Keystore.memory(), aws=no_revoke.session())
    no_revoke.engines.append(successor)
    successor.start()
    wait_for(lambda: LeaseStore(successor_paths.leases_file).records() == [], 20, what="the orphan to be dropped")
    wait_for(lambda: successor.orphans.finished, 5, what="the sweep to end")
    said = revoke_warnings(caplog, rec.lease_id)
    assert len(said) == 1 and 'path "sys/leases/revoke"' in said[0], said
    assert "until its lease expires" not in said[0]      # the end came from sys/leases/lookup
    assert creds.username in stack.dynamic_users("billing")
    successor.stop(revoke=True, timeout=5)
    holder.stop(revoke=True, timeout=5)


@pytest.mark.parametrize("persistent", [True, False])
def test_stop_without_revoke_rights_revokes_the_token_and_vault_drops_its_users(no_revoke, caplog, persistent):
    caplog.set_level(logging.INFO)
    stack = no_revoke.stack
    keystore = Keystore(InMemoryKeyring()) if persistent else Keystore.memory()   # persistent: token kept otherwise
    engine = no_revoke.engine(f"quit-{persistent}", keystore=keystore)
    engine.start()
    users = {name: engine.want(name, timeout=30) for name in ("orders", "billing")}
    remember(engine, "orders", "billing")
    assert {c.username for c in users.values()} <= set(stack.dynamic_users())
    outcomes = engine.stop(revoke=True, timeout=10)
    assert sorted((o.cluster, o.revoked, o.how) for o in outcomes) == [("billing", True, "token"),
                                                                       ("orders", True, "token")]
    wait_for(lambda: not {c.username for c in users.values()} & set(stack.dynamic_users()), 15,
             what="Vault to drop the token's users")
    for name, creds in users.items():
        with pytest.raises(pymysql.err.OperationalError) as err:
            mysql_login(stack.clusters[name], creds)
        assert err.value.args[0] in (1045, 1698)
    assert engine.store.records() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "token" in r.getMessage()]


def test_logs_hold_none_of_the_test_secrets():
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert len(SECRETS) >= 10
    texts = [p.read_text(errors="replace") for p in LOG_FILES if p.exists()]
    assert texts and sum(len(t) for t in texts) > 10_000          # the runs did log
    for text in texts:
        leaked = [line.replace(s, "<SECRET>") for s in SECRETS for line in text.splitlines() if s in line]
        assert leaked == [], "secrets found in the log:\n" + "\n".join(leaked[:5])
        assert not dlog.TOKEN_RE.search(text), "a token-shaped value reached the log"
