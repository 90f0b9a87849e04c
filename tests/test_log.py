"""Logging: masking of registered secrets everywhere in a record, private rotating file, unit context."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from dbtunneld.adapters import log as dlog


@pytest.fixture
def logfile(tmp_path):
    path = tmp_path / "log" / "dbtunneld.log"
    handlers = dlog.setup_logging(path, stderr=False, level=logging.DEBUG)
    yield path
    root = logging.getLogger()
    for h in handlers:
        root.removeHandler(h)
        h.close()
    dlog._installed.clear()


def _flush():
    for h in logging.getLogger().handlers:
        h.flush()


def test_registered_secret_is_masked_in_message_args_and_traceback(logfile):
    secret = "Zq8-very-secret-password"
    dlog.register_secret(secret)
    logger = logging.getLogger("dbtunneld.test")
    logger.info("password is %s", secret)
    logger.warning(f"inline {secret} here")
    try:
        raise ValueError(f"failed with {secret}")
    except ValueError:
        logger.exception("boom")
    _flush()
    text = logfile.read_text()
    assert secret not in text
    assert text.count(dlog.MASK) == 3  # message, f-string, exception line of the traceback
    assert "password is ***" in text
    assert "ValueError: failed with ***" in text


def test_token_shaped_values_are_masked_without_registration(logfile):
    logging.getLogger("dbtunneld.test").info("token hvs.CAESIJ0aaaaaaaaaaaaaaaaaaaaaaaaaaaa and s.abcdefghijklmnopqrstuvwx")
    _flush()
    text = logfile.read_text()
    assert "hvs." not in text and "s.abcdef" not in text
    assert text.count(dlog.MASK) == 2


def test_forget_and_short_values():
    reg = dlog.SecretRegistry()
    reg.register("abc")            # too short to mask safely
    reg.register("longer-secret")
    reg.register("longer-secret-with-suffix")
    assert reg.mask("abc longer-secret-with-suffix longer-secret") == "abc *** ***"
    reg.forget("longer-secret")
    assert reg.mask("longer-secret") == "longer-secret"


def test_registry_is_bounded():
    reg = dlog.SecretRegistry(limit=3)
    for i in range(5):
        reg.register(f"secret-number-{i}")
    assert reg.mask("secret-number-0") == "secret-number-0"
    assert reg.mask("secret-number-4") == dlog.MASK


def test_log_file_is_private_and_rotates(tmp_path):
    path = tmp_path / "l" / "d.log"
    handlers = dlog.setup_logging(path, stderr=False, max_bytes=200, backups=2)
    try:
        for i in range(50):
            logging.getLogger("dbtunneld.test").info("line %d %s", i, "x" * 40)
        for h in handlers:
            h.flush()
        files = sorted(p.name for p in path.parent.iterdir())
        assert files == ["d.log", "d.log.1", "d.log.2"]
        for p in path.parent.iterdir():
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    finally:
        root = logging.getLogger()
        for h in handlers:
            root.removeHandler(h)
            h.close()
        dlog._installed.clear()


def test_setup_replaces_only_its_own_handlers(tmp_path):
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    try:
        first = dlog.setup_logging(tmp_path / "a.log", stderr=True)
        second = dlog.setup_logging(tmp_path / "b.log", stderr=False)
        assert foreign in root.handlers
        assert not any(h in root.handlers for h in first)
        assert len(second) == 1 and second[0] in root.handlers
    finally:
        for h in dlog._installed:
            root.removeHandler(h)
            h.close()
        dlog._installed.clear()
        root.removeHandler(foreign)


def test_unit_logger_prefixes_context(caplog):
    caplog.set_level(logging.INFO)
    dlog.unit_logger("dbtunneld.engine.lease_keeper", db="orders", role="orders-ro").info("renewed in %.1f s", 3.25)
    assert caplog.records[-1].getMessage() == "[db=orders, role=orders-ro] renewed in 3.2 s"


def test_install_masking_is_idempotent():
    h = logging.NullHandler()
    dlog.install_masking(h)
    dlog.install_masking(h)
    assert sum(isinstance(f, dlog.MaskingFilter) for f in h.filters) == 1


@pytest.mark.parametrize("text, hidden, kept", [
    ('b\'{"accessToken": "at-123", "tokenType": "Bearer", "refreshToken": "rt-456"}\'', ["at-123", "rt-456"], "Bearer"),
    ('{"clientId": "c1", "clientSecret": "cs-789"}', ["cs-789"], '"c1"'),
    ('{"roleCredentials": {"accessKeyId": "ASIA1", "secretAccessKey": "sk-1", "sessionToken": "st+/="}}',
     ["sk-1", "st+/="], "ASIA1"),
    ("<SecretAccessKey>wJalr</SecretAccessKey><SessionToken>FQoG/+=</SessionToken>", ["wJalr", "FQoG/+="],
     "<SessionToken>"),
    ("{'X-Amz-Security-Token': b'IQoJb3', 'x-amz-sso_bearer_token': b'abc-def', 'Host': 'sts'}",
     ["IQoJb3", "abc-def"], "'sts'"),
    ('{"auth": {"client_token": "tok-1"}, "data": {"password": "A1a-xyz", "username": "v-1"}}',
     ["tok-1", "A1a-xyz"], '"v-1"'),
])
def test_secret_named_fields_of_logged_bodies_are_masked(text, hidden, kept):
    masked = dlog.SecretRegistry().mask(text)
    assert all(value not in masked for value in hidden), masked
    assert kept in masked and dlog.MASK in masked


def test_setup_keeps_wire_loggers_at_info_even_in_debug(tmp_path):
    handlers = dlog.setup_logging(tmp_path / "d.log", stderr=False, level=logging.DEBUG)
    try:
        assert logging.getLogger("botocore").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("urllib3").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("dbtunneld.engine.lease_keeper").getEffectiveLevel() == logging.DEBUG
    finally:
        root = logging.getLogger()
        for h in handlers:
            root.removeHandler(h)
            h.close()
        dlog._installed.clear()
        for name in dlog.WIRE_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_botocore_token_refresh_warnings_are_quieted(tmp_path):
    import logging

    from dbtunneld.adapters.log import setup_logging

    setup_logging(tmp_path / "q.log", stderr=False, level=logging.DEBUG)
    try:
        tokens = logging.getLogger("botocore.tokens")
        tokens.warning("Refreshing token failed during the mandatory refresh period.")
        tokens.error("a real token error")
        logging.getLogger("dbtunneld.test").warning("our own warning")
    finally:
        setup_logging(None, stderr=False)
    text = (tmp_path / "q.log").read_text()
    assert "mandatory refresh" not in text
    assert "a real token error" in text and "our own warning" in text
