"""`dbtunneld doctor` on the sandbox stack: each layer is broken on purpose and must be named first.

Doctor runs as a subprocess like a user would run it, with a HOME of this module's own (its own
copy of the stack's AWS config and its own SSO sign-in); every run must leave no dynamic DB user.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dbtunneld.process import doctor
from dbtunneld.process.doctor import CheckResult

SIGN_IN = """
import sys, time
from dbtunneld.adapters.aws import AwsSession
from dbtunneld.adapters.sso import SsoDeviceLogin
from dbtunneld.core.config import load_config
login = SsoDeviceLogin(AwsSession(load_config(sys.argv[1]).aws))
auth = login.start()
deadline = time.monotonic() + 30
while not login.poll(auth, auth.interval).done:
    assert time.monotonic() < deadline, "sign-in not approved"
    time.sleep(0.1)
"""


class Home:
    """A private HOME with the stack's AWS config, and the env a user's shell would have."""

    def __init__(self, stack, root: Path):
        from dataclasses import replace

        from dbtunneld.sandbox.clientfiles import aws_config_text, client_env

        self.stack = stack
        self.info = replace(stack.info, home=str(root / "home"), aws_config_file=str(root / "home/.aws/config"),
                            dbtunneld_home=str(root / "dbtunneld"))
        Path(self.info.aws_config_file).parent.mkdir(parents=True, mode=0o700)
        Path(self.info.aws_config_file).write_text(aws_config_text(self.info))
        self.config_file = stack.config_file
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_", "DBTUNNELD_"))}
        self.env.update(client_env(self.info), DBTUNNELD_KEYRING="memory")

    def sso_cache_file(self) -> Path:
        import hashlib

        digest = hashlib.sha1(self.info.sso_session_name.encode()).hexdigest()
        return Path(self.info.home) / ".aws" / "sso" / "cache" / f"{digest}.json"


def run(home: Home, config: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbtunneld.ui.cli", "--config", config, "doctor", *extra],
                          env=home.env, capture_output=True, text=True, timeout=120)


def sign_in(home: Home) -> None:
    if home.sso_cache_file().exists():
        return
    home.stack.sso.auto_approve(True)
    try:
        subprocess.run([sys.executable, "-c", SIGN_IN, home.config_file], env=home.env, check=True, timeout=60)
    finally:
        home.stack.sso.auto_approve(False)


def lines_by_layer(stdout: str) -> dict[str, str]:
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"\s+(ok|FAIL|skip)\s+(\w+)\s", line)
        if m:
            found[m.group(2)] = m.group(1)
    return found


def variant(stack, tmp_path: Path, old: str, new: str) -> str:
    text = Path(stack.config_file).read_text()
    assert old in text
    path = tmp_path / "config.toml"
    path.write_text(text.replace(old, new, 1))
    return str(path)


# ------------------------------------------------------------------ pure parts

def test_exit_codes_follow_the_first_failure():
    ok = CheckResult("config", "ok")
    assert doctor.exit_code([ok, CheckResult("aws", "ok")]) == 0
    assert doctor.exit_code([CheckResult("config", "fail"), CheckResult("aws", "skip")]) == 2
    assert doctor.exit_code([ok, CheckResult("aws", "fail", error_type="SignInNeededError")]) == 4
    assert doctor.exit_code([ok, CheckResult("vault", "fail", error_type="TransientError")]) == 5


def test_verdict_names_the_layer_and_fix():
    results = [CheckResult("config", "ok"), CheckResult("vault", "fail", "down", "check vault.address"),
               CheckResult("bastion", "skip")]
    assert doctor.verdict(results) == "first broken layer: vault -> check vault.address"
    assert "not checked" in doctor.render_result(results[2])


def test_missing_config_is_the_first_broken_layer(tmp_path):
    results = doctor.diagnose(tmp_path / "nope.toml")
    assert [r.status for r in results] == ["fail"] + ["skip"] * 5
    assert "file not found" in results[0].detail and results[0].fix


# ------------------------------------------------------------------ on the stack

@pytest.fixture(scope="module")
def home(stack, tmp_path_factory):
    return Home(stack, tmp_path_factory.mktemp("doctor"))


def test_not_signed_in_names_aws(home):
    if home.sso_cache_file().exists():
        home.sso_cache_file().unlink()
    r = run(home, home.config_file)
    assert r.returncode == 4, r.stdout + r.stderr
    assert lines_by_layer(r.stdout) == {"config": "ok", "aws": "FAIL", "vault": "skip", "bastion": "skip",
                                        "transport": "skip", "database": "skip"}
    assert "first broken layer: aws" in r.stdout and "dbtunneld login" in r.stdout


def test_every_layer_works_and_nothing_is_left(stack, home, tmp_path):
    sign_in(home)
    report = tmp_path / "report.md"
    r = run(home, home.config_file, "--report", str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(lines_by_layer(r.stdout).values()) == {"ok"}
    assert "every layer works" in r.stdout and "logged in as v-" in r.stdout
    assert stack.dynamic_users() == []
    text = report.read_text()
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    assert "## checks" in text and "## config" in text
    for secret in (stack.secret_access_key, stack.root_token, *(c.admin_password for c in stack.clusters.values())):
        assert secret not in text
    assert json.loads(text.split("## results (json)\n", 1)[1])[-1]["status"] == "ok"


def test_vault_unreachable(stack, home, tmp_path):
    sign_in(home)
    closed = _closed_port()
    cfg = variant(stack, tmp_path, f'address = "{stack.vault_addr}"', f'address = "http://127.0.0.1:{closed}"')
    r = run(home, cfg)
    assert r.returncode == 5 and lines_by_layer(r.stdout)["vault"] == "FAIL"
    assert "cannot reach Vault" in r.stdout and "vault.address" in r.stdout


def test_vault_role_refused(stack, home, tmp_path):
    sign_in(home)
    cfg = variant(stack, tmp_path, f'role = "{stack.vault_role}"', 'role = "no-such-role"')
    r = run(home, cfg)
    assert lines_by_layer(r.stdout)["vault"] == "FAIL" and "no-such-role" in r.stdout


def test_bastion_down_names_transport(stack, home, tmp_path):
    sign_in(home)
    closed = _closed_port()
    cfg = variant(stack, tmp_path, f"port = {stack.ssh_port}", f"port = {closed}")
    r = run(home, cfg)
    layers = lines_by_layer(r.stdout)
    assert layers["bastion"] == "ok" and layers["transport"] == "FAIL", r.stdout
    assert layers["database"] == "skip"


def test_database_unreachable_names_database(stack, home, tmp_path):
    sign_in(home)
    orders = stack.clusters["orders"]
    cfg = variant(stack, tmp_path, f"port = {orders.port}", f"port = {_closed_port()}")
    r = run(home, cfg, "--cluster", "orders")
    layers = lines_by_layer(r.stdout)
    assert layers["transport"] == "ok" and layers["database"] == "FAIL", r.stdout
    assert stack.dynamic_users() == []           # the minted user was revoked anyway


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_layer_works_with_regional_sts_auto_and_a_namespace(make_stack, tmp_path):
    """Vault set up with the eu-west-1 STS and its mounts in namespace team-a; the config says
    sts_region = "auto" and the AWS profile's region is eu-west-1 (aws.region stays us-east-1)."""
    stack = make_stack(sts_region="eu-west-1", vault_namespace="team-a", clusters=("orders",), ssm=False)
    home = Home(stack, tmp_path / "regional")
    aws_config = Path(home.info.aws_config_file)
    text = aws_config.read_text()
    assert f"region = {home.info.region}\nservices" in text
    aws_config.write_text(text.replace(f"region = {home.info.region}\nservices", "region = eu-west-1\nservices", 1))
    home.env.pop("AWS_REGION", None)
    home.env.pop("AWS_DEFAULT_REGION", None)
    config = variant(stack, tmp_path, 'sts_region = "eu-west-1"', 'sts_region = "auto"')
    home.config_file = config
    sign_in(home)
    r = run(home, config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(lines_by_layer(r.stdout).values()) == {"ok"}
    assert stack.dynamic_users() == []
    r = run(home, variant(stack, tmp_path, 'sts_region = "eu-west-1"', 'sts_region = "us-east-1"'))
    assert r.returncode != 0 and lines_by_layer(r.stdout)["vault"] == "FAIL"
    assert "scoped to a valid region" in r.stdout and "vault.sts_region" in r.stdout
