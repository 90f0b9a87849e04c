"""The OS keychain (through the ``keyring`` library), for the secrets that must survive a restart.

Keys follow a versioned schema (service ``dbtunneld``, user name ``v1:<kind>:<name>``), so a
later schema can ignore or migrate old entries. Backends that keep secrets in plain files
(``keyrings.alt``) or that cannot store anything (``fail`` / ``null``, an empty chainer) are never
used. With no secure backend the store keeps secrets in memory only and says so once; it never
falls back to plain text. A backend that breaks at run time (locked, bus gone) degrades the same way.

A keyring call can block: keyring's macOS backend calls ``SecItemCopyMatching``, which waits for
the user's answer to the Keychain access prompt (shown again after every Homebrew Python upgrade,
as the binary changed), and a locked Secret Service collection waits for its unlock prompt. So
each call runs on a helper thread with a deadline (``Keystore.timeout``); past it the store goes
memory-only with one message (on macOS: choose "Always Allow"), and the caller (a keeper) goes on.

Modes (``Keystore.open(mode)``, default from ``DBTUNNELD_KEYRING``): ``auto`` (a secure backend
if there is one, else memory), ``system`` (a secure backend or an error), ``memory``.
"""

from __future__ import annotations

import logging
import os
import threading

import keyring
import keyring.backend
import keyring.errors
from keyring.backends import chainer, fail, null

from ..core.errors import NeedsUserError, is_bug

log = logging.getLogger(__name__)

SERVICE = "dbtunneld"
SCHEMA = "v1"
MODES = ("auto", "system", "memory")
ENV_MODE = "DBTUNNELD_KEYRING"
PLAINTEXT_MODULES = ("keyrings.alt",)
# What memory-only costs, truthfully: the keyring holds only the Vault token; after a restart the
# daemon logs in to Vault again with the AWS SSO session, which the AWS CLI's cache keeps on disk.
MEMORY_NOTE = ("secrets are kept in memory only: after a restart dbtunneld logs in to Vault again "
               "(no new sign-in while the AWS SSO session lasts)")
CALL_TIMEOUT = 5.0            # seconds a keyring call may take before the store goes memory-only
MACOS_PROMPT = ('macOS is probably asking whether Python may use the Keychain item: choose "Always Allow" '
                "(it asks again after every Python upgrade); the next start of dbtunneld uses the Keychain")
LOCKED_PROMPT = "a locked keyring waits for its unlock prompt: unlock it at login, then restart dbtunneld"
FIX = ("install and unlock a Secret Service keyring (gnome-keyring or KWallet; macOS Keychain and "
       "Windows Credential Locker work as they are) and remove PYTHON_KEYRING_BACKEND or "
       f"keyringrc.cfg settings that pick another backend, or set {ENV_MODE}=memory to keep secrets "
       "in memory only (a restart then logs in to Vault again)")


class KeystoreRefusedError(NeedsUserError):
    """The configured keyring backend would store secrets in plain text."""

    hint = FIX


class KeystoreUnavailableError(NeedsUserError):
    """No secure keyring backend is available and memory-only mode was not allowed."""

    hint = FIX


def backend_name(backend: keyring.backend.KeyringBackend) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def classify(backend: keyring.backend.KeyringBackend) -> str:
    """``ok``, ``plaintext`` (refused: secrets in files) or ``none`` (cannot store anything)."""
    if isinstance(backend, (fail.Keyring, null.Keyring)):
        return "none"
    if type(backend).__module__.startswith(PLAINTEXT_MODULES) or "plaintext" in type(backend).__name__.lower():
        return "plaintext"
    if isinstance(backend, chainer.ChainerBackend):
        return "none" if not backend.backends else "ok"
    try:
        return "ok" if backend.priority > 0 else "none"
    except Exception:  # a backend's priority raises when it is not viable here
        return "none"


def resolve(backend: keyring.backend.KeyringBackend) -> tuple[keyring.backend.KeyringBackend | None, str]:
    """The backend to use and, when there is none, why.

    A chainer is opened up: its best secure member is used directly, so a write can never slip
    through to a plaintext member further down the chain.
    """
    members = list(backend.backends) if isinstance(backend, chainer.ChainerBackend) else [backend]
    kinds = [(m, classify(m)) for m in members]
    for member, kind in kinds:
        if kind == "ok" and not isinstance(member, chainer.ChainerBackend):
            return member, ""
    plaintext = [m for m, kind in kinds if kind == "plaintext"]
    if plaintext:
        raise KeystoreRefusedError(
            f"keyring backend {backend_name(plaintext[0])} stores secrets in plain text; dbtunneld refuses it")
    return None, f"no secure keyring backend ({backend_name(backend)})"


class Keystore:
    """Get / set / delete secrets by ``(kind, name)``; memory always holds the current values."""

    def __init__(self, backend: keyring.backend.KeyringBackend | None, reason: str = "", *,
                 timeout: float = CALL_TIMEOUT) -> None:
        self._backend = backend
        self.timeout = timeout
        self._memory: dict[str, str] = {}
        self._lock = threading.Lock()
        self._reason = reason
        if backend is None:
            log.warning("%s (%s)", MEMORY_NOTE, reason or "memory-only mode")

    @classmethod
    def open(cls, mode: str | None = None, backend: keyring.backend.KeyringBackend | None = None) -> "Keystore":
        """Pick the backend for ``mode``; raises ``KeystoreRefusedError`` for a plaintext backend."""
        mode = (mode or os.environ.get(ENV_MODE) or "auto").strip().lower()
        if mode not in MODES:
            raise KeystoreUnavailableError(f"{ENV_MODE}={mode!r} is not a keyring mode; use one of {', '.join(MODES)}")
        if mode == "memory":
            return cls(None, "memory-only mode chosen")
        chosen, reason = resolve(backend or keyring.get_keyring())
        if chosen is None and mode == "system":
            raise KeystoreUnavailableError(f"{reason}: cannot keep the Vault token across restarts")
        if chosen is not None:
            log.info("secrets are kept in the keyring %s", backend_name(chosen))
        return cls(chosen, reason)

    @classmethod
    def memory(cls) -> "Keystore":
        return cls(None, "memory-only mode chosen")

    @property
    def persistent(self) -> bool:
        """True while secrets survive a restart (a secure backend that works)."""
        return self._backend is not None

    def describe(self) -> str:
        """For status displays: the backend name, or why secrets are memory-only."""
        if self._backend is not None:
            return backend_name(self._backend)
        return f"memory only ({self._reason})" if self._reason else "memory only"

    @staticmethod
    def key(kind: str, name: str) -> str:
        return f"{SCHEMA}:{kind}:{name}"

    def get(self, kind: str, name: str) -> str | None:
        key = self.key(kind, name)
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        value = self._backend_call("read", lambda b: b.get_password(SERVICE, key))
        if value is not None:
            with self._lock:
                self._memory[key] = value
        return value

    def set(self, kind: str, name: str, secret: str) -> None:
        key = self.key(kind, name)
        with self._lock:
            self._memory[key] = secret
        self._backend_call("write", lambda b: b.set_password(SERVICE, key, secret))

    def delete(self, kind: str, name: str) -> None:
        key = self.key(kind, name)
        with self._lock:
            self._memory.pop(key, None)
        self._backend_call("delete", lambda b: _delete_quietly(b, key))

    def _backend_call(self, what: str, call):
        backend = self._backend
        if backend is None:
            return None
        done, result = _with_deadline(lambda: call(backend), self.timeout, f"dbtunneld-keyring-{what}")
        if not done:
            self._degrade(f"keyring {backend_name(backend)} did not answer a {what} within {self.timeout:g} s "
                          f"({MACOS_PROMPT if _is_macos(backend) else LOCKED_PROMPT})")
            return None
        if isinstance(result, BaseException):  # locked keyring, bus gone, backend bug: never fatal
            if is_bug(result):
                log.error("keyring %s failed to %s with an internal error", backend_name(backend), what,
                          exc_info=result)
            self._degrade(f"keyring {backend_name(backend)} failed to {what} ({type(result).__name__}: {result})")
            return None
        return result

    def _degrade(self, reason: str) -> None:
        with self._lock:
            if self._backend is None:
                return
            self._backend, self._reason = None, reason
        log.warning("%s; %s", reason, MEMORY_NOTE)


def _with_deadline(call, timeout: float, name: str) -> tuple[bool, object]:
    """Run ``call`` on a helper thread; ``(False, None)`` when it is still running after ``timeout``
    (the thread is left to finish on its own: a blocked keychain call cannot be cancelled), else
    ``(True, its result or the exception it raised)``."""
    box: list[object] = []

    def run() -> None:
        try:
            box.append(call())
        except Exception as exc:
            box.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    return (True, box[0]) if box else (False, None)


def _is_macos(backend: keyring.backend.KeyringBackend) -> bool:
    return type(backend).__module__.startswith("keyring.backends.macOS")


def _delete_quietly(backend: keyring.backend.KeyringBackend, key: str) -> None:
    try:
        backend.delete_password(SERVICE, key)
    except keyring.errors.PasswordDeleteError:
        pass  # nothing stored under that key
