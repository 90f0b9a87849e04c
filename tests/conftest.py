"""Shared test fixtures: a private HOME for the whole run, and the sandbox stack.

At import (before any test module imports botocore, which fixes its SSO cache folder from
HOME) HOME, DBTUNNELD_HOME and the AWS config paths point into a private temp dir, and
AWS_* / VAULT_* variables from the developer's shell are dropped: no test touches ~/.aws.

Fixtures:
- ``stack`` (session): the full sandbox stack, started once per run; its AWS config is
  written to the private HOME (profile ``sandbox``). Before each test, services a previous
  test killed or froze are brought back (``Stack.heal``), so fault tests need not clean up.
- ``make_stack`` (function): a factory for a private stack with its own TTLs/parts,
  e.g. ``make_stack(lease_ttl=3, sso=False)``; stopped at the end of the test.
- ``short_ttl_stack`` (function): a private stack with TTLs of seconds.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

def _sweep_stale_homes() -> None:
    """Private HOMEs of earlier runs that were killed before their atexit cleanup ran."""
    for old in Path(tempfile.gettempdir()).glob("dbtunneld-test-home-*"):
        try:
            owner = int((old / ".owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            pass


_sweep_stale_homes()
_HOME = Path(tempfile.mkdtemp(prefix="dbtunneld-test-home-"))
(_HOME / ".owner.pid").write_text(str(os.getpid()))
for _key in list(os.environ):
    if _key.startswith(("AWS_", "VAULT_", "BAO_")):
        del os.environ[_key]
os.environ.update(
    HOME=str(_HOME), DBTUNNELD_HOME=str(_HOME / "dbtunneld"),
    AWS_CONFIG_FILE=str(_HOME / ".aws" / "config"),
    AWS_SHARED_CREDENTIALS_FILE=str(_HOME / ".aws" / "credentials"),
    AWS_EC2_METADATA_DISABLED="true")
atexit.register(shutil.rmtree, _HOME, True)

import pytest  # noqa: E402

from dbtunneld.sandbox.stack import Stack, install_signal_guard, start_stack  # noqa: E402

SHORT_TTLS = dict(token_ttl=6, token_max_ttl=20, lease_ttl=4, lease_max_ttl=12)


STACK_FIXTURES = {"stack", "make_stack", "short_ttl_stack"}


def pytest_collection_modifyitems(config, items):
    """Tests that use the sandbox stack (directly or through another fixture) get the ``stack``
    marker, so ``./dev test --fast`` (``-m "not stack ..."``) leaves them out."""
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def private_home() -> Path:
    """The run's private HOME (also in os.environ["HOME"])."""
    return _HOME


@pytest.fixture(scope="session")
def stack(request) -> Stack:
    """The session's sandbox stack (see dbtunneld/sandbox/stack.py for the API)."""
    install_signal_guard()
    with start_stack(home=_HOME) as s:
        request.session.dbtunneld_stack = s
        yield s
        request.session.dbtunneld_stack = None


@pytest.fixture(autouse=True)
def _heal_session_stack(request):
    """Bring back services of the session stack that an earlier test killed or froze."""
    s = getattr(request.session, "dbtunneld_stack", None)
    if s is not None:
        s.heal()
    yield


@pytest.fixture
def make_stack():
    """Factory for private stacks: ``make_stack(**start_stack_keywords) -> Stack``."""
    stacks: list = []

    def make(**kwargs) -> Stack:
        install_signal_guard()
        cm = start_stack(**kwargs)
        s = cm.__enter__()
        stacks.append((cm, s))
        return s

    yield make
    for cm, _s in reversed(stacks):
        cm.__exit__(None, None, None)


@pytest.fixture
def short_ttl_stack(make_stack) -> Stack:
    """A private stack whose tokens and leases live seconds (see SHORT_TTLS)."""
    return make_stack(**SHORT_TTLS)
