"""The sandbox stack: every server the product talks to, real or stand-in, on loopback.

``start_stack()`` is a context manager that starts, in parallel and on free ports, under
one private temp dir:

- two MariaDB instances ("clusters" ``orders`` and ``billing``) with sample data,
- an OpenBao dev server with the database secrets engine, policy and JWT mount,
- a moto server (STS/IAM/EC2/RDS) seeded then switched to SigV4 + IAM enforcement,
- the aws-auth stand-in in front of OpenBao (``vault_addr`` points at it),
- the SSO portal/OIDC stand-in,
- OpenSSH sshd as a forwarding-only bastion,
- the SSM stand-in (``dbtunneld.sandbox.ssm_standin``, another part of the sandbox)
  when its module exists (``ssm=False`` skips it),

and yields a ``Stack``: ``stack.info`` (a ``StackInfo``: every address, port, key path and
credential; ``stack.<field>`` reads it too), the services (``stack.sshd``, ``stack.openbao``,
``stack.vault_front``, ``stack.moto``, ``stack.sso``, ``stack.ssm``, ``stack.mariadb[name]``)
with their fault methods (``kill``, ``freeze``/``thaw``, ``stop``/``start``, ``restart``),
and helpers (``env()``, ``dynamic_users()``, ``root_vault()``, ``role_credentials()``).
The services are defined in ``stack_services``; the client files written from ``clientfiles``.
Teardown stops every process by pid and removes the temp dir; a service that fails to
start makes the whole start fail with that service's log tail (``StartError``).

Example::

    with start_stack(lease_ttl=5, token_ttl=10) as stack:
        print(stack.vault_addr, stack.clusters["orders"].port)
        stack.sshd.kill()      # the bastion crashes
        stack.sshd.start()     # and comes back on the same port
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from . import relay
from .clientfiles import write_client_files
from .guard import DIR_PREFIX, install_signal_guard, live_stacks, stop_all_stacks, sweep_stale_stacks
from .info import REGION, SSO_SESSION, SSO_USER, ClusterInfo, StackInfo
from .mariadb import MariaDB, install_datadir
from .moto_launcher import ACCOUNT_ID, DEVELOPER_ROLE, UNBOUND_ROLE
from .openbao import BaoAdmin, OpenBao, Ttls
from .procs import Service, ServiceError, StartError, free_port, stop_all
from .sshd import Bastion
from .stack_services import StackServices
from .standins import SsoStandin, VaultFront

__all__ = ["ClusterInfo", "Stack", "StackInfo", "StackOptions", "StartError", "Ttls", "install_signal_guard",
           "start_stack", "stop_all_stacks", "sweep_stale_stacks"]

log = logging.getLogger(__name__)

CLUSTERS = ("orders", "billing")


# ------------------------------------------------------------------ the stack

@dataclass
class StackOptions:
    """What to start. Skipping ``aws`` skips moto, the aws-auth and SSO stand-ins (then
    ``vault_addr`` is OpenBao itself); skipping ``vault`` skips OpenBao and the front."""

    ttls: Ttls = field(default_factory=Ttls)
    clusters: tuple[str, ...] = CLUSTERS
    vault: bool = True
    aws: bool = True
    sso: bool = True
    ssh: bool = True
    ssm: bool | None = None          # None: start the SSM stand-in if its module exists
    mariadb_tls: bool = False        # the MariaDBs offer TLS (as Aurora does; PyMySQL then uses it)
    home: Path | None = None         # where .aws/config goes (default: <dir>/home)
    base_dir: Path | None = None     # parent of the private temp dir (default: $TMPDIR)
    sso_interval: int = 1
    sso_device_code_ttl: int = 600
    sso_access_token_ttl: int = 3600          # as AWS; the SSO session (refresh token) lasts:
    sso_refresh_token_ttl: int = 8 * 3600     # Identity Center's default session duration
    sso_registration_ttl: int = 90 * 86400
    sso_auth_code_ttl: int = 300
    role_credentials_ttl: int = 3600
    sts_region: str = ""             # Vault's aws auth signs/uses this regional STS ("" = global)
    sts_endpoint: str = ""           # Vault's sts_endpoint, e.g. a VPC endpoint name (needs sts_region)
    vault_namespace: str = ""        # put the aws auth, database mount and policy in this namespace
    lease_revoke: bool = True        # False: the developer policy lacks sys/leases/revoke (Vault's default policy)


class Stack:
    """A running sandbox stack. Build it with ``start_stack()`` (or ``Stack(...).start()``
    and ``stop()``). Attribute reads not found here are answered from ``self.info``."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self.dir: Path | None = None
        self.info: StackInfo | None = None
        self.mariadb: dict[str, MariaDB] = {}
        self.openbao_server: OpenBao | None = None
        self.bastion: Bastion | None = None
        self.sshd: Service | None = None
        self.openbao: Service | None = None
        self.moto: Service | None = None
        self.vault_front: VaultFront | None = None
        self.sso: SsoStandin | None = None
        self.ssm: Service | None = None
        self.started_in: float = 0.0
        self._services: StackServices | None = None    # the service definitions and their ports
        self._local_ports: dict[str, int] = {}
        self._stopped = False

    def __getattr__(self, name: str) -> Any:
        info = self.__dict__.get("info")
        if info is not None and hasattr(info, name):
            return getattr(info, name)
        raise AttributeError(name)

    # -- services

    @property
    def services(self) -> list[Service]:
        """Every service of the stack (started or not), in start order."""
        found = [db.service for db in self.mariadb.values()]
        found += [self.openbao, self.moto, self.vault_front, self.sso, self.sshd, self.ssm]
        return [s for s in found if s is not None]

    def pids(self) -> list[int]:
        """Every live pid of every service (main processes and their descendants)."""
        return sorted({p for s in self.services for p in s.pids()})

    # -- start

    def start(self) -> "Stack":
        """Start everything in parallel; raise StartError (after cleaning up) on failure."""
        t0 = time.monotonic()
        sweep_stale_stacks(self.options.base_dir)
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=self.options.base_dir))
        os.chmod(self.dir, 0o700)
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        self._services = StackServices(self.dir, self.options, self.mariadb)
        live_stacks.add(self)
        try:
            self._build()
            self._start_all()
            self.info = self._describe()
            write_client_files(self.info)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        log.info("sandbox stack up in %.2fs under %s", self.started_in, self.dir)
        return self

    def _port(self, name: str) -> int:
        return self._services.port(name)

    def _want_ssm(self) -> bool:
        if self.options.ssm is not None:
            return self.options.ssm and self.options.aws
        return self.options.aws and ssm_standin_available()

    def _build(self) -> None:
        o = self.options
        for name in o.clusters:
            self.mariadb[name] = MariaDB.create(name, self.dir, self._port(f"mariadb-{name}"), tls=o.mariadb_tls)
            self._local_ports[name] = free_port()
        if o.vault:
            self.openbao_server = OpenBao.create(self.dir, self._port("openbao"), self._services.configure_openbao)
            self.openbao = self.openbao_server.service
        if o.aws:
            self.moto = self._services.moto(after_restart=self._reseeded)
            if o.vault:
                self.vault_front = self._services.vault_front(self.openbao_server.addr)
            if o.sso:
                self.sso = self._services.sso()
            if self._want_ssm():
                self.ssm = self._services.ssm()
        if o.ssh:
            permit = [(h, db.port) for db in self.mariadb.values() for h in ("127.0.0.1", "localhost")]
            self.bastion = Bastion.create(self.dir, self._port("sshd"), permit)
            self.sshd = self.bastion.service

    def _start_all(self) -> None:
        """Start every service in its own thread; OpenBao is configured once MariaDB is up."""
        dbs_ready = threading.Event()
        errors: list[BaseException] = []

        def run(fn: Callable[[], None]) -> None:
            try:
                fn()
            except BaseException as exc:  # collected and re-raised below
                errors.append(exc)
                dbs_ready.set()

        def start_dbs() -> None:
            template = self.dir / "mariadb-template"
            if self.mariadb:
                install_datadir(template, self.dir / "mariadb-template.log")
            with ThreadPoolExecutor(max_workers=max(1, len(self.mariadb))) as pool:
                for f in [pool.submit(db.start, template) for db in self.mariadb.values()]:
                    f.result()
            shutil.rmtree(template, ignore_errors=True)
            dbs_ready.set()

        def start_openbao() -> None:
            self.openbao.spawn()
            dbs_ready.wait()
            if not errors:
                self.openbao.wait_ready()

        jobs = [start_dbs]
        jobs += [s.start for s in (self.moto, self.vault_front, self.sso, self.sshd, self.ssm) if s is not None]
        if self.openbao is not None:
            jobs.append(start_openbao)
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            list(pool.map(run, jobs))
        if errors:
            starts = [e for e in errors if isinstance(e, ServiceError)]
            raise (starts or errors)[0]

    @property
    def seed_file(self) -> Path:
        return self._services.seed_file

    def _reseeded(self) -> None:
        """After a moto restart (state lost, seeded afresh: new keys and ids) update info."""
        if self.info is not None:
            self.info = self._describe()
            write_client_files(self.info)

    # -- description

    def _describe(self) -> StackInfo:
        o = self.options
        home = Path(o.home) if o.home else self.dir / "home"
        seed = json.loads(self.seed_file.read_text()) if self.moto is not None else {}
        clusters = {n: ClusterInfo(
            name=n, host="127.0.0.1", port=db.port, database=db.database, table=db.table,
            admin_user=db.admin_user, admin_password=db.admin_password, socket=str(db.socket),
            local_port=self._local_ports[n], db_role=f"{n}-ro", db_role_rw=f"{n}-rw",
            rds_endpoint=seed.get("clusters", {}).get(n, {}).get("endpoint", ""))
            for n, db in self.mariadb.items()}
        info = StackInfo(dir=str(self.dir), home=str(home), ttls=o.ttls, clusters=clusters,
                         relay_command=tuple(relay.command("127.0.0.1", self._services.ports.get("sshd", 0))),
                         dbtunneld_home=str(self.dir / "dbtunneld"))
        if self.openbao_server is not None:
            info = replace(info, bao_addr=self.openbao_server.addr, vault_addr=self.openbao_server.addr,
                           root_token=self.openbao_server.root_token)
        if self.vault_front is not None:
            info = replace(info, vault_addr=f"http://127.0.0.1:{self.vault_front.port}",
                           vault_namespace=o.vault_namespace, sts_region=o.sts_region, sts_endpoint=o.sts_endpoint)
        if seed:
            info = replace(info, aws_endpoint=seed["endpoint"], user_name=seed["user"]["name"],
                           user_arn=seed["user"]["arn"], access_key_id=seed["user"]["access_key_id"],
                           secret_access_key=seed["user"]["secret_access_key"],
                           role_arn=seed["roles"][DEVELOPER_ROLE], unbound_role_arn=seed["roles"][UNBOUND_ROLE],
                           bastion_instance_id=seed["bastion_instance_id"], bastion_tags=dict(seed["bastion_tags"]))
        if self.sso is not None:
            info = replace(info, sso_endpoint=f"http://127.0.0.1:{self.sso.port}",
                           sso_start_url=f"http://127.0.0.1:{self.sso.port}/start")
        if self.ssm is not None:
            info = replace(info, ssm_endpoint=f"http://127.0.0.1:{self.ssm.port}")
        if self.bastion is not None:
            b = self.bastion
            info = replace(info, ssh_port=b.port, ssh_user=b.user, ssh_key_file=str(b.client_key),
                           known_hosts=str(b.known_hosts), host_key=b.host_key_line)
        return replace(info, aws_config_file=str(home / ".aws" / "config"),
                       config_file=str(self.dir / "dbtunneld" / "config.toml"))

    def heal(self) -> list[str]:
        """Thaw frozen services and start stopped or crashed ones (same ports); return
        their names. OpenBao restarted this way is configured again but has lost its
        tokens and leases (dev mode keeps state in memory)."""
        healed = []
        for svc in self.services:
            if svc.frozen:
                svc.thaw()
                healed.append(svc.name)
            if not svc.is_running():
                svc.stop()
                svc.start()
                healed.append(svc.name)
        if healed:
            log.info("sandbox stack healed: %s", ", ".join(healed))
        return healed

    # -- helpers for tests and the CLI

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client process on this stack: private HOME, AWS config and
        endpoints (``AWS_ENDPOINT_URL_*``), ``AWS_PROFILE``, ``DBTUNNELD_HOME``; real AWS
        credentials and VAULT_* variables are removed. ``extra`` is added last."""
        from .clientfiles import client_env

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "VAULT_", "BAO_")) and k != "DBTUNNELD_HOME"}
        env.update(client_env(self.info))
        env.update(extra)
        return env

    def daemon_config(self, transport: str = "ssh") -> str:
        """A dbtunneld config (TOML) for this stack with the given bastion transport
        (``ssh``, ``ssm-ssh``, ``ssm-port-forward``); ``info.config_file`` holds the ``ssh`` one."""
        from .clientfiles import daemon_config_text

        return daemon_config_text(self.info, transport)

    def db(self, cluster: str) -> MariaDB:
        """The MariaDB instance of ``cluster`` (``.service``, ``.query()``, ``.dynamic_users()``)."""
        return self.mariadb[cluster]

    def dynamic_users(self, cluster: str | None = None) -> list[str]:
        """Vault-created users (``v-%``) still present in one cluster, or in all of them."""
        names = [cluster] if cluster else list(self.mariadb)
        return [u for n in names for u in self.mariadb[n].dynamic_users()]

    def count_dynamic_users(self, cluster: str | None = None) -> int:
        return len(self.dynamic_users(cluster))

    def root_vault(self) -> BaoAdmin:
        """A root-token client straight to OpenBao (``.read()``, ``.write()``, ``.call()``)."""
        return self.openbao_server.admin()

    def role_credentials(self, role: str = DEVELOPER_ROLE, session_name: str = SSO_USER,
                         duration: int = 3600) -> dict[str, str]:
        """Real moto credentials for ``role`` (the seeded user assumes it), without SSO:
        ``{"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}``."""
        import boto3

        sts = boto3.client("sts", endpoint_url=self.info.aws_endpoint, region_name=REGION,
                           aws_access_key_id=self.info.access_key_id,
                           aws_secret_access_key=self.info.secret_access_key)
        c = sts.assume_role(RoleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/{role}", RoleSessionName=session_name,
                            DurationSeconds=duration)["Credentials"]
        return {"aws_access_key_id": c["AccessKeyId"], "aws_secret_access_key": c["SecretAccessKey"],
                "aws_session_token": c["SessionToken"]}

    def sso_cache_file(self) -> Path:
        """Where botocore / the AWS CLI cache this stack's SSO token (under ``info.home``)."""
        digest = hashlib.sha1(SSO_SESSION.encode()).hexdigest()
        return Path(self.info.home) / ".aws" / "sso" / "cache" / f"{digest}.json"

    def to_json(self, secrets: bool = False) -> dict:
        """The stack description plus each service's pid/port/state."""
        data = self.info.to_json(secrets) if self.info else {"dir": str(self.dir)}
        data["services"] = {s.name: s.to_json() for s in self.services}
        data["started_in"] = round(self.started_in, 3)
        return data

    # -- stop

    def stop(self) -> None:
        """Stop every process (by pid, SIGTERM then SIGKILL) and remove the temp dir. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            stop_all(self.services)
        finally:
            live_stacks.discard(self)
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
            home = self.options.home
            if home is not None and self.info is not None:
                _remove_quietly(Path(self.info.aws_config_file))
        log.info("sandbox stack stopped")

    def __enter__(self) -> "Stack":
        return self if self.info is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def start_stack(*, token_ttl: int = 3600, token_max_ttl: int = 4 * 3600, lease_ttl: int = 3600,
                lease_max_ttl: int = 4 * 3600, **options: Any) -> Iterator[Stack]:
    """Start a stack, yield it, always tear it down. TTLs are in seconds (Vault tokens from
    the aws login, and database leases). Other keywords are ``StackOptions`` fields, e.g.
    ``ssh=False``, ``sso=False``, ``aws=False``, ``clusters=("orders",)``, ``home=PATH``."""
    ttls = Ttls(token_ttl=token_ttl, token_max_ttl=token_max_ttl, lease_ttl=lease_ttl, lease_max_ttl=lease_max_ttl)
    stack = Stack(StackOptions(ttls=ttls, **options))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def ssm_standin_available() -> bool:
    """True when the SSM stand-in module (another part of the sandbox) is present."""
    return (Path(__file__).parent / "ssm_standin.py").exists()


# ------------------------------------------------------------------ small helpers

def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
