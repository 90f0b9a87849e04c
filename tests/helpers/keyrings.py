"""Keyring backends for tests: an in-memory one (the "real" keyring of most tests), a
plaintext look-alike (to check it is refused) and a broken one (to check degradation)."""

from __future__ import annotations

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
