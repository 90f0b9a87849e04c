"""A private MariaDB instance standing in for one Aurora MySQL cluster.

Own datadir, socket and loopback port under the stack's temp dir. The datadir is copied
from a template installed once per stack (``install_datadir``: ~1 s, tuned for speed, not
durability). After every start the instance is seeded (idempotently) with a sample database
named after the cluster (a table of a few hundred rows) and an admin user for Vault's
database secrets engine.
The OS user who runs the stack is MariaDB's socket-authenticated superuser, which
``query`` uses (so tests can look at ``mysql.user`` without any password).
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import Service, StartError, banner_probe

ADMIN_USER = "vault-admin"
SAMPLE_ROWS = 300


def _bin(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None)
        if found:
            return found
    raise FileNotFoundError(f"none of {', '.join(names)} found; install mariadb-server (./dev setup)")


# Speed over durability: a small redo log, no fsync, no doublewrite.
FAST_INNODB = ["--innodb-log-file-size=4M", "--innodb-flush-method=nosync", "--innodb-doublewrite=0",
               "--innodb-buffer-pool-size=32M"]


def table_for(database: str) -> str:
    return {"orders": "orders", "billing": "invoices"}.get(database, "items")


def seed_sql(database: str) -> str:
    """Idempotent SQL for the sample schema and data (SEQUENCE engine for the rows)."""
    table = table_for(database)
    return f"""
CREATE DATABASE IF NOT EXISTS `{database}`;
CREATE TABLE IF NOT EXISTS `{database}`.`{table}` (
  id INT PRIMARY KEY,
  customer VARCHAR(64) NOT NULL,
  amount_cents INT NOT NULL,
  created_at DATETIME NOT NULL
);
INSERT IGNORE INTO `{database}`.`{table}`
  SELECT seq, CONCAT('customer-', seq % 37), (seq * 7919) % 100000,
         '2024-01-01 00:00:00' + INTERVAL seq HOUR
  FROM `{database}`.seq_1_to_{SAMPLE_ROWS};
"""


def admin_sql(admin_password: str) -> str:
    """Idempotent SQL for the account Vault manages users with."""
    return (f"CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'%' IDENTIFIED BY '{admin_password}';"
            f"ALTER USER '{ADMIN_USER}'@'%' IDENTIFIED BY '{admin_password}';"
            f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'%' WITH GRANT OPTION;")


def install_datadir(datadir: Path, log_path: Path, name: str = "mariadb") -> None:
    """``mariadb-install-db`` into ``datadir`` (system tables only); StartError on failure."""
    datadir.parent.mkdir(parents=True, exist_ok=True)
    # A private tmpdir: a starting mariadbd deletes "#sql*" files it finds in its tmpdir, so
    # bootstraps sharing /tmp break each other's temporary tables (concurrent stacks).
    tmpdir = datadir.parent / f"{datadir.name}.tmp"
    tmpdir.mkdir(exist_ok=True)
    argv = [_bin("mariadb-install-db", "mysql_install_db"), "--no-defaults", f"--datadir={datadir}",
            "--auth-root-authentication-method=socket", f"--auth-root-socket-user={_os_user()}",
            "--skip-test-db", "--skip-name-resolve", f"--tmpdir={tmpdir}", *FAST_INNODB]
    if os.geteuid() == 0:
        argv.append("--user=root")
    try:
        with open(log_path, "wb") as logf:
            rc = subprocess.call(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    if rc != 0:
        # the cause comes first, then ~25 lines of generic advice: keep the cause
        lines = log_path.read_text(errors="replace").splitlines()
        cause = [ln for ln in lines if "ERROR" in ln or "[Warning]" in ln][:10]
        raise StartError(name, f"mariadb-install-db exited with status {rc}", "\n".join(cause + lines[-8:]))


@dataclass
class MariaDB:
    """One MariaDB server: ``service`` runs it; ``port``, ``socket``, ``database``, ``table``.

    ``admin_user``/``admin_password`` is the account Vault uses (all privileges, grant option).
    """

    name: str
    dir: Path
    port: int
    admin_password: str
    service: Service | None = None
    tls: bool = False                # offer TLS (a self-signed certificate made at the first start)

    @property
    def database(self) -> str:
        return self.name

    @property
    def table(self) -> str:
        return table_for(self.name)

    @property
    def admin_user(self) -> str:
        return ADMIN_USER

    @property
    def socket(self) -> Path:
        return self.dir / "mysqld.sock"

    @property
    def datadir(self) -> Path:
        return self.dir / "data"

    @classmethod
    def create(cls, name: str, base: Path, port: int, tls: bool = False) -> "MariaDB":
        """Describe an instance under ``base/name`` (nothing runs until ``install``/``service``)."""
        db = cls(name=name, dir=base / f"mariadb-{name}", port=port, admin_password=secrets.token_urlsafe(18),
                 tls=tls)
        db.service = Service(
            name=f"mariadb-{name}", argv=db._server_argv(), log_path=db.dir / "server.log",
            ready=banner_probe(port), port=port, start_timeout=30.0, stop_timeout=10.0,
            after_start=lambda _svc: db.seed())
        return db

    def install(self, template: Path | None = None) -> None:
        """Create the datadir: a copy of ``template`` if given, else a fresh install."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if template is not None:
            shutil.copytree(template, self.datadir, symlinks=True)
        else:
            install_datadir(self.datadir, self.dir / "install.log", self.service.name)

    def start(self, template: Path | None = None) -> None:
        """Install (first time only) and start; returns when the server is seeded and ready."""
        if not self.datadir.exists():
            self.install(template)
        if self.tls:
            self._make_tls_files()
        self.service.start()

    def _make_tls_files(self) -> None:
        """A self-signed certificate so the server offers TLS (clients opt in, as with Aurora)."""
        cert, key = self.dir / "server-cert.pem", self.dir / "server-key.pem"
        if cert.exists() and key.exists():
            return
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650",
                        "-subj", f"/CN=sandbox-mariadb-{self.name}"],
                       check=True, capture_output=True, timeout=60)

    def seed(self) -> None:
        """Admin user, sample schema and data (idempotent; runs after every start)."""
        self.query(admin_sql(self.admin_password) + seed_sql(self.database))

    def query(self, sql: str) -> list[list[str]]:
        """Run ``sql`` as the socket superuser; rows as lists of strings (tab-separated output)."""
        out = subprocess.run(
            [_bin("mariadb", "mysql"), "--no-defaults", f"--socket={self.socket}", "-u", _os_user(),
             "-N", "-B"],
            input=sql, capture_output=True, text=True, timeout=30)  # SQL on stdin: no secrets in argv
        if out.returncode != 0:
            raise RuntimeError(f"mariadb-{self.name}: query failed: {out.stderr.strip()}")
        return [line.split("\t") for line in out.stdout.splitlines()]

    def dynamic_users(self) -> list[str]:
        """Names of the users Vault created (``v-%`` in mysql.user)."""
        return [row[0] for row in self.query("SELECT User FROM mysql.user WHERE User LIKE 'v-%' ORDER BY User")]

    def count_dynamic_users(self) -> int:
        """How many users Vault created that still exist."""
        return len(self.dynamic_users())

    def to_json(self) -> dict:
        return {"name": self.name, "host": "127.0.0.1", "port": self.port, "socket": str(self.socket),
                "database": self.database, "table": self.table, "admin_user": ADMIN_USER,
                "pid": self.service.pid if self.service else None}

    # -- command lines

    def _server_argv(self) -> list[str]:
        argv = [_bin("mariadbd", "mysqld"), "--no-defaults", f"--datadir={self.datadir}",
                f"--socket={self.socket}", f"--port={self.port}", "--bind-address=127.0.0.1",
                f"--pid-file={self.dir / 'mariadbd.pid'}", f"--tmpdir={self.dir}",
                "--skip-name-resolve", *FAST_INNODB, "--performance-schema=OFF",
                "--skip-log-bin", "--max-connections=500", "--log-warnings=1"]
        if self.tls:
            argv += [f"--ssl-cert={self.dir / 'server-cert.pem'}", f"--ssl-key={self.dir / 'server-key.pem'}"]
        if os.geteuid() == 0:
            argv.append("--user=root")
        return argv


def _os_user() -> str:
    return "root" if os.geteuid() == 0 else getpass.getuser()
