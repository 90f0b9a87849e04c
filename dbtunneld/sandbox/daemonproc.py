"""A dbtunneld daemon as a real process on a sandbox stack, driven the way a user drives it.

Used by the fault suite (tests/test_faults.py) and the benchmarks (bench/): the whole daemon
end to end, not its parts in-process.

``DaemonUnderTest(stack, root)`` keeps everything under ``root``: a private HOME holding its own
copy of the stack's AWS config (so its SSO sign-in and token cache are its own) and a private
DBTUNNELD_HOME with a config written from the stack (``config_text``: fresh free local ports,
optional extra clusters, transport and ``[tunnels]``/``[credentials]`` settings). Secrets stay in
memory (``DBTUNNELD_KEYRING=memory``). ``cli(...)`` runs ``python -m dbtunneld.ui.cli``;
``start()`` spawns ``dbtunneld daemon`` and waits (bounded) until its control socket answers;
``sign_in()`` runs ``dbtunneld login`` with the SSO stand-in approving; ``client`` talks to the
control socket; ``stop()`` asks it to stop and waits by pid (SIGKILL at the end of the bound);
``kill()`` is a crash. Every pid it starts or adopts is kept in ``pids`` (the secret scan reads
their command lines), and ``close()`` stops every one of them.

Example::

    with DaemonUnderTest(stack, tmp_path) as d:
        d.start(); d.sign_in()
        d.cli("connect", "orders")
        port = d.local_port("orders")
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from .clientfiles import aws_config_text, client_env, daemon_config_text
from .procs import free_port, pid_alive, wait_until

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_live: "weakref.WeakSet[DaemonUnderTest]" = weakref.WeakSet()


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class DaemonOptions:
    """What the daemon's config says beyond the stack's defaults."""

    clusters: tuple[str, ...] | None = None     # stack clusters to include (default: all)
    copies: int = 0                             # extra clusters "<first>-<i>" on the first cluster's DB
    transport: str = "ssh"                      # ssh | ssm-ssh | ssm-port-forward
    tunnels: dict[str, Any] | None = None       # [tunnels] keys
    credentials: dict[str, Any] | None = None   # [credentials] keys
    autoconnect: bool = False
    vault_address: str = ""                     # e.g. a proxy in front of the stack's Vault


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _section(name: str, keys: dict[str, Any] | None) -> str:
    if not keys:
        return ""
    return f"\n[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())


def config_text(info: Any, options: DaemonOptions = DaemonOptions()) -> str:
    """A daemon config for the stack described by ``info`` (a ``StackInfo``), on fresh ports."""
    names = options.clusters or tuple(info.clusters)
    clusters = {n: replace(info.clusters[n], local_port=free_port()) for n in names}
    first = info.clusters[names[0]]
    for i in range(1, options.copies + 1):
        clusters[f"{first.name}-{i}"] = replace(first, name=f"{first.name}-{i}", local_port=free_port())
    text = daemon_config_text(replace(info, clusters=clusters))
    text = _with_transport(text, info, options.transport)
    if options.vault_address:
        text = text.replace(f'address = "{info.vault_addr}"', f'address = "{options.vault_address}"', 1)
    if options.autoconnect:
        text = text.replace("[[clusters]]\n", "[[clusters]]\nautoconnect = true\n")
    head, sep, tail = text.partition("[[clusters]]")
    extra = _section("tunnels", options.tunnels) + _section("credentials", options.credentials)
    return head + extra.lstrip("\n") + ("\n" if extra else "") + sep + tail


def _with_transport(text: str, info: Any, transport: str) -> str:
    if transport == "ssh":
        return text
    if not info.bastion_instance_id:
        raise ValueError(f"transport {transport} needs the stack's AWS part (a bastion instance id)")
    bastion = (f'transport = "{transport}"\ninstance_id = "{info.bastion_instance_id}"\n'
               f'port = {info.ssh_port}\n')
    text = re.sub(r'transport = "ssh"\nhost = "[^"]*"\nport = \d+\n', bastion, text, count=1)
    return text


# ---------------------------------------------------------------------------- /proc figures

@dataclass(frozen=True)
class ProcSample:
    """CPU seconds used so far, resident memory and threads of one process."""

    at: float
    cpu_seconds: float
    rss_kib: int
    threads: int
    context_switches: int            # voluntary + involuntary, summed over its threads


def sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return ProcSample(time.monotonic(), cpu, rss, threads, _switches(pid))


def _switches(pid: int) -> int:
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(n) for n in re.findall(r"ctxt_switches:\s+(\d+)", text))
    return total


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


# ---------------------------------------------------------------------------- the daemon

class DaemonStartError(RuntimeError):
    pass


class CliError(RuntimeError):
    """A ``dbtunneld`` command exited non-zero (the message has its output)."""


class DaemonUnderTest:
    """One daemon process on a stack, with a private home (see the module docstring)."""

    def __init__(self, stack: Any, root: Path, options: DaemonOptions = DaemonOptions(),
                 env: dict[str, str] | None = None) -> None:
        from ..core.paths import default_paths

        self.stack = stack
        self.root = Path(root)
        self.home = self.root / "home"
        self.dbt_home = self.root / "dbtunneld"
        self.paths = default_paths({"DBTUNNELD_HOME": str(self.dbt_home)})
        self.config_path = self.paths.config_file
        self.options = options
        self.pids: list[int] = []
        self.commands: list[str] = []              # command lines of the CLI runs
        self.outputs: list[str] = []               # what those runs printed (stdout + stderr)
        self.proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._prepare_home()
        self.write_config(config_text(stack.info, options))
        self.env = self._env(env or {})
        _live.add(self)

    # -- files and environment

    def _prepare_home(self) -> None:
        (self.home / ".aws").mkdir(parents=True, exist_ok=True, mode=0o700)
        info = replace(self.stack.info, home=str(self.home), aws_config_file=str(self.home / ".aws" / "config"),
                       dbtunneld_home=str(self.dbt_home))
        self.info = info
        (self.home / ".aws" / "config").write_text(aws_config_text(info))
        self.dbt_home.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "VAULT_", "BAO_", "DBTUNNELD_", "DBUS_", "XDG_"))}
        env.update(client_env(self.info))
        env.pop("VAULT_ADDR", None)
        env.update(DBTUNNELD_KEYRING="memory", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def write_config(self, text: str) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.config_path.write_text(text)
        self.config = text

    def cluster_names(self) -> list[str]:
        return re.findall(r'^name = "([^"]+)"', self.config, flags=re.M)

    def configured_port(self, name: str) -> int:
        block = self.config.split(f'name = "{name}"', 1)[1]
        return int(re.search(r"local_port = (\d+)", block).group(1))

    # -- running commands

    def cli(self, *args: str, timeout: float = 90.0, check: bool = True) -> subprocess.CompletedProcess:
        """``dbtunneld ARGS`` as the user would run it (text output captured)."""
        argv = [sys.executable, "-m", "dbtunneld.ui.cli", *args]
        self.commands.append(" ".join(argv))
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        self.outputs.append(proc.stdout + proc.stderr)
        self.adopt()
        if check and proc.returncode != 0:
            raise CliError(f"`dbtunneld {' '.join(args)}` exited {proc.returncode}: "
                           f"{(proc.stdout + proc.stderr).strip()[-800:]}")
        return proc

    @property
    def client(self):
        from ..process.client import Client

        return Client(self.paths.socket_path, timeout=30.0)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.client.request("status", timeout=timeout)

    def tunnel(self, name: str) -> dict[str, Any]:
        return next(t for t in self.status()["tunnels"] if t["name"] == name)

    def local_port(self, name: str) -> int:
        return int(self.tunnel(name)["local_port"])

    def password(self, name: str) -> str:
        return self.client.request("creds", name=name, field="password")["password"]

    def creds(self, name: str) -> dict[str, Any]:
        return self.client.request("creds", name=name, field="password")

    # -- lifecycle

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self, timeout: float = 40.0, launcher: list[str] | None = None) -> "DaemonUnderTest":
        """Spawn ``dbtunneld daemon`` and wait until its control socket answers. ``launcher``
        replaces ``python -m dbtunneld.ui.cli`` (e.g. a wrapper that also reports counters)."""
        argv = (launcher or [sys.executable, "-m", "dbtunneld.ui.cli"]) + [
            "--config", str(self.config_path), "daemon", "--background"]
        self.commands.append(" ".join(argv))
        with open(self.root / "daemon.stderr", "ab") as err:
            self.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        self._pid = self.proc.pid
        self.pids.append(self.proc.pid)
        if not wait_until(self._answers, timeout, alive=lambda: self.proc.poll() is None):
            raise DaemonStartError(f"the daemon did not answer within {timeout:g} s "
                                   f"(exit {self.proc.poll()}): {self.stderr_tail()}")
        return self

    def _answers(self) -> bool:
        try:
            return self.client.ping(timeout=2.0)
        except Exception:
            return False

    def adopt(self) -> int | None:
        """Record the pid of a daemon the CLI started (``dbtunneld connect`` starts one)."""
        if not self.paths.socket_path.exists():
            return None
        try:
            pid = int(self.status(timeout=5.0)["pid"])
        except Exception:
            return None
        if pid not in self.pids:
            self.pids.append(pid)
        self._pid = pid
        return pid

    def sign_in(self, timeout: float = 60.0) -> None:
        """AWS SSO sign-in through ``dbtunneld login`` (the stand-in approves the code at once)."""
        self.stack.sso.auto_approve(True)
        try:
            self.cli("login", "--no-browser", "--wait", str(timeout), timeout=timeout + 30)
        finally:
            self.stack.sso.auto_approve(False)
        self.wait_for(lambda st: all((st.get(k) or {}).get("state") == "valid" for k in ("aws", "vault")),
                      timeout, "AWS and Vault credentials after the sign-in")

    def wait_for(self, check: Callable[[dict[str, Any]], bool], timeout: float, what: str = "status") -> dict[str, Any]:
        """Poll the status until ``check(status)``; return that status (AssertionError on timeout)."""
        last: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while True:
            try:
                last = self.status(timeout=5.0)
                if check(last):
                    return last
            except Exception as exc:          # a daemon busy restarting: keep polling
                last = {"error": repr(exc)}
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last status: {_brief(last)}")
            time.sleep(0.05)

    def wait_up(self, names: Iterable[str], timeout: float = 60.0) -> dict[str, Any]:
        names = set(names)
        return self.wait_for(lambda st: names <= {t["name"] for t in st.get("tunnels", [])
                                                  if t["state"] == "up" and t.get("username")},
                             timeout, f"tunnels {sorted(names)} up")

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the daemon to stop, wait by pid; SIGKILL at the end of the bound. True: clean."""
        pid = self._pid
        if pid is None or not pid_alive(pid):
            return True
        try:
            self.client.request("stop", timeout=5.0)
        except Exception:
            _signal(pid, signal.SIGTERM)
        clean = self._wait_gone(pid, timeout)
        if not clean:
            _signal(pid, signal.SIGKILL)
            self._wait_gone(pid, 5.0)
        return clean

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The crash: signal the daemon and wait until it is gone."""
        pid = self._pid
        if pid is not None:
            _signal(pid, sig)
            self._wait_gone(pid, 10.0)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        if self.proc is not None and self.proc.pid == pid:
            try:
                self.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return wait_until(lambda: not pid_alive(pid), timeout)

    def close(self) -> None:
        """Stop every process this harness started or adopted (by pid), whatever happened."""
        try:
            self.stop(timeout=20.0)
        finally:
            for pid in self.pids:
                if pid_alive(pid):
                    _signal(pid, signal.SIGKILL)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.wait(5)

    def __enter__(self) -> "DaemonUnderTest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- what it left behind

    def log_text(self) -> str:
        texts = []
        for path in sorted(self.paths.log_dir.glob("*")) + [self.root / "daemon.stderr"]:
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def stderr_tail(self, lines: int = 15) -> str:
        text = self.log_text()
        return "\n".join(text.strip().splitlines()[-lines:])

    def sso_cache_file(self) -> Path:
        """Where the AWS CLI v2 / botocore SSO token cache of this daemon's HOME lives."""
        import hashlib

        digest = hashlib.sha1(self.info.sso_session_name.encode()).hexdigest()
        return self.home / ".aws" / "sso" / "cache" / f"{digest}.json"

    def state_files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file() and ".aws" not in p.parts]


def kill_all_daemons() -> None:
    """SIGKILL every daemon a harness of this process started or adopted (atexit: a test run that
    ends while a case still runs in a thread leaves no daemon behind)."""
    for d in list(_live):
        for pid in d.pids:
            if pid_alive(pid):
                _signal(pid, signal.SIGKILL)


atexit.register(kill_all_daemons)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _brief(status: dict[str, Any]) -> str:
    if "tunnels" not in status:
        return str(status)[:400]
    tunnels = ", ".join(f"{t['name']}={t['state']}" + (f" ({t['last_error'][:120]})" if t.get("last_error") else "")
                        for t in status["tunnels"])
    creds = " ".join(f"{k}={status[k]['state']}" + (f" ({status[k].get('last_error', '')[:120]})"
                                                    if status[k].get("last_error") else "")
                     for k in ("aws", "vault") if status.get(k))
    return f"{creds}; {tunnels}"
