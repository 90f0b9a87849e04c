"""``dbtunneld sandbox``: bring the sandbox stack up, print how to use it, run until Ctrl-C.

By default it runs the real daemon on the stack (``DemoDaemon``): signed in through the SSO
stand-in, both demo clusters connected on stable ports (13306 and 13307 when free; otherwise it
says which ports it used instead: only the sandbox does that, a real config never moves a port),
and the tray too when there is a display. It prints how to connect (mysql command, Sequel Ace
URL, ``dbtunneld creds``). Ctrl-C stops the daemon (which revokes every DB user it made), checks
that none is left, then tears the stack down.

With ``--no-daemon`` it only leases one fresh database user per cluster (the real path: role
credentials from moto, Vault AWS IAM login through the aws-auth stand-in, ``database/creds``)
and prints a mysql command for each.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from .stack import Stack, start_stack, stop_all_stacks

log = logging.getLogger(__name__)

SHORT_TTLS = dict(token_ttl=30, token_max_ttl=120, lease_ttl=20, lease_max_ttl=90)


def lease_users(stack: Stack) -> dict[str, dict[str, Any]]:
    """One fresh leased user per cluster: {cluster: {"username", "password", "lease_id", "ttl"}},
    through dbtunneld's own Vault client and the stack's daemon config (STS region, namespace)."""
    from ..config import parse_config
    from ..vault import VaultClient

    creds = stack.role_credentials()
    vault = VaultClient(parse_config(stack.daemon_config()).vault)  # its token dies with the stack
    vault.login_aws_iam(creds["aws_access_key_id"], creds["aws_secret_access_key"], creds["aws_session_token"])
    out = {}
    for name, cluster in stack.clusters.items():
        lease = vault.database_creds(cluster.db_role)
        out[name] = {"username": lease.username, "password": lease.password,
                     "lease_id": lease.lease_id, "ttl": int(lease.duration)}
    vault.close()
    return out


def describe(stack: Stack, users: dict[str, dict[str, Any]], out: TextIO) -> None:
    """Print endpoints, files and the mysql commands (passwords on the terminal only)."""
    i = stack.info
    p = lambda *a: print(*a, file=out)  # noqa: E731
    row = lambda label, text: p(f"  {label:<38}{text}")  # noqa: E731
    p(f"dbtunneld sandbox: up in {stack.started_in:.1f}s (everything under {i.dir})")
    row("Vault (aws auth stand-in -> OpenBao):", f"{i.vault_addr}   OpenBao: {i.bao_addr}")
    if i.sts_region or i.vault_namespace:
        row("Vault aws auth set up with:", f"STS {i.sts_endpoint or i.sts_region or 'global'}"
            f"   namespace {i.vault_namespace or '(root)'}")
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
    if not users:
        return
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
    vault = dict(sts_region=getattr(args, "sts_region", "") or "", vault_namespace=getattr(args, "vault_namespace", "") or "")
    restore = _install_stop_handlers(stop) if stop_event is None else {}
    try:
        print("dbtunneld sandbox: starting MariaDB x2, OpenBao, moto, sshd and the stand-ins...", file=out, flush=True)
        with start_stack(**ttls, **vault) as stack:
            if getattr(args, "no_daemon", False):
                describe(stack, lease_users(stack), out)
                out.flush()
                while not stop.wait(0.5):
                    pass
                print("dbtunneld sandbox: stopping...", file=out, flush=True)
            else:
                describe(stack, {}, out)
                run_demo_daemon(stack, args, out, stop)
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


# ---------------------------------------------------------------------------- the daemon on the stack

FIRST_PORT = 13306


def choose_local_ports(names: list[str], first: int = FIRST_PORT) -> tuple[dict[str, int], list[str]]:
    """``first``, ``first + 1``... when free; else a free port, with a note naming who holds the wanted one."""
    from ..ports import find_holder, port_is_free
    from .procs import free_port

    chosen: dict[str, int] = {}
    notes: list[str] = []
    for i, name in enumerate(names):
        want = first + i
        if port_is_free(want):
            chosen[name] = want
            continue
        chosen[name] = free_port()
        holder = find_holder(want)
        notes.append(f"127.0.0.1:{want} is in use{f' by {holder}' if holder else ''}: {name} uses "
                     f"127.0.0.1:{chosen[name]} instead (only the sandbox does this; a real config never moves a port)")
    return chosen, notes


class DemoDaemon:
    """The real daemon as a process on the stack (``daemonproc.DaemonUnderTest`` under the stack's
    dir), signed in and with every cluster connected; ``close()`` stops it by pid, bounded."""

    def __init__(self, stack: Stack, first_port: int = FIRST_PORT) -> None:
        from .clientfiles import daemon_config_text
        from .daemonproc import DaemonUnderTest

        self.stack = stack
        self.names = list(stack.clusters)
        self.ports, self.notes = choose_local_ports(self.names, first_port)
        self.d = DaemonUnderTest(stack, Path(stack.dir) / "demo")
        clusters = {n: replace(c, local_port=self.ports[n]) for n, c in stack.clusters.items()}
        self.d.write_config(daemon_config_text(replace(self.d.info, clusters=clusters)))
        self.tray: subprocess.Popen | None = None

    def start(self) -> None:
        self.d.start()
        self.d.sign_in()
        self.d.cli("connect", "--all")
        self.d.wait_up(self.names)

    def start_tray(self) -> str:
        """Start ``dbtunneld tray`` on this daemon when there is a display; say what happened."""
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin"):
            return "no display: no tray (the CLI below does everything the tray does)"
        env = dict(os.environ, DBTUNNELD_HOME=str(self.d.dbt_home), DBTUNNELD_KEYRING="memory")
        with open(self.d.root / "tray.stderr", "ab") as err:
            self.tray = subprocess.Popen([sys.executable, "-m", "dbtunneld.cli", "--config", str(self.d.config_path),
                                          "tray"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        return f"tray started (pid {self.tray.pid}); its log: {self.d.paths.log_dir / 'tray.log'}"

    def describe(self, out: TextIO) -> None:
        p = lambda *a: print(*a, file=out)  # noqa: E731
        st = self.d.status()
        who = (st.get("aws") or {}).get("identity", "")
        p(f"dbtunneld daemon: pid {self.d.pid}, signed in{f' as {who}' if who else ''} (SSO stand-in, auto-approved)")
        for note in self.notes:
            p(f"  note: {note}")
        for name in self.names:
            c = self.d.client.request("creds", name=name)
            p(f"  {name:<8} 127.0.0.1:{c['port']}  user {c['username']}  (renewed while connected)")
        p("")
        p("In another terminal:")
        p(f"  export DBTUNNELD_HOME={self.d.dbt_home}")
        p("  dbtunneld status")
        for name in self.names:
            c = self.d.client.request("creds", name=name)
            p(f"  dbtunneld creds {name}            # username, mysql command, URL, JDBC URL")
            p(f"  {c['mysql']}     # password: dbtunneld creds {name} --field password")
            p(f"  Sequel Ace / mysql URL: {c['url']}   (password: dbtunneld creds {name} --copy)")
        p(f"Daemon config: {self.d.config_path}   log: {self.d.paths.log_file}")

    def close(self) -> list[str]:
        """Stop the tray and the daemon (by pid); return the DB users left in MariaDB (none expected)."""
        if self.tray is not None and self.tray.poll() is None:
            self.tray.terminate()
            try:
                self.tray.wait(10)
            except subprocess.TimeoutExpired:
                self.tray.kill()
                self.tray.wait(5)
        self.d.close()
        return self.stack.dynamic_users()


def run_demo_daemon(stack: Stack, args: argparse.Namespace, out: TextIO, stop: threading.Event) -> None:
    """Run the daemon (and the tray) on the stack until ``stop``; tear them down leaving no DB user."""
    print("dbtunneld sandbox: starting the daemon, signing in, connecting both clusters...", file=out, flush=True)
    demo = DemoDaemon(stack, getattr(args, "base_port", None) or FIRST_PORT)
    try:
        demo.start()
        demo.describe(out)
        if not getattr(args, "no_tray", False):
            print(demo.start_tray(), file=out)
        print("Ctrl-C stops the daemon (revoking every DB user it made), then the stack.", file=out, flush=True)
        while not stop.wait(0.5):
            pass
        print("dbtunneld sandbox: stopping the daemon...", file=out, flush=True)
    finally:
        left = demo.close()
    if left:
        print(f"dbtunneld sandbox: warning: DB users left behind: {', '.join(left)}", file=out, flush=True)
    else:
        print("dbtunneld sandbox: the daemon revoked every DB user it made.", file=out, flush=True)
