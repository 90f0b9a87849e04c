"""Keystore: versioned keys, plaintext backends refused, memory-only mode, degradation, and a real
gnome-keyring-daemon on a private D-Bus."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
from keyring.backends import fail, null

from dbtunneld.adapters import keystore as ks
from dbtunneld.core.errors import NeedsUserError
from helpers.keyrings import (BlockingKeyring, BlockingMacKeychain, InMemoryKeyring, LockedKeyring, PlaintextKeyring,
                              chainer_of)


def test_keys_follow_the_versioned_schema():
    backend = InMemoryKeyring()
    store = ks.Keystore.open("auto", backend=backend)
    store.set("vault-token", "https://vault:8200#aws/dev", "tok-123456")
    assert backend.entries == {("dbtunneld", "v1:vault-token:https://vault:8200#aws/dev"): "tok-123456"}
    assert store.persistent and store.describe().endswith("InMemoryKeyring")


def test_values_survive_a_new_keystore_on_the_same_backend():
    backend = InMemoryKeyring()
    ks.Keystore.open(backend=backend).set("vault-token", "a", "secret-value")
    again = ks.Keystore.open(backend=backend)
    assert again.get("vault-token", "a") == "secret-value"
    again.delete("vault-token", "a")
    again.delete("vault-token", "a")  # idempotent
    assert ks.Keystore.open(backend=backend).get("vault-token", "a") is None


@pytest.mark.parametrize("mode", ["auto", "system"])
def test_plaintext_backend_is_refused_with_the_fix(mode):
    with pytest.raises(ks.KeystoreRefusedError) as exc:
        ks.Keystore.open(mode, backend=PlaintextKeyring())
    assert "keyrings.alt.file.PlaintextKeyring stores secrets in plain text" in str(exc.value)
    assert "DBTUNNELD_KEYRING=memory" in exc.value.hint and "gnome-keyring" in exc.value.hint
    assert isinstance(exc.value, NeedsUserError)


def test_chainer_uses_its_secure_member_directly_and_never_the_plaintext_one():
    good, plain = InMemoryKeyring(), PlaintextKeyring()
    store = ks.Keystore.open("auto", backend=chainer_of(good, plain))
    store.set("vault-token", "x", "secret-value")
    assert good.entries and not plain.entries


def test_chainer_of_only_plaintext_is_refused():
    with pytest.raises(ks.KeystoreRefusedError):
        ks.Keystore.open("auto", backend=chainer_of(PlaintextKeyring()))


@pytest.mark.parametrize("backend", [fail.Keyring(), null.Keyring(), chainer_of()], ids=["fail", "null", "empty-chainer"])
def test_no_secure_backend_means_memory_only_said_once(backend, caplog):
    caplog.set_level(logging.WARNING, logger="dbtunneld.adapters.keystore")
    store = ks.Keystore.open("auto", backend=backend)
    store.set("vault-token", "x", "secret-value")
    store.set("vault-token", "y", "secret-value-2")
    assert store.get("vault-token", "x") == "secret-value"
    assert not store.persistent and store.describe().startswith("memory only")
    notes = [r for r in caplog.records if ks.MEMORY_NOTE in r.getMessage()]
    assert len(notes) == 1


def test_system_mode_without_a_secure_backend_is_an_error():
    with pytest.raises(ks.KeystoreUnavailableError):
        ks.Keystore.open("system", backend=fail.Keyring())


def test_memory_mode_and_mode_from_environment(monkeypatch, caplog):
    monkeypatch.setenv("DBTUNNELD_KEYRING", "memory")
    store = ks.Keystore.open(backend=InMemoryKeyring())
    assert not store.persistent
    monkeypatch.setenv("DBTUNNELD_KEYRING", "plain")
    with pytest.raises(ks.KeystoreUnavailableError, match="not a keyring mode"):
        ks.Keystore.open()


def test_broken_backend_degrades_to_memory_once(caplog):
    caplog.set_level(logging.WARNING, logger="dbtunneld.adapters.keystore")
    store = ks.Keystore.open("auto", backend=LockedKeyring())
    assert store.persistent
    store.set("vault-token", "x", "secret-value")
    assert store.get("vault-token", "x") == "secret-value"
    store.set("vault-token", "x", "secret-value-2")
    assert not store.persistent
    assert "KeyringLocked" in store.describe()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "secret-value" not in caplog.text


@pytest.mark.parametrize("backend,says", [(BlockingMacKeychain, '"Always Allow"'), (BlockingKeyring, "unlock it")])
def test_a_keychain_call_that_blocks_is_abandoned_at_its_deadline_then_memory_only(backend, says, caplog):
    caplog.set_level(logging.INFO, logger="dbtunneld.adapters.keystore")
    keychain = backend()
    store = ks.Keystore.open("auto", backend=keychain)
    store.timeout = 0.3
    try:
        got: list = []
        caller = threading.Thread(target=lambda: got.append(store.get("vault-token", "x")), daemon=True)
        caller.start()                                             # a keeper asking for its token
        caller.join(1.5)
        assert got == [None], "the keyring call froze its caller"   # the prompt waits; we do not
        assert not store.persistent and "did not answer a read within 0.3 s" in store.describe()
        store.set("vault-token", "x", "secret-value")              # memory only from now on
        assert store.get("vault-token", "x") == "secret-value"
        store.delete("vault-token", "x")
        assert keychain.calls == 1                                 # no pile of blocked threads
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and says in warnings[0] and "memory only" in warnings[0]
        assert "secret-value" not in caplog.text
    finally:
        keychain.answer()


# ------------------------------------------------------------------------------------------
# A real gnome-keyring-daemon on a private session bus


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def gnome_keyring(tmp_path, monkeypatch):
    if not (shutil.which("dbus-daemon") and shutil.which("gnome-keyring-daemon")):
        pytest.skip("dbus-daemon / gnome-keyring-daemon not installed (./dev setup installs them)")
    home, run = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    run.mkdir(mode=0o700)
    address = f"unix:path={tmp_path}/bus"
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(run),
               XDG_DATA_HOME=str(home / ".local/share"), DBUS_SESSION_BUS_ADDRESS=address)
    procs = []
    try:
        bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={address}",
                                "--print-address=1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env, start_new_session=True)
        procs.append(bus)
        assert bus.stdout.readline().startswith(b"unix:"), "dbus-daemon did not start"
        gk = subprocess.Popen(["gnome-keyring-daemon", "--unlock", "--foreground", "--components=secrets"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env, start_new_session=True)
        procs.append(gk)
        gk.stdin.write(b"test-keyring-password")
        gk.stdin.close()
        for key in ("HOME", "XDG_RUNTIME_DIR", "XDG_DATA_HOME", "DBUS_SESSION_BUS_ADDRESS"):
            monkeypatch.setenv(key, env[key])
        from keyring.backends import SecretService

        deadline = time.monotonic() + 10
        while True:
            backend = SecretService.Keyring()
            try:
                backend.get_password("dbtunneld", "probe")
                break
            except Exception:
                if time.monotonic() > deadline or gk.poll() is not None:
                    raise
                time.sleep(0.05)
        yield backend, home
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_real_gnome_keyring_keeps_the_token_across_keystores(gnome_keyring):
    backend, home = gnome_keyring
    store = ks.Keystore.open("system", backend=backend)
    assert store.describe() == "keyring.backends.SecretService.Keyring"
    store.set("vault-token", "http://127.0.0.1:8200#aws/dev", "hvs.test-token-for-gnome-keyring")
    # A new keystore (as after a daemon restart) reads it back from the daemon.
    fresh = ks.Keystore.open("system", backend=type(backend)())
    assert fresh.get("vault-token", "http://127.0.0.1:8200#aws/dev") == "hvs.test-token-for-gnome-keyring"
    # The secret is stored encrypted: the keyring file never holds it in clear text.
    files = list((home / ".local/share/keyrings").glob("*.keyring"))
    assert files and all(b"hvs.test-token" not in f.read_bytes() for f in files)
    fresh.delete("vault-token", "http://127.0.0.1:8200#aws/dev")
    assert ks.Keystore.open("system", backend=type(backend)()).get("vault-token", "http://127.0.0.1:8200#aws/dev") is None
