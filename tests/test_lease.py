"""The credentials engine on a Vault model, in virtual time (deterministic), plus a few threaded
runs on the real clock. The real-stack tests are in test_credentials_stack.py."""

from __future__ import annotations

import logging
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time

import pytest

from dbtunneld.adapters.keystore import Keystore
from dbtunneld.core.config import parse_config
from dbtunneld.core.errors import PermissionDeniedError, SignInNeededError, TransientError
from dbtunneld.core.model import DbCredentials
from dbtunneld.core.model import CredentialState
from dbtunneld.core.paths import Paths
from dbtunneld.core.timing import Backoff, FakeClock, SYSTEM_CLOCK
from dbtunneld.engine.credentials import CredentialEngine
from dbtunneld.engine.keeper import Tuning
from dbtunneld.engine.lease_store import LeaseRecord, LeaseStore
from dbtunneld.engine.orphans import orphans
from dbtunneld.engine.scheduler import Scheduler
from dbtunneld.sandbox.procs import wait_until
from helpers.fakevault import FakeAws, FakeVaultClient, FakeVaultServer, run_schedule, run_virtual
from helpers.keyrings import BlockingMacKeychain, InMemoryKeyring

S = CredentialState

CONFIG = """
[aws]
profile = "dev-sso"
[vault]
address = "http://127.0.0.1:8200"
role = "db-developer"
[credentials]
mint_ahead = {mint_ahead}
revoke_timeout = 2
[bastion]
transport = "ssh"
host = "127.0.0.1"
[[clusters]]
name = "orders"
endpoint = "orders.cluster.example"
db_role = "orders-ro"
[[clusters]]
name = "billing"
endpoint = "billing.cluster.example"
db_role = "billing-ro"
[[clusters]]
name = "secret"
endpoint = "secret.cluster.example"
db_role = "secret-ro"
[[clusters]]
name = "nope"
endpoint = "nope.cluster.example"
db_role = "nope-ro"
"""

TUNING = Tuning(backoff=Backoff(initial=1.0, maximum=30.0), sign_in_recheck=60, failed_recheck=300)


@pytest.fixture
def world(tmp_path):
    """A fake Vault on a fake clock, and a factory for unthreaded engines sharing a keyring."""

    class World:
        clock = FakeClock(1_000_000.0)
        server = FakeVaultServer(clock, roles=("orders-ro", "billing-ro", "secret-ro"), denied_roles=("secret-ro",))
        backend = InMemoryKeyring()
        aws = FakeAws()
        events: list = []
        paths = Paths(tmp_path / "config.toml", tmp_path / "state", tmp_path / "log", tmp_path / "run")

        def engine(self, mint_ahead=600, threaded=False, clock=None, tuning=TUNING, keystore=None):
            cfg = parse_config(CONFIG.format(mint_ahead=mint_ahead))
            return CredentialEngine(cfg, self.paths, keystore or Keystore(self.backend), clock=clock or self.clock,
                                    on_event=self.events.append, tuning=tuning, aws=self.aws,
                                    make_vault=lambda c: FakeVaultClient(self.server, c), rng=random.Random(7),
                                    threaded=threaded)

    return World()


def kinds(events, kind, name=None):
    return [e for e in events if e.kind == kind and (name is None or e.name == name)]


# ------------------------------------------------------------------------------------------
# Vault token


def test_token_is_renewed_at_two_thirds_and_replaced_before_its_max_ttl(world):
    world.server.token_ttl, world.server.token_max = 60, 300
    engine = world.engine()
    engine.start()

    def check(unit):
        assert engine.tokens.current() is not None, "the token lapsed"

    run_virtual(engine, world.clock, 1)
    run_virtual(engine, world.clock, 3000, on_step=check)
    gaps, last = [], None                              # between renewals of the same token
    for t, what in world.server.calls:
        if what == "renew-self" and last is not None:
            gaps.append(t - last)
        last = t if what in ("renew-self", "login") else last
    assert min(gaps) >= 40 - 1e-6                      # 2/3 of 60 s plus a third of the grace...
    assert max(gaps) <= 44 + 1e-6                      # ... which is 10-20 % of the TTL
    logins = [t for t, what in world.server.calls if what == "login"]
    assert 10 <= len(logins) <= 16                     # every ~200-300 s (before the 300 s max)
    for tok in world.server.tokens.values():
        assert tok.revoked is False
    assert engine.tokens.status().state == S.VALID
    assert len(kinds(world.events, "vault.login")) == len(logins)
    assert len(kinds(world.events, "status", "http://127.0.0.1:8200")) == 2  # acquiring, valid: no storm


def test_token_is_resumed_from_the_keyring_after_a_restart(world):
    first = world.engine()
    first.start()
    run_virtual(first, world.clock, 10)
    assert [w for _, w in world.server.calls].count("login") == 1
    stored = list(world.backend.entries.values())
    assert len(stored) == 1 and stored[0].startswith("hvs.")

    second = world.engine()            # a new process: same keyring, nothing in memory
    second.start()
    run_virtual(second, world.clock, 1)
    calls = [w for _, w in world.server.calls]
    assert calls.count("login") == 1 and calls.count("lookup-self") == 1
    assert second.tokens.current().secret == stored[0]


def test_a_revoked_stored_token_means_a_new_login(world):
    first = world.engine()
    first.start()
    run_virtual(first, world.clock, 1)
    for tok in world.server.tokens.values():
        tok.revoked = True
    second = world.engine()
    second.start()
    run_virtual(second, world.clock, 1)
    assert [w for _, w in world.server.calls].count("login") == 2
    assert second.tokens.status().state == S.VALID


def test_vault_unreachable_backs_off_bounded_then_recovers(world, caplog):
    caplog.set_level(logging.WARNING, logger="dbtunneld")
    world.server.token_ttl, world.server.token_max = 60, 3600
    engine = world.engine()
    engine.start()
    run_virtual(engine, world.clock, 1)
    world.server.down = True
    run_virtual(engine, world.clock, 300)
    attempts = world.server.failed_calls
    # Exponential backoff: renewals until the token expires, then logins every <= 30 s.
    assert 8 <= len(attempts) <= 20, len(attempts)
    gaps = [b[0] - a[0] for a, b in zip(attempts, attempts[1:]) if (a[1], b[1]) != ("renew-self", "login")]
    assert all(g >= 0.8 - 1e-9 for g in gaps)          # never a busy loop (giving up renewing logs in at once)
    assert max(gaps) <= 30 + 1e-9
    renews = [t for t, w in attempts if w == "renew-self"]
    assert renews and max(renews) < world.server.tokens[next(iter(world.server.tokens))].expires
    retries = [r.getMessage() for r in caplog.records if re.search(r"; retry \d+ in \d+\.\d s$", r.getMessage())]
    gave_up = [r for r in caplog.records if "no retry fits before it expires" in r.getMessage()]
    assert len(retries) + len(gave_up) == len(attempts)     # one WARNING per failed attempt, with its delay
    assert len(gave_up) == 1
    assert engine.tokens.status().state == S.BACKOFF
    world.server.down = False
    run_virtual(engine, world.clock, 31)
    assert engine.tokens.status().state == S.VALID
    assert engine.tokens.current() is not None


def test_sign_in_needed_is_one_state_change_and_a_sign_in_resumes(world, caplog):
    caplog.set_level(logging.WARNING, logger="dbtunneld")
    world.aws.signed_in = False
    engine = world.engine()
    engine.start()
    run_virtual(engine, world.clock, 600)
    assert engine.tokens.status().state == S.NEEDS_SIGN_IN
    assert engine.aws_status().state == S.NEEDS_SIGN_IN
    needs = [e for e in kinds(world.events, "status") if e.status.state == S.NEEDS_SIGN_IN]
    assert len(needs) == 2                               # one for aws, one for vault: announced once
    assert len([r for r in caplog.records if "sign-in needed" in r.getMessage()]) == 1
    assert world.aws.calls <= 12                         # re-checked about once a minute, not a storm
    with pytest.raises(SignInNeededError):
        engine.want("orders", timeout=0)
    world.aws.signed_in = True
    engine.tokens.notify_signed_in()
    run_virtual(engine, world.clock, 1)
    assert engine.tokens.status().state == S.VALID
    assert engine.current("orders") is not None


# ------------------------------------------------------------------------------------------
# DB leases


def test_db_credentials_are_minted_renewed_and_rotated_before_the_max_ttl(world):
    world.server.token_ttl, world.server.token_max = 60, 24 * 3600
    world.server.lease_ttl, world.server.lease_max = 60, 1200
    engine = world.engine(mint_ahead=300)
    engine.start()
    run_virtual(engine, world.clock, 1)
    engine.request("orders")
    failed_logins = []
    users_at_once = []

    def client_login(unit):
        creds = engine.current("orders")
        if creds is not None and not world.server.can_log_in(creds.username, creds.password):
            failed_logins.append((world.clock.time(), creds.username))
        users_at_once.append(len(world.server.alive_users()))

    run_virtual(engine, world.clock, 1)
    first = engine.current("orders")
    assert isinstance(first, DbCredentials) and first.username.startswith("v-orders-ro-")
    for _ in range(5000):                                  # a client logging in every second
        run_virtual(engine, world.clock, 1)
        client_login(None)
    assert failed_logins == []
    rotations = kinds(world.events, "db.rotated", "orders")
    assert 4 <= len(rotations) <= 6                        # one per ~900-1000 s of a 1200 s lifetime
    assert max(users_at_once) == 2                         # the old user stays until it expires
    assert not any(lz.revoked_by_client for lz in world.server.leases.values())  # never revoked early
    creds = engine.current("orders")
    assert creds.max_expires_at is not None and creds.expires_at <= creds.max_expires_at


def test_short_ttls_token_and_lease_die_together_without_a_failed_login(world):
    """Token 5 s / max 20 s, lease 5 s / max 20 s (the issue's soak, in virtual time)."""
    s = world.server
    s.token_ttl, s.token_max, s.lease_ttl, s.lease_max = 5, 20, 5, 20
    engine = world.engine(mint_ahead=600)
    engine.start()
    engine.request("orders")
    run_virtual(engine, world.clock, 0.5)
    failed = []
    for _ in range(600):                                   # ten minutes, a login every second
        run_virtual(engine, world.clock, 1)
        creds = engine.current("orders")
        if creds is None or not s.can_log_in(creds.username, creds.password):
            failed.append(world.clock.time())
    assert failed == []
    assert len(s.alive_users()) <= 2
    engine.stop(revoke=True, timeout=1)
    assert s.alive_users() == []
    assert engine.store.records() == []


def test_release_revokes_every_lease_and_the_store_forgets_them(world):
    engine = world.engine()
    engine.start()
    engine.request("orders")
    engine.request("billing")
    run_virtual(engine, world.clock, 2)
    assert len(engine.store.records()) == 2
    assert [o.revoked for o in engine.release("orders")] == [True]
    assert [r.cluster for r in engine.store.records()] == ["billing"]
    assert len(world.server.alive_users()) == 1
    assert engine.status()[2].keys() == {"billing"}
    assert kinds(world.events, "db.revoked", "orders")
    engine.stop(revoke=True, timeout=1)
    assert world.server.alive_users() == [] and engine.store.records() == []


def test_leases_file_is_private_and_holds_no_password(world):
    engine = world.engine()
    engine.start()
    engine.request("orders")
    run_virtual(engine, world.clock, 2)
    creds = engine.current("orders")
    path = world.paths.leases_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert creds.username in text and creds.lease_id in text and creds.password not in text
    assert creds.password not in repr(creds) and "password" not in repr(creds)


def test_orphans_of_a_dead_run_are_revoked_and_a_live_owner_is_left_alone(world):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = world.engine()
    first.start()
    first.request("orders")
    run_virtual(first, world.clock, 2)
    lease_id = first.current("orders").lease_id
    store = LeaseStore(world.paths.leases_file)
    rec = store.records()[0]
    store.remove(rec.lease_id)
    store.add(LeaseRecord(rec.lease_id, rec.cluster, rec.username, rec.vault, dead.pid, rec.issued_at))
    store.add(LeaseRecord("database/creds/x/live", "orders", "v-live", rec.vault, os.getppid(), rec.issued_at))
    assert [r.lease_id for r in orphans(store.records())] == [lease_id]

    second = world.engine()            # the crashed run's successor
    second.start()
    run_virtual(second, world.clock, 1)
    assert [o.revoked for o in second.sweep_orphans_once()] == [True]
    assert world.server.leases[lease_id].revoked_by_client
    assert [r.lease_id for r in LeaseStore(world.paths.leases_file).records()] == ["database/creds/x/live"]


def sweep_until_done(sweeper, clock, max_steps=100):
    """Drive the orphan sweeper on a Scheduler in virtual time until it leaves the schedule."""
    sched = Scheduler(clock)
    sweeper.start_once(sched)
    for _ in range(max_steps):
        if sweeper not in sched:
            return
        run_schedule(sched, clock, max(0.0, sched.next_due() - clock.monotonic()))
    raise AssertionError("the orphan sweep never gave up")


def test_orphan_clean_up_retries_are_bounded_in_count_and_time(world, caplog):
    caplog.set_level(logging.INFO)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    world.server.token_ttl, world.server.token_max = 10 ** 6, 10 ** 7
    LeaseStore(world.paths.leases_file).add(LeaseRecord("database/creds/orders-ro/lost", "orders", "v-lost",
                                                        "http://127.0.0.1:8200", dead.pid, world.clock.time()))
    clock = FakeClock(world.clock.time(), auto_advance=True)     # every wait returns at once, time jumps
    tuning = Tuning(backoff=Backoff(initial=10.0, maximum=120.0), orphan_tries=4, orphan_window=3600)
    engine = world.engine(clock=clock, tuning=tuning)
    engine.tokens.run_once()                                      # a token, then Vault goes away
    assert engine.tokens.current() is not None
    world.server.down = True
    t0 = clock.time()
    sweep_until_done(engine.orphans, clock)
    tries = [w for _, w in world.server.failed_calls if w == "revoke-lease"]
    assert len(tries) == 4                                        # the count bound
    assert clock.time() - t0 <= 3600                              # the time bound
    assert "giving up on 1 orphaned lease(s) after 4 tries" in caplog.text
    assert [r.lease_id for r in LeaseStore(world.paths.leases_file).records()] == ["database/creds/orders-ro/lost"]

    short = world.engine(clock=FakeClock(clock.time(), auto_advance=True),
                         tuning=Tuning(backoff=Backoff(initial=100.0, maximum=1000.0), orphan_tries=50,
                                       orphan_window=500))
    world.server.down = False
    short.tokens.run_once()
    assert short.tokens.current() is not None
    world.server.down = True
    world.server.failed_calls.clear()
    start = short.clock.time()
    sweep_until_done(short.orphans, short.clock)               # the time bound ends it first
    assert short.clock.time() - start <= 500
    assert 2 <= len([w for _, w in world.server.failed_calls if w == "revoke-lease"]) <= 3


def test_a_bug_is_retried_on_a_slow_bounded_schedule_with_one_traceback(world, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    engine = world.engine()
    engine.start()
    engine.request("orders")
    run_virtual(engine, world.clock, 2)
    creds = engine.current("orders")

    def broken(self, lease_id, increment):
        return {"data": {}}["lease_duration"]          # a KeyError, as a changed answer format brings
    monkeypatch.setattr(FakeVaultClient, "renew_lease", broken)
    engine.renew_now("orders")
    steps = run_virtual(engine, world.clock, 3600)
    keeper = engine.keepers["orders"]
    assert 6 <= keeper.internal_errors <= 12            # 30 s doubling to 10 min: ~9 in an hour
    assert steps < 200                                  # not a busy loop
    st = engine.status()[2]["orders"]
    assert st.state == S.FAILED and st.last_error.startswith("internal error: KeyError")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "KeyError" in caplog.text
    assert creds.password not in caplog.text


def test_permission_denied_and_unknown_role_are_failures_the_caller_sees(world):
    engine = world.engine()
    engine.start()
    run_virtual(engine, world.clock, 1)
    engine.request("secret")
    engine.request("nope")
    run_virtual(engine, world.clock, 1)
    with pytest.raises(PermissionDeniedError):
        engine.want("secret", timeout=0)
    from dbtunneld.adapters.vault import VaultRequestError
    with pytest.raises(VaultRequestError, match="unknown role"):
        engine.want("nope", timeout=0)
    st = engine.status()[2]
    assert st["secret"].state == S.FAILED and "permission denied" in st["secret"].last_error
    run_virtual(engine, world.clock, 900)
    creds_calls = [w for _, w in world.server.calls if w == "creds"]
    assert len(creds_calls) <= 12      # re-checked every 300 s and after each new token, never in a loop


def test_renew_now_and_rotate(world):
    engine = world.engine()
    engine.start()
    engine.request("orders")
    run_virtual(engine, world.clock, 2)
    first = engine.current("orders")
    engine.renew_now("orders")
    run_virtual(engine, world.clock, 0)
    assert engine.current("orders").username == first.username
    assert [w for _, w in world.server.calls].count("renew-lease") == 1
    engine.renew_now("orders", rotate=True)
    run_virtual(engine, world.clock, 0)
    assert engine.current("orders").username != first.username
    assert world.server.can_log_in(first.username, first.password)   # the old user stays valid


def test_lease_lost_on_the_server_is_replaced(world):
    engine = world.engine()
    engine.start()
    engine.request("orders")
    run_virtual(engine, world.clock, 2)
    first = engine.current("orders")
    world.server.leases[first.lease_id].revoked_at = world.clock.time()   # e.g. Vault lost its storage
    run_virtual(engine, world.clock, 60)
    again = engine.current("orders")
    assert again is not None and again.username != first.username
    assert world.server.can_log_in(again.username, again.password)


def test_no_secret_reaches_the_log(world, caplog):
    caplog.set_level(logging.DEBUG)
    world.server.lease_ttl, world.server.lease_max = 30, 120
    engine = world.engine()
    engine.start()
    engine.request("orders")
    run_virtual(engine, world.clock, 600)
    world.server.down = True
    run_virtual(engine, world.clock, 120)
    text = caplog.text
    for tok in world.server.tokens:
        assert tok not in text
    for lz in world.server.leases.values():
        assert lz.password not in text
    assert "fake-secret-key-value" not in text


# ------------------------------------------------------------------------------------------
# Threads on the real clock


def test_threaded_engine_want_release_and_bounded_stop(tmp_path):
    clock = SYSTEM_CLOCK
    server = FakeVaultServer(clock, token_ttl=1, token_max=2.5, lease_ttl=1, lease_max=2.5)
    paths = Paths(tmp_path / "c.toml", tmp_path / "state", tmp_path / "log", tmp_path / "run")
    engine = CredentialEngine(parse_config(CONFIG.format(mint_ahead=600)), paths, Keystore(InMemoryKeyring()),
                              tuning=Tuning(backoff=Backoff(0.2, 2)), aws=FakeAws(),
                              make_vault=lambda c: FakeVaultClient(server, c))
    engine.start()
    try:
        creds = engine.want("orders", timeout=5)
        assert server.can_log_in(creds.username, creds.password)
        end, users = time.monotonic() + 3.5, set()
        while time.monotonic() < end:     # a client logging in every 50 ms through two rotations
            c = engine.current("orders")
            assert c is not None and server.can_log_in(c.username, c.password)
            users.add(c.username)
            time.sleep(0.05)
        assert len(users) >= 2
        server.hang_seconds = 3          # Vault hangs: stop must still return within its bound
        t0 = time.monotonic()
        engine.stop(revoke=True, timeout=1.0)
        assert time.monotonic() - t0 < 2.5
        assert engine.store.records()   # not revoked in time: kept for the next start
    finally:
        server.hang_seconds = 0
        engine.stop(revoke=False, timeout=1)
        end = time.monotonic() + 10      # the abandoned revoke requests end on their own
        while any(t.name == "dbtunneld-revoke" for t in threading.enumerate()) and time.monotonic() < end:
            time.sleep(0.05)


def test_threaded_want_times_out_with_a_transient_error(tmp_path):
    server = FakeVaultServer(SYSTEM_CLOCK, down=True)
    paths = Paths(tmp_path / "c.toml", tmp_path / "state", tmp_path / "log", tmp_path / "run")
    engine = CredentialEngine(parse_config(CONFIG.format(mint_ahead=600)), paths, Keystore(InMemoryKeyring()),
                              tuning=Tuning(backoff=Backoff(0.2, 1)), aws=FakeAws(),
                              make_vault=lambda c: FakeVaultClient(server, c))
    engine.start()
    try:
        with pytest.raises(TransientError, match="unreachable"):
            engine.want("orders", timeout=0.6)
    finally:
        engine.stop(timeout=0.5)


def test_a_blocked_keychain_prompt_does_not_freeze_the_token_keeper(tmp_path):
    server = FakeVaultServer(SYSTEM_CLOCK, token_ttl=1, token_max=30, lease_ttl=1, lease_max=30)
    paths = Paths(tmp_path / "c.toml", tmp_path / "state", tmp_path / "log", tmp_path / "run")
    keychain = BlockingMacKeychain()                  # the Keychain prompt stays unanswered
    keystore = Keystore(keychain)
    keystore.timeout = 0.5
    engine = CredentialEngine(parse_config(CONFIG.format(mint_ahead=600)), paths, keystore,
                              tuning=Tuning(backoff=Backoff(0.2, 2)), aws=FakeAws(),
                              make_vault=lambda c: FakeVaultClient(server, c))
    engine.start()
    try:
        creds = engine.want("orders", timeout=5)     # resume asked the keychain: given up at 0.5 s
        assert server.can_log_in(creds.username, creds.password)
        renewed = engine.tokens.renewals              # the token lives 1 s: kept alive meanwhile
        assert wait_until(lambda: engine.tokens.renewals >= renewed + 2, 5.0), engine.tokens.renewals
        assert engine.tokens.current() is not None and engine.current("orders") is not None
        assert not keychain.answered.is_set() and keychain.calls == 1
        assert not engine.keystore.persistent
    finally:
        keychain.answer()
        engine.stop(timeout=1)


def test_a_rotate_requested_during_a_renewal_is_not_lost(world, monkeypatch):
    """Issue 16: a rotate request that arrives while the keeper renews (another thread calls
    ``renew_now(rotate=True)`` during the Vault call) must rotate; its ticket is done only then."""
    engine = world.engine()
    engine.start()
    keeper = engine.request("orders")
    run_virtual(engine, world.clock, 2)
    first = engine.current("orders")
    tickets = []
    real_renew = world.server.renew_lease

    def renew_while_a_rotate_arrives(secret, lease_id, increment):
        if not tickets:
            tickets.append(keeper.request_renewal(rotate=True))   # as the control thread would
        return real_renew(secret, lease_id, increment)

    monkeypatch.setattr(world.server, "renew_lease", renew_while_a_rotate_arrives)
    renew_ticket = keeper.request_renewal()
    run_virtual(engine, world.clock, 0)
    assert keeper.wait_renewal(renew_ticket, 0)
    assert tickets and keeper.wait_renewal(tickets[0], 0), "the rotate's ticket must end once it is served"
    assert engine.current("orders").username != first.username, "the rotate request was lost"
    assert len(kinds(world.events, "db.rotated", "orders")) == 1


# ------------------------------------------------------------------------------------------
# The leases file is written outside the records' lock (issue 16)


def _record(lease_id):
    return LeaseRecord(lease_id, "orders", f"v-{lease_id}", "http://127.0.0.1:8200", os.getpid(), 1.0)


def test_a_slow_leases_file_write_does_not_hold_readers_or_other_changes(tmp_path, monkeypatch):
    import json
    import dbtunneld.engine.lease_store as lease_store

    store = LeaseStore(tmp_path / "leases.json")
    entered, gate = threading.Event(), threading.Event()
    real_dump = json.dump

    def slow_dump(obj, f, **kw):
        if not entered.is_set():              # the first write stalls (a slow or hung disk)
            entered.set()
            gate.wait(10)
        return real_dump(obj, f, **kw)

    monkeypatch.setattr(lease_store.json, "dump", slow_dump)
    threading.Timer(3.0, gate.set).start()    # old code: the reader below waits for this
    first = threading.Thread(target=store.add, args=(_record("a"),))
    first.start()
    assert entered.wait(5)
    started = time.monotonic()
    assert [r.lease_id for r in store.records()] == ["a"]
    second = threading.Thread(target=store.add, args=(_record("b"),))
    second.start()
    assert wait_until(lambda: len(store.records()) == 2, 2.0), "a change waited for the disk"
    took = time.monotonic() - started
    print(f"records() and a second change took {took * 1000:.0f} ms while a write hung")
    assert took < 1.0, took
    gate.set()
    first.join(10)
    second.join(10)
    assert sorted(r.lease_id for r in LeaseStore(tmp_path / "leases.json").records()) == ["a", "b"]


def test_an_older_snapshot_never_overwrites_a_newer_one(tmp_path):
    store = LeaseStore(tmp_path / "leases.json")
    store.add(_record("a"))
    with store._lock:
        store._records["b"] = _record("b")
        older = store._snapshot()
        store._records["c"] = _record("c")
        newer = store._snapshot()
    store._write(*newer)                       # the later change reached the disk first
    store._write(*older)
    assert sorted(r.lease_id for r in LeaseStore(tmp_path / "leases.json").records()) == ["a", "b", "c"]
