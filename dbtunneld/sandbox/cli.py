"""``dbtunneld sandbox``: bring the sandbox stack up, print how to use it, run until Ctrl-C.

For now it leases one fresh database user per cluster (the real path: role credentials
from moto, Vault AWS IAM login through the aws-auth stand-in, ``database/creds``) and
prints a mysql command for each; the daemon is added on top later.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, TextIO

from .stack import Stack, start_stack, stop_all_stacks

log = logging.getLogger(__name__)

SHORT_TTLS = dict(token_ttl=30, token_max_ttl=120, lease_ttl=20, lease_max_ttl=90)


def lease_users(stack: Stack) -> dict[str, dict[str, Any]]:
    """One fresh leased user per cluster: {cluster: {"username", "password", "lease_id", "ttl"}}."""
    import hvac

    creds = stack.role_credentials()
    vault = hvac.Client(url=stack.vault_addr)
    vault.auth.aws.iam_login(creds["aws_access_key_id"], creds["aws_secret_access_key"],
                             creds["aws_session_token"], header_value=stack.server_id,
                             role=stack.vault_role, region=stack.region)
    out = {}
    for name, cluster in stack.clusters.items():
        lease = vault.secrets.database.generate_credentials(cluster.db_role)
        out[name] = {"username": lease["data"]["username"], "password": lease["data"]["password"],
                     "lease_id": lease["lease_id"], "ttl": lease["lease_duration"]}
    return out


def describe(stack: Stack, users: dict[str, dict[str, Any]], out: TextIO) -> None:
    """Print endpoints, files and the mysql commands (passwords on the terminal only)."""
    i = stack.info
    p = lambda *a: print(*a, file=out)  # noqa: E731
    row = lambda label, text: p(f"  {label:<38}{text}")  # noqa: E731
    p(f"dbtunneld sandbox: up in {stack.started_in:.1f}s (everything under {i.dir})")
    row("Vault (aws auth stand-in -> OpenBao):", f"{i.vault_addr}   OpenBao: {i.bao_addr}")
    row("AWS (moto, SigV4 enforced):", f"{i.aws_endpoint}   account {i.account_id}")
    row("AWS SSO portal (stand-in):", i.sso_start_url)
    if i.ssm_endpoint:
        row("SSM (stand-in):", i.ssm_endpoint)
    row("bastion (sshd):", f"{i.ssh_user}@{i.ssh_host}:{i.ssh_port}  key {i.ssh_key_file}")
    row("bastion instance:", f"{i.bastion_instance_id}  tags {i.bastion_tags}")
    for name, c in i.clusters.items():
        row(f"cluster {name}:", f"MariaDB 127.0.0.1:{c.port}  database {c.database}")
    row("daemon config:", i.config_file)
    row(f"AWS config (profile {i.profile}):", i.aws_config_file)
    p("")
    p(f"Connect with a freshly leased user (lease {stack.ttls.lease_ttl}s, max {stack.ttls.lease_max_ttl}s):")
    for name, u in users.items():
        c = i.clusters[name]
        p(f"  {name}: mysql -h 127.0.0.1 -P {c.port} -u {u['username']} -p {c.database}")
        p(f"  {' ' * len(name)}  password: {u['password']}")
    p("")
    p(f"Use AWS tools on the sandbox: export HOME={i.home} AWS_CONFIG_FILE={i.aws_config_file} "
      f"AWS_PROFILE={i.profile}")
    p("Ctrl-C stops everything.")


def run_sandbox(args: argparse.Namespace, out: TextIO | None = None,
                stop_event: threading.Event | None = None) -> int:
    """Start the stack, print how to use it, wait for Ctrl-C/SIGTERM (or ``stop_event``), tear down."""
    out = out or sys.stdout
    stop = stop_event or threading.Event()
    ttls = SHORT_TTLS if getattr(args, "short_ttl", False) else {}
    restore = _install_stop_handlers(stop) if stop_event is None else {}
    try:
        print("dbtunneld sandbox: starting MariaDB x2, OpenBao, moto, sshd and the stand-ins...", file=out, flush=True)
        with start_stack(**ttls) as stack:
            describe(stack, lease_users(stack), out)
            out.flush()
            while not stop.wait(0.5):
                pass
            print("dbtunneld sandbox: stopping...", file=out, flush=True)
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
        stop_all_stacks()
    print("dbtunneld sandbox: stopped; no process or file left behind.", file=out, flush=True)
    return 0


def _install_stop_handlers(stop: threading.Event) -> dict:
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous
