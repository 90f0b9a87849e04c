"""Logging for dbtunneld: a private rotating log file plus stderr, secret masking, unit context.

Any module that holds a secret (Vault token, DB password, SSO access token) registers it with
``register_secret``; the ``MaskingFilter`` installed on every handler by ``setup_logging`` then
replaces it, wherever it appears (message, arguments, tracebacks), with ``***``. Values that look
like Vault tokens, and secret-named fields of logged bodies and headers (``"accessToken": ...``,
``<SessionToken>``, ``X-Amz-Security-Token``), are masked even when nobody registered them.
``setup_logging`` also keeps the wire loggers of botocore/urllib3 at INFO: they log whole
request and response bodies at DEBUG. ``unit_logger`` prefixes lines
with the unit they concern (``[db=orders] lease renewed ...``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, Mapping, MutableMapping, cast

MASK = "***"
MIN_SECRET_LENGTH = 6          # shorter values would mask ordinary words
MAX_SECRETS = 4096             # oldest registrations are dropped past this (old passwords)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Vault / OpenBao service and batch tokens (hvs./hvb./hvr. and the older s./b. forms).
TOKEN_RE = re.compile(r"\b(?:hv[sbr]\.[A-Za-z0-9_-]{20,}|[sb]\.[A-Za-z0-9]{24,})\b")
# Secret-named fields in the bodies and headers libraries log at DEBUG (botocore logs whole
# responses): JSON ``"accessToken": "..."``, XML ``<SessionToken>...</``, header reprs.
SECRET_KEYS = (r"access_?token|refresh_?token|client_?secret|device_?code|password|client_token|"
               r"secret_?access_?key|session_?token|token")
KEYED_RES = (
    re.compile(r'(?i)("(?:' + SECRET_KEYS + r')"\s*:\s*")([^"\\]+)'),
    re.compile(r"(?i)(<(?:SecretAccessKey|SessionToken)>)([^<]+)"),
    re.compile(r"(?i)(['\"]?(?:x-amz-security-token|x-amz-sso_bearer_token|x-vault-token)['\"]?\s*[:=]\s*b?['\"]?)"
               r"([^'\"\s,}]+)"),
)


class SecretRegistry:
    """The secrets to mask, most recent last (thread-safe)."""

    def __init__(self, limit: int = MAX_SECRETS) -> None:
        self._limit = limit
        self._secrets: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def register(self, value: str | None) -> None:
        if not value or len(value) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            self._secrets[value] = None
            self._secrets.move_to_end(value)
            while len(self._secrets) > self._limit:
                self._secrets.popitem(last=False)
            self._pattern = None

    def forget(self, value: str | None) -> None:
        with self._lock:
            if value is not None and value in self._secrets:
                del self._secrets[value]
                self._pattern = None

    def mask(self, text: str) -> str:
        pattern = self._compiled()
        if pattern is not None:
            text = pattern.sub(MASK, text)
        for keyed in KEYED_RES:
            text = keyed.sub(lambda m: m.group(1) + MASK, text)
        return TOKEN_RE.sub(MASK, text)

    def _compiled(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._secrets:
                # Longest first, so a secret containing another is masked whole.
                alternatives = sorted(self._secrets, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(s) for s in alternatives))
            return self._pattern


# One registry per process, on purpose: any module may log any value, so masking must see
# every secret the process holds.
SECRETS = SecretRegistry()


def register_secret(value: str | None) -> None:
    """Mask ``value`` in every log line from now on."""
    SECRETS.register(value)


def forget_secret(value: str | None) -> None:
    SECRETS.forget(value)


def mask(text: str) -> str:
    """``text`` with every registered secret (and anything token-shaped) replaced by ``***``."""
    return SECRETS.mask(text)


class MaskingFilter(logging.Filter):
    """Rewrites each record so that no registered secret reaches a handler."""

    def __init__(self, registry: SecretRegistry = SECRETS) -> None:
        super().__init__()
        self.registry = registry

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not hide the record
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.registry.mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.registry.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.registry.mask(record.stack_info)
        return True


class PrivateRotatingFileHandler(RotatingFileHandler):
    """A rotating log file created with mode 0600 (the log names users and lease ids)."""

    def _open(self) -> io.TextIOWrapper[Any]:  # noqa: D401 - logging's hook
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.chmod(self.baseFilename, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


_installed: list[logging.Handler] = []
WIRE_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")
# botocore.tokens and botocore.credentials log a WARNING with a whole traceback each time an SSO
# token is missing or its refresh fails (SSOTokenLoadError at every start before the first
# sign-in); the engine already turns that into one "sign-in needed" state, so only errors are kept.
QUIET_LOGGERS = {"botocore.tokens": logging.ERROR, "botocore.credentials": logging.ERROR}


def install_masking(handler: logging.Handler) -> logging.Handler:
    """Add the masking filter to a handler set up elsewhere (tests, other front-ends)."""
    if not any(isinstance(f, MaskingFilter) for f in handler.filters):
        handler.addFilter(MaskingFilter())
    return handler


def setup_logging(log_file: str | Path | None = None, *, level: int = logging.INFO,
                  stderr: bool = True, max_bytes: int = 5 * 1024 * 1024, backups: int = 5) -> list[logging.Handler]:
    """Send the root logger to ``log_file`` (rotating, 0600) and/or stderr, both masked.

    Calling it again replaces the handlers it installed before (not anyone else's).
    """
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed.clear()
    formatter = logging.Formatter(FORMAT)
    if log_file:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _installed.append(PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                     encoding="utf-8"))
    if stderr:
        _installed.append(logging.StreamHandler(sys.stderr))
    for handler in _installed:
        handler.setFormatter(formatter)
        install_masking(handler)
        root.addHandler(handler)
    root.setLevel(level)
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    for name, floor in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(level, floor))
    return list(_installed)


class UnitLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose lines start with the unit's context: ``[db=orders] ...``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{cast(Mapping[str, object], self.extra)['context']}] {msg}", kwargs


def unit_logger(logger: logging.Logger | str, **context: Any) -> UnitLogger:
    """``unit_logger(__name__, db="orders")`` -> lines prefixed ``[db=orders]``."""
    base = logging.getLogger(logger) if isinstance(logger, str) else logger
    text = ", ".join(f"{k}={v}" for k, v in context.items())
    return UnitLogger(base, {"context": text})


class RepeatLimiter:
    """Rate limit for a line that repeats (a retry loop's failure): ``admit(text)`` says whether
    to log it now: the first time, when the text changes, then at most once per ``interval`` s.
    It returns how many were held back since the last line logged (0 or more), or None to stay
    quiet. ``reset()`` after a recovery, so the next outage logs its first failure at once."""

    def __init__(self, interval: float = 60.0, clock: Any = None) -> None:
        import time

        self.interval = interval
        self._clock = clock or time.monotonic
        self._text: str | None = None
        self._logged_at = float("-inf")
        self.held = 0

    def admit(self, text: str) -> int | None:
        now = self._clock()
        if text != self._text or now - self._logged_at >= self.interval:
            held, self.held = self.held, 0
            self._text, self._logged_at = text, now
            return held
        self.held += 1
        return None

    def reset(self) -> int:
        """Forget the last line; return how many were held back since it."""
        held, self.held, self._text = self.held, 0, None
        return held


class RetryLog:
    """The failure lines of a retry loop: one WARNING per new error, then one per ``interval`` s
    with the count of attempts held back (``RepeatLimiter``); ``recovered()`` logs how many were
    not logged one by one and starts afresh. ``backoff_initial``: how often the loop retries while
    a client waits (said in the line, since that is what really happens then)."""

    def __init__(self, logger: Any, backoff_initial: float, interval: float = 60.0) -> None:
        self._log = logger
        self._backoff_initial = backoff_initial
        self._limiter = RepeatLimiter(interval)

    def failed(self, message: str, delay: float) -> None:
        held = self._limiter.admit(message)
        if held is None:
            return
        also = f"; {held} more failed attempt{'s' if held != 1 else ''} since the last such line" if held else ""
        self._log.warning("%s; next try in %.1f s, or every %g s while a client waits%s",
                          message, delay, self._backoff_initial, also)

    def recovered(self) -> None:
        held = self._limiter.reset()
        if held:
            self._log.info("up again (%d failed attempt%s not logged one by one)", held, "s" if held != 1 else "")
