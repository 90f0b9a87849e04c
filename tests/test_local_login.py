"""The local password store: stable across restarts with a keyring, new per start in memory-only
mode, reset on request, kept under the versioned key ``v1:local-password:NAME``."""

from __future__ import annotations

from dbtunneld import keystore as ks
from dbtunneld.local_login import PASSWORD_KIND, LocalPasswords
from helpers.keyrings import InMemoryKeyring


def test_password_is_stable_and_survives_a_restart_with_a_keyring():
    backend = InMemoryKeyring()
    first = LocalPasswords(ks.Keystore(backend)).get("orders")
    assert len(first) >= 20 and first == LocalPasswords(ks.Keystore(backend)).get("orders")   # a restart
    assert backend.get_password(ks.SERVICE, f"v1:{PASSWORD_KIND}:orders") == first
    assert LocalPasswords(ks.Keystore(backend)).get("billing") != first                       # per cluster


def test_memory_only_mode_makes_a_new_password_per_start():
    one, two = LocalPasswords(ks.Keystore.memory()), LocalPasswords(ks.Keystore.memory())
    assert one.get("orders") == one.get("orders") != two.get("orders")


def test_reset_gives_a_new_password_and_logs_no_secret(caplog):
    caplog.set_level("INFO")
    passwords = LocalPasswords(ks.Keystore(InMemoryKeyring()))
    old = passwords.get("orders")
    passwords.reset("orders")
    new = passwords.get("orders")
    assert new != old and "local password reset" in caplog.text
    assert old not in caplog.text and new not in caplog.text
