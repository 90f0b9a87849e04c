"""The exception tree, grouped by what the caller does about an error.

* ``TransientError``: retry it later (the one retry loop that owns the unit decides when).
* ``NeedsUserError``: ask the user (sign in, free a port, accept a host key...).
* ``ConfigError``: fix the config; carries every problem with its key path.
* ``ClosedError``: the resource was closed by its owner (not a failure).

Every user-facing error carries a ``hint`` that says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass


class DbtunneldError(Exception):
    """Base of every error dbtunneld raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def one_line(self) -> str:
        """The message and, when there is one, the hint: what the CLI prints."""
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class TransientError(DbtunneldError):
    """A failure worth retrying: network down, server restarting, timeout."""


class NeedsUserError(DbtunneldError):
    """Nothing changes until the user acts."""


class SignInNeededError(NeedsUserError):
    """AWS SSO session missing or expired: the user must sign in."""

    hint = "run `dbtunneld login` (or 'Sign in...' in the tray)"


class PortInUseError(NeedsUserError):
    """The pinned local port is held by another process."""

    def __init__(self, port: int, holder: str = "") -> None:
        who = f" by {holder}" if holder else " by another process"
        super().__init__(
            f"127.0.0.1:{port} is already in use{who}",
            hint=f"stop that process or pin another local_port for this cluster (the port is never moved silently)",
        )
        self.port = port
        self.holder = holder


class HostKeyError(NeedsUserError):
    """The bastion's SSH host key is unknown or does not match the pinned one."""


class PermissionDeniedError(NeedsUserError):
    """Vault, AWS or the bastion refused our identity."""


class ConfigError(DbtunneldError):
    """The config is invalid; ``problems`` lists every one, each with key path and fix."""

    def __init__(self, source: str, problems: list["Problem"]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = [p.render(source) for p in self.problems]
        super().__init__("\n".join(lines) if lines else f"{source}: invalid config")
        self.hint = "fix the keys named above, then run `dbtunneld config check`"


@dataclass(frozen=True)
class Problem:
    """One config problem: where it is (a key path) and what to do."""

    path: str
    message: str
    fix: str = ""

    def render(self, source: str) -> str:
        where = f"{source}: {self.path}: " if self.path else f"{source}: "
        return where + self.message + (f"; {self.fix}" if self.fix else "")


class UnknownNameError(DbtunneldError):
    """A cluster (or other named thing) that the config does not define."""

    hint = "run `dbtunneld status` to list the configured clusters"


class ClosedError(DbtunneldError):
    """Used after close() by its owner (as opposed to broken underneath)."""


class ProtocolError(DbtunneldError):
    """A control-protocol or wire-protocol message was malformed."""


# Exceptions that mean a bug (in dbtunneld or in a library it calls), not a failure of the world
# outside: retrying them fast cannot help, and hiding them as "transient" hides the traceback.
BUG_TYPES: tuple[type[BaseException], ...] = (AttributeError, TypeError, LookupError, NameError, AssertionError,
                                              ArithmeticError, NotImplementedError, RecursionError)


def is_bug(exc: BaseException) -> bool:
    """True for a programming error (AttributeError, TypeError, KeyError...), which no classifier
    turns into a ``DbtunneldError``: it propagates to the loop that owns the unit, which logs its
    traceback once and shows "internal error" (``keeper.Keeper``)."""
    return isinstance(exc, BUG_TYPES) and not isinstance(exc, DbtunneldError)


def reraise_if_bug(exc: BaseException) -> None:
    """For classifiers: let a bug through unchanged (with its traceback) instead of classifying it."""
    if is_bug(exc):
        raise exc
