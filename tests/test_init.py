"""`dbtunneld init` on the sandbox: from no config to a mariadb query with only init's answers.

The CLI runs as the user runs it (a subprocess, answers on stdin); the AWS sign-in goes through
the SSO stand-in, Vault is the real OpenBao behind the aws-auth stand-in, RDS and EC2 are moto,
and the tunnel is an SSM port session (the stand-in agent resolves moto's Aurora names like the
VPC's DNS would). The daemon gets free ports only.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dbtunneld.core.config import parse_config
from dbtunneld.core.errors import NeedsUserError
from dbtunneld.sandbox.daemonproc import DaemonUnderTest
from dbtunneld.ui.onboarding.plan import ClusterPlan, InitPlan, PortProposer, VaultPlan, BastionPlan
from dbtunneld.ui.onboarding.prompt import Prompter
from dbtunneld.ui.onboarding.render import merge_into, render_new


def _init(d: DaemonUnderTest, answers: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`dbtunneld init --no-browser` with ``answers`` on stdin, the SSO stand-in approving."""
    d.stack.sso.auto_approve(True)
    try:
        return subprocess.run([sys.executable, "-m", "dbtunneld.ui.cli", "init", "--no-browser"], env=d.env,
                              input="\n".join(answers) + "\n", capture_output=True, text=True, timeout=timeout)
    finally:
        d.stack.sso.auto_approve(False)


def _first_answers(stack) -> list[str]:
    return ["sandbox", "",                                     # profile, region (the profile's)
            stack.vault_addr, stack.vault_role, stack.server_id, stack.auth_mount, "",   # Vault
            "ssm-port-forward", "",                            # transport, bastion (the tagged one)
            "all",                                             # clusters
            "", "",                                            # billing: role (from its tag), port
            "", ""]                                            # orders: role, port


def _mariadb_query(port: int, creds: dict, sql: str, tmp: Path) -> str:
    """Run ``sql`` with the mariadb CLI (password in a 0600 option file, never in argv)."""
    opt = tmp / "client.cnf"
    opt.touch(mode=0o600)
    opt.write_text(f"[client]\npassword={creds['password']}\n")
    proc = subprocess.run(["mariadb", f"--defaults-extra-file={opt}", "-h", "127.0.0.1", "-P", str(port),
                           "-u", creds["username"], "-N", "-B", "-e", sql], capture_output=True, text=True, timeout=30)
    opt.unlink()
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_init_from_empty_config_to_a_mariadb_query(stack, tmp_path):
    with DaemonUnderTest(stack, tmp_path) as d:
        d.config_path.unlink()
        proc = _init(d, _first_answers(stack))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert "Vault refused to list database/roles (403)" in out          # the sandbox policy has no list
        assert "SSM DescribeInstanceInformation failed" not in out          # the stand-in answers it
        assert f"{stack.bastion_instance_id} dbtunneld-bastion (SSM: Online)" in out
        check = d.cli("config", "check", str(d.config_path))
        assert "ok (2 clusters)" in check.stdout
        doc = tomllib.loads(d.config_path.read_text())
        orders = next(c for c in doc["clusters"] if c["name"] == "orders")
        assert orders["endpoint"] == stack.clusters["orders"].rds_endpoint
        assert orders["db_role"] == "orders-ro"                            # from the RDS tag
        assert doc["bastion"] == {"transport": "ssm-port-forward", "tags": {"dbtunneld:role": "bastion"}}
        assert (d.config_path.stat().st_mode & 0o777) == 0o600
        d.start()
        d.cli("connect", "orders", "--wait", "60", timeout=120)
        port = d.local_port("orders")
        assert port == orders["local_port"]
        table = stack.clusters["orders"].table
        count = _mariadb_query(port, d.creds("orders"), f"SELECT COUNT(*) FROM {stack.clusters['orders'].database}.{table}", tmp_path)
        assert int(count) > 0


def test_init_again_merges_keeping_ports_and_edits(stack, tmp_path):
    with DaemonUnderTest(stack, tmp_path) as d:
        d.config_path.unlink()
        answers = _first_answers(stack)
        answers[9] = "2"                                       # only orders the first time
        assert _init(d, answers[:12]).returncode == 0
        text = d.config_path.read_text()
        orders_port = tomllib.loads(text)["clusters"][0]["local_port"]
        edited = text.replace("[vault]", "# my note: keep this\n[vault]").replace(
            f"local_port = {orders_port}", f"local_port = {orders_port}\nautoconnect = true")
        d.config_path.write_text(edited)
        proc = _init(d, ["all", "", ""])                       # profile and Vault come from the file
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "cluster orders: already in the config" in proc.stdout
        merged = d.config_path.read_text()
        assert merged.startswith(edited.rstrip("\n"))           # every edit and comment kept
        clusters = {c["name"]: c for c in tomllib.loads(merged)["clusters"]}
        assert clusters["orders"]["local_port"] == orders_port and clusters["orders"]["autoconnect"] is True
        assert clusters["billing"]["local_port"] != orders_port
        assert "ok (2 clusters)" in d.cli("config", "check", str(d.config_path)).stdout


def test_init_lists_vault_roles_when_the_policy_allows(stack, tmp_path):
    from dbtunneld.sandbox.openbao import POLICY_HCL, POLICY_NAME

    bao = stack.root_vault()
    bao.write(f"sys/policies/acl/{POLICY_NAME}", {"policy": POLICY_HCL + '\npath "database/roles" { capabilities = ["list"] }\n'})
    try:
        with DaemonUnderTest(stack, tmp_path) as d:
            d.config_path.unlink()
            answers = _first_answers(stack)[:10] + ["", "", "", ""]
            proc = _init(d, answers)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Vault database roles you may read: billing-ro, billing-rw, orders-ro, orders-rw" in proc.stdout
        doc = tomllib.loads(d.config_path.read_text())
        assert {c["name"]: c["db_role"] for c in doc["clusters"]} == {"billing": "billing-ro", "orders": "orders-ro"}
    finally:
        bao.write(f"sys/policies/acl/{POLICY_NAME}", {"policy": POLICY_HCL})


def test_init_picks_the_online_bastion_and_skips_a_connection_lost_one(stack, tmp_path):
    """SSM's PingStatus decides: the tagged bastion's agent lost its connection, the standby's is
    Online, so init offers only the standby and pins it by instance id."""
    from test_ssm_inventory import set_ping

    seed = json.loads(stack.seed_file.read_text())
    bastion, standby = seed["bastion_instance_id"], seed["standby_instance_id"]
    set_ping(stack, bastion, "ConnectionLost")
    set_ping(stack, standby, "Online")
    try:
        with DaemonUnderTest(stack, tmp_path) as d:
            d.config_path.unlink()
            proc = _init(d, _first_answers(stack))
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert f"bastion {bastion} dbtunneld-bastion: skipped, its SSM agent is ConnectionLost" in proc.stdout
            assert f"1) {standby} dbtunneld-bastion-standby (SSM: Online)" in proc.stdout
            assert f"2) {bastion}" not in proc.stdout
            doc = tomllib.loads(d.config_path.read_text())
            assert doc["bastion"] == {"transport": "ssm-port-forward", "instance_id": standby}
            assert "ok (2 clusters)" in d.cli("config", "check", str(d.config_path)).stdout
    finally:
        set_ping(stack, bastion, "Online")
        set_ping(stack, standby, "")


# ---- pure parts


def test_port_proposer_skips_claimed_and_busy_ports_and_honours_a_free_tag():
    busy = {13306}
    p = PortProposer((13306, 13310), claimed={13307}, is_free=lambda port: port not in busy)
    assert p.propose() == 13308
    assert p.propose(13310) == 13310          # the team's tag port, free
    assert p.propose(13306) == 13309          # tag port busy: next free one
    with pytest.raises(ValueError, match="widen tunnels.port_range"):
        p.propose()


def _plan() -> InitPlan:
    return InitPlan("dev", "eu-west-1", VaultPlan("https://vault.example.com", "dev", "vault.example.com"),
                    BastionPlan("ssm-ssh", tags={"dbtunneld:role": "bastion"}, user="ec2-user"),
                    [ClusterPlan("orders", "orders.cluster-x.eu-west-1.rds.amazonaws.com", 3306, "orders-ro", 13306)])


def test_rendered_config_is_commented_and_valid():
    text = render_new(_plan())
    assert text.count("\n# ") >= 4
    cfg = parse_config(text)
    assert cfg.clusters[0].local_port == 13306 and cfg.bastion.tags == {"dbtunneld:role": "bastion"}


def test_merge_adds_only_new_clusters_and_missing_sections():
    existing = '[vault]\naddress = "https://v.example.com"\nrole = "mine"\n\n[[clusters]]\nname = "o2"\n' \
               'endpoint = "orders.cluster-x.eu-west-1.rds.amazonaws.com"\nlocal_port = 14000\ndb_role = "x"\n'
    plan = _plan()
    plan.clusters.append(ClusterPlan("billing", "billing.cluster-y.eu-west-1.rds.amazonaws.com", 3306, "b", 13307))
    text, added = merge_into(existing, tomllib.loads(existing), plan)
    assert added == ["billing"]                        # orders is there under another name (same endpoint)
    cfg = parse_config(text)
    assert cfg.vault.role == "mine" and cfg.aws.profile == "dev"
    assert [c.name for c in cfg.clusters] == ["o2", "billing"]


def test_prompt_reads_answers_defaults_and_names_the_question_at_eof():
    out = io.StringIO()
    ui = Prompter(io.StringIO("\n2\nx\n").readline, out)
    assert ui.ask("Region", "eu-west-1") == "eu-west-1"
    assert ui.choose("Profile", ["a", "b"]) == 1
    assert ui.ask("Name") == "x"
    with pytest.raises(NeedsUserError, match="'Vault address'"):
        ui.ask("Vault address")
