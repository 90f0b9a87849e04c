"""Keyring backends for tests: an in-memory one (the "real" keyring of most tests), a
plaintext look-alike (to check it is refused) and a broken one (to check degradation)."""

from __future__ import annotations

import threading

from keyring.backend import KeyringBackend
from keyring.backends.chainer import ChainerBackend
from keyring.errors import KeyringLocked, PasswordDeleteError


class InMemoryKeyring(KeyringBackend):
    """A secure-looking backend that keeps entries in a dict (per instance)."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service, username):
        return self.entries.get((service, username))

    def set_password(self, service, username, password):
        self.entries[(service, username)] = password

    def delete_password(self, service, username):
        if (service, username) not in self.entries:
            raise PasswordDeleteError("not found")
        del self.entries[(service, username)]


class PlaintextKeyring(InMemoryKeyring):
    """Looks like keyrings.alt's plaintext file backend."""


PlaintextKeyring.__module__ = "keyrings.alt.file"


class LockedKeyring(InMemoryKeyring):
    """A keyring that turned locked: every operation raises."""

    def get_password(self, service, username, *more):
        raise KeyringLocked("Failed to unlock the collection!")

    set_password = delete_password = get_password


def chainer_of(*members):
    """A chainer backend over exactly ``members`` (highest priority first)."""

    class FixedChainer(ChainerBackend):
        backends = list(members)

    return FixedChainer()


class BlockingKeyring(InMemoryKeyring):
    """A keyring whose calls wait for an answer that does not come (until ``answer()``).

    Real behaviour it follows: keyring's macOS backend (keyring/backends/macOS/api.py) calls
    ``SecItemCopyMatching`` / ``SecItemAdd``, which block until the user answers the Keychain
    access prompt ("python3.12 wants to use your confidential information..."), shown again for
    a new binary after every Homebrew Python upgrade; the SecretService backend
    (keyring/backends/SecretService.py, ``get_preferred_collection`` -> secretstorage
    ``Collection.unlock``, whose ``exec_prompt`` waits for the prompt's ``Completed`` signal) waits
    for the unlock prompt of a locked collection. Neither has a timeout. ``calls`` counts the
    calls that started.
    """

    def __init__(self) -> None:
        super().__init__()
        self.answered = threading.Event()
        self.calls = 0

    def _wait(self) -> None:
        self.calls += 1
        self.answered.wait()

    def get_password(self, service, username):
        self._wait()
        return super().get_password(service, username)

    def set_password(self, service, username, password):
        self._wait()
        super().set_password(service, username, password)

    def delete_password(self, service, username):
        self._wait()
        super().delete_password(service, username)

    def answer(self) -> None:
        self.answered.set()


class BlockingMacKeychain(BlockingKeyring):
    """``BlockingKeyring`` named as keyring's macOS backend (keyring.backends.macOS.Keyring)."""


BlockingMacKeychain.__module__ = "keyring.backends.macOS"
