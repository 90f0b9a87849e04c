"""``dbtunneld sandbox``: bring the sandbox stack up, print how to use it, run until Ctrl-C.

By default it runs the real daemon on the stack (``DemoDaemon``): signed in through the SSO
stand-in, both demo clusters connected on stable ports (13306 and 13307 when free; otherwise it
says which ports it used instead: only the sandbox does that, a real config never moves a port),
``orders`` straight over SSH and ``billing`` through the SSM stand-in (``ssm-ssh``), and the tray
too when there is a display. It prints one ``export`` line for another terminal and the commands
to try (with the path of the ``dbtunneld`` script when it is not on PATH). Ctrl-C stops every
daemon using the sandbox's home (the demo one and any the user restarted by hand; each revokes
the DB users it made), checks that none is left, then tears the stack down.

The sandbox never touches the user's real home: HOME, the XDG folders, DBTUNNELD_HOME and the
AWS config paths point into a private folder for this process and all it starts, and output to
a pipe that closed (``| tee`` ended by the same Ctrl-C) is dropped without a traceback.

With ``--no-daemon`` it only leases one fresh database user per cluster (the real path: role
credentials from moto, Vault AWS IAM login through the aws-auth stand-in, ``database/creds``)
and prints a mysql command for each.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
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
    from ..adapters.vault import VaultClient
    from ..core.config import parse_config

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


def describe(stack: Stack, users: dict[str, dict[str, Any]], out: TextIO, files: bool = True) -> None:
    """Print endpoints, files and the mysql commands (passwords on the terminal only). With
    ``files=False`` (the demo daemon prints its own) no config paths."""
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
    if files:
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
    p(f"Use AWS tools on the sandbox: export HOME={shlex.quote(i.home)} "
      f"AWS_CONFIG_FILE={shlex.quote(i.aws_config_file)} AWS_PROFILE={i.profile}")
    p("Ctrl-C stops everything.")


def run_sandbox(args: argparse.Namespace, out: TextIO | None = None,
                stop_event: threading.Event | None = None) -> int:
    """Start the stack, print how to use it, wait for Ctrl-C/SIGTERM (or ``stop_event``), tear down."""
    out = PipeSafeOutput(out or sys.stdout)
    stop = stop_event or threading.Event()
    ttls = SHORT_TTLS if getattr(args, "short_ttl", False) else {}
    vault = dict(sts_region=getattr(args, "sts_region", "") or "", vault_namespace=getattr(args, "vault_namespace", "") or "")
    restore = _install_stop_handlers(stop) if stop_event is None else {}
    try:
        with private_home() as home:
            print("dbtunneld sandbox: starting MariaDB x2, OpenBao, moto, sshd and the stand-ins...", file=out, flush=True)
            with start_stack(**ttls, **vault) as stack:
                if getattr(args, "no_daemon", False):
                    describe(stack, lease_users(stack), out)
                    out.flush()
                    while not stop.wait(0.5):
                        pass
                    print("dbtunneld sandbox: stopping...", file=out, flush=True)
                else:
                    describe(stack, {}, out, files=False)
                    run_demo_daemon(stack, args, out, stop, home)
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
        stop_all_stacks()
    print("dbtunneld sandbox: stopped; no process or file left behind.", file=out, flush=True)
    return 0


class PipeSafeOutput:
    """The sandbox's stdout: once the reader is gone (``| tee`` ended by the same Ctrl-C), writes
    are dropped and the descriptor points at /dev/null, so teardown goes on and the interpreter's
    last flush raises nothing."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self._stream.write(text)
            except (BrokenPipeError, ValueError):
                self._broke()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._broke()

    def _broke(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)


HOME_VARIABLES = ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME")


@contextlib.contextmanager
def private_home():
    """HOME, XDG folders, DBTUNNELD_HOME and AWS config paths of this process (and all it starts)
    in a private folder, removed afterwards; the environment is restored."""
    saved = dict(os.environ)
    home = Path(tempfile.mkdtemp(prefix="dbtunneld-sandbox-home-"))
    os.environ.update(HOME=str(home), DBTUNNELD_HOME=str(home / "dbtunneld"),
                      AWS_CONFIG_FILE=str(home / ".aws" / "config"),
                      AWS_SHARED_CREDENTIALS_FILE=str(home / ".aws" / "credentials"), DBTUNNELD_KEYRING="memory",
                      **{k: str(home / k.lower()) for k in HOME_VARIABLES})
    try:
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(home, ignore_errors=True)


def _install_stop_handlers(stop: threading.Event) -> dict:
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous


# ---------------------------------------------------------------------------- the daemon on the stack

FIRST_PORT = 13306


def choose_local_ports(names: list[str], first: int = FIRST_PORT) -> tuple[dict[str, int], list[str]]:
    """``first``, ``first + 1``... when free; else a free port, with a note naming who holds the wanted one."""
    from ..adapters.ports import find_holder, port_is_free
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


SSM_CLUSTER = "billing"            # the demo cluster reached through the SSM stand-in


def demo_config_text(info: Any, ssm_cluster: str) -> str:
    """The stack's daemon config with ``ssm_cluster`` on ``transport = "ssm-ssh"`` (the SSM
    stand-in, then SSH to the bastion instance) and the others straight over SSH."""
    from .clientfiles import daemon_config_text

    text = daemon_config_text(info)
    if not (info.ssm_endpoint and info.bastion_instance_id and ssm_cluster in info.clusters):
        return text
    text = text.replace("[bastion]\n", f"[bastion]\ninstance_id = \"{info.bastion_instance_id}\"\n", 1)
    return re.sub(rf'(\[\[clusters\]\]\nname = "{re.escape(ssm_cluster)}"\n)', r'\1transport = "ssm-ssh"\n', text, count=1)


def cli_command() -> str:
    """How to run this installation's CLI from a shell: ``dbtunneld`` when PATH finds this one,
    else the script next to this Python (``.venv/bin/dbtunneld``), else ``python -m dbtunneld``."""
    script = Path(sys.executable).parent / "dbtunneld"
    found = shutil.which("dbtunneld")
    if script.exists() and found and Path(found).resolve() == script.resolve():
        return "dbtunneld"
    if script.exists():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{shlex.quote(sys.executable)} -m dbtunneld"


class DemoDaemon:
    """The real daemon as a process on the stack (``daemonproc.DaemonUnderTest`` under the stack's
    dir), signed in and with every cluster connected; ``close()`` stops it, and every other daemon
    using the sandbox's folders, by pid, bounded."""

    def __init__(self, stack: Stack, first_port: int = FIRST_PORT, homes: tuple[Path, ...] = ()) -> None:
        from .daemonproc import DaemonUnderTest

        self.stack = stack
        self.names = list(stack.clusters)
        self.ports, self.notes = choose_local_ports(self.names, first_port)
        self.d = DaemonUnderTest(stack, Path(stack.dir) / "demo")
        clusters = {n: replace(c, local_port=self.ports[n]) for n, c in stack.clusters.items()}
        self.d.write_config(demo_config_text(replace(self.d.info, clusters=clusters), SSM_CLUSTER))
        self.tray: subprocess.Popen | None = None
        self.stopped_by_hand: list[int] = []     # daemons the user started, stopped by close()
        self.roots = [Path(stack.dir), *homes]   # a daemon whose HOME/DBTUNNELD_HOME is in here is ours

    def start(self) -> None:
        self.d.start()
        self.d.sign_in()
        self.d.cli("connect", "--all")
        self.d.wait_up(self.names)

    def start_tray(self) -> str:
        """Start ``dbtunneld tray`` on this daemon when there is a display; say what happened."""
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin"):
            return "no display: no tray (the commands above do everything the tray does)"
        with open(self.d.root / "tray.stderr", "ab") as err:
            self.tray = subprocess.Popen([sys.executable, "-m", "dbtunneld.ui.cli", "--config", str(self.d.config_path),
                                          "tray"], env=self._tray_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        return f"tray started (pid {self.tray.pid}); its log: {self.d.paths.log_dir / 'tray.log'}"

    def _tray_env(self) -> dict[str, str]:
        """The desktop's variables (display, session bus) with the daemon's home and AWS settings."""
        mine = {k: v for k, v in self.d.env.items() if k.startswith(("AWS_", "DBTUNNELD_")) or k == "HOME"}
        return {**os.environ, **mine}

    def export_line(self) -> str:
        """One line that makes every command (status, creds, doctor, login, a restarted daemon) use
        the sandbox: its DBTUNNELD_HOME, its HOME (AWS SSO cache) and AWS config, memory keyring."""
        i = self.d.info
        env = {"DBTUNNELD_HOME": str(self.d.dbt_home), "HOME": i.home, "AWS_CONFIG_FILE": i.aws_config_file,
               "AWS_SHARED_CREDENTIALS_FILE": str(Path(i.home) / ".aws" / "credentials"),
               "AWS_PROFILE": i.profile, "DBTUNNELD_KEYRING": "memory"}
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())

    def describe(self, out: TextIO) -> None:
        p = lambda *a: print(*a, file=out)  # noqa: E731
        st = self.d.status()
        who = (st.get("aws") or {}).get("identity", "")
        via = {t["name"]: t.get("transport", "") for t in st.get("tunnels", [])}
        p(f"dbtunneld daemon: pid {self.d.pid}, signed in{f' as {who}' if who else ''} (SSO stand-in, auto-approved)")
        for note in self.notes:
            p(f"  note: {note}")
        for name in self.names:
            c = self.d.client.request("creds", name=name)
            how = "SSM stand-in, then SSH" if via.get(name) == "ssm-ssh" else "SSH to the bastion"
            p(f"  {name:<8} 127.0.0.1:{c['port']}  {via.get(name, ''):<8} ({how})  user {c['username']}")
        p(f"  config: {self.d.config_path}")
        p(f"  AWS config: {self.d.info.aws_config_file} (profile {self.d.info.profile})   log: {self.d.paths.log_file}")
        p("")
        cmd = cli_command()
        p("In another terminal, first (the sandbox's own HOME and files; your real home is not used):")
        p(f"  {self.export_line()}")
        p("then:")
        p(f"  {cmd} status")
        p(f"  {cmd} doctor")
        for name in self.names:
            c = self.d.client.request("creds", name=name)
            p(f"  {cmd} creds {name}            # username, mysql command, URL, JDBC URL")
            p(f"  {c['mysql']}     # password: {cmd} creds {name} --field password")
            p(f"  Sequel Ace / mysql URL: {c['url']}   (password: {cmd} creds {name} --copy)")

    def close(self) -> list[str]:
        """Stop the tray, the demo daemon and any other daemon using the sandbox's folders (by
        pid); return the DB users left in MariaDB (none expected)."""
        from .leftovers import sandbox_daemons, stop_daemon

        if self.tray is not None and self.tray.poll() is None:
            self.tray.terminate()
            try:
                self.tray.wait(10)
            except subprocess.TimeoutExpired:
                self.tray.kill()
                self.tray.wait(5)
        self.d.close()
        for pid, paths in sandbox_daemons(self.roots, [self.d.paths]).items():
            stop_daemon(pid, paths)
            self.stopped_by_hand.append(pid)
        return self.stack.dynamic_users()

    def left_running(self) -> list[int]:
        from .leftovers import sandbox_daemons

        return sorted(sandbox_daemons(self.roots, [self.d.paths]))


def run_demo_daemon(stack: Stack, args: argparse.Namespace, out: TextIO, stop: threading.Event,
                    home: Path | None = None) -> None:
    """Run the daemon (and the tray) on the stack until ``stop``; tear them down leaving no DB user.
    ``home``: the sandbox process's private home (daemons using it are stopped too)."""
    print("dbtunneld sandbox: starting the daemon, signing in, connecting both clusters...", file=out, flush=True)
    demo = DemoDaemon(stack, getattr(args, "base_port", None) or FIRST_PORT, homes=(home,) if home else ())
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
    if demo.stopped_by_hand:
        print(f"dbtunneld sandbox: also stopped daemon(s) started by hand: pid "
              f"{', '.join(map(str, demo.stopped_by_hand))}", file=out, flush=True)
    running = demo.left_running()
    if running:
        print(f"dbtunneld sandbox: warning: daemons still running: pid {', '.join(map(str, running))}", file=out, flush=True)
    if left:
        print(f"dbtunneld sandbox: warning: DB users left behind: {', '.join(left)}", file=out, flush=True)
    else:
        print("dbtunneld sandbox: the daemon revoked every DB user it made.", file=out, flush=True)
