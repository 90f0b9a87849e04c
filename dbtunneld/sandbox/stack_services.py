"""The sandbox stack's service definitions: the Python services (moto, the aws-auth stand-in in
front of OpenBao, the SSO stand-in, the SSM stand-in) with their config files, the free port of
each service (picked once, kept across restarts), and OpenBao's configuration (database engine,
policies, JWT auth for the aws-auth stand-in). ``stack.Stack`` builds its services with one
``StackServices`` and starts, describes and stops them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import sts_endpoint
from .info import REGION, SERVER_ID, SSO_USER, VAULT_ROLE
from .mariadb import MariaDB
from .moto_launcher import ACCOUNT_ID, DEVELOPER_ROLE, UNBOUND_ROLE
from .openbao import (JWT_AUDIENCE, JWT_ISSUER, JWT_MOUNT, AwsRoleBinding, BaoAdmin, ClusterDb, configure_database,
                      configure_jwt_auth, configure_policies, create_namespace)
from .procs import Service, StartError, file_probe, free_port, http_probe
from .standins import SsoStandin, VaultFront

if TYPE_CHECKING:
    from .stack import StackOptions


class StackServices:
    """Defines the stack's services under ``dir`` (``mariadb``: the clusters, filled by the stack
    before any service here is defined)."""

    def __init__(self, dir: Path, options: "StackOptions", mariadb: dict[str, MariaDB]) -> None:
        self.dir = dir
        self.options = options
        self.mariadb = mariadb
        self.ports: dict[str, int] = {}
        self.jwt_public_pem: str | None = None     # set when the aws-auth stand-in is defined

    def port(self, name: str) -> int:
        """The service's port: a free one, picked at the first ask and kept (restarts reuse it)."""
        if name not in self.ports:
            self.ports[name] = free_port()
        return self.ports[name]

    @property
    def seed_file(self) -> Path:
        return self.dir / "aws" / "seed.json"

    def python_service(self, name: str, module: str, args: list[str], ready: Callable[[], bool],
                       port: int, cls: type = Service, env: dict | None = None) -> Service:
        return cls(name=name, argv=[sys.executable, "-m", module, *args], port=port,
                   log_path=self.dir / "logs" / f"{name}.log", ready=ready, env=env or self.child_env(),
                   cwd=self.dir, start_timeout=30.0)

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "VAULT_", "BAO_")) and k not in ("HOME",)}
        env.update(HOME=str(self.dir), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                   MOTO_EC2_LOAD_DEFAULT_AMIS="false", AWS_EC2_METADATA_DISABLED="true")
        return env

    # -- the services

    def moto(self, after_restart: Callable[[], None]) -> Service:
        """moto, seeded at each start (``after_restart``: the seed changed, new keys and ids)."""
        (self.dir / "aws").mkdir(mode=0o700, exist_ok=True)
        clusters = [f"--cluster={n}={db.port}" for n, db in self.mariadb.items()]
        svc = self.python_service(
            "moto", "dbtunneld.sandbox.moto_launcher",
            ["--port", str(self.port("moto")), "--seed-out", str(self.seed_file), "--region", REGION, *clusters],
            file_probe(self.seed_file), self.port("moto"))
        svc.before_start = lambda _s: self.seed_file.unlink(missing_ok=True)
        svc.after_start = lambda _s: after_restart()
        return svc

    def vault_front(self, openbao_addr: str) -> VaultFront:
        """The aws-auth stand-in in front of OpenBao (logs in with a JWT it signs)."""
        key_file = self.dir / "aws" / "standin-jwt.pem"
        self.jwt_public_pem = write_jwt_key(key_file)
        port = self.port("vault-front")
        config = {
            "listen_port": port, "vault_addr": openbao_addr,
            "sts_transport": f"http://127.0.0.1:{self.port('moto')}", **self._vault_sts_config(),
            "namespace": self.options.vault_namespace,
            "iam_server_id_header_value": SERVER_ID, "auth_mount": JWT_MOUNT,
            "jwt_key_file": str(key_file), "jwt_issuer": JWT_ISSUER, "jwt_audience": JWT_AUDIENCE,
            "roles": {b.name: {"bound_iam_principal_arn": list(b.bound_iam_principal_arn)} for b in _bindings()},
        }
        path = write_private_json(self.dir / "aws" / "aws-auth-standin.json", config)
        return self.python_service("aws-auth-standin", "dbtunneld.sandbox.aws_auth_standin",
                                   ["--config", str(path)],
                                   http_probe(f"http://127.0.0.1:{port}/_standin/health"), port, VaultFront)

    def _vault_sts_config(self) -> dict:
        """Vault's config/client STS settings for the stand-in (default: the global endpoint)."""
        o = self.options
        endpoint = o.sts_endpoint or (sts_endpoint.regional_endpoint(o.sts_region) if o.sts_region else "")
        return {"sts_endpoint": endpoint or sts_endpoint.GLOBAL_ENDPOINT, "sts_region": o.sts_region}

    def sso(self) -> SsoStandin:
        o = self.options
        port = self.port("sso")
        config = {
            "listen_port": port, "start_url": f"http://127.0.0.1:{port}/start", "seed_file": str(self.seed_file),
            "region": REGION, "user_name": SSO_USER,
            "accounts": [{"accountId": ACCOUNT_ID, "accountName": "sandbox", "emailAddress": "aws-sandbox@example.com",
                          "roles": [DEVELOPER_ROLE, UNBOUND_ROLE]}],
            "access_token_ttl": o.sso_access_token_ttl, "device_code_ttl": o.sso_device_code_ttl,
            "interval": o.sso_interval, "role_credentials_ttl": o.role_credentials_ttl,
            "refresh_token_ttl": o.sso_refresh_token_ttl, "registration_ttl": o.sso_registration_ttl,
            "auth_code_ttl": o.sso_auth_code_ttl,
        }
        path = write_private_json(self.dir / "aws" / "sso-standin.json", config)
        return self.python_service("sso-standin", "dbtunneld.sandbox.sso_standin", ["--config", str(path)],
                                   http_probe(f"http://127.0.0.1:{port}/_standin/health"), port, SsoStandin)

    def ssm(self) -> Service:
        """The SSM stand-in, defined by its own module's ``stack_service(services)``."""
        from . import ssm_standin  # type: ignore[attr-defined]

        factory = getattr(ssm_standin, "stack_service", None)
        if factory is None:
            raise StartError("ssm-standin", "dbtunneld.sandbox.ssm_standin has no stack_service() factory")
        return factory(self)

    # -- OpenBao

    def configure_openbao(self, root: BaoAdmin) -> None:
        """The database engine for every cluster, the policies, and the JWT auth the aws-auth
        stand-in logs in with (when it is part of the stack)."""
        ttls = self.options.ttls
        bao = root
        if self.options.vault_namespace:
            bao = create_namespace(root, self.options.vault_namespace)
        configure_database(bao, [ClusterDb(n, db.port, db.database, db.admin_user, db.admin_password)
                                 for n, db in self.mariadb.items()], ttls)
        configure_policies(bao, self.options.lease_revoke)
        if self.jwt_public_pem is not None:
            configure_jwt_auth(bao, self.jwt_public_pem, _bindings(), ttls)


def _bindings() -> list[AwsRoleBinding]:
    return [AwsRoleBinding(VAULT_ROLE, (f"arn:aws:iam::{ACCOUNT_ID}:role/{DEVELOPER_ROLE}",))]


# ------------------------------------------------------------------ the services' config files

def write_private_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    return path


def write_jwt_key(path: Path) -> str:
    """A fresh ES256 key for the aws-auth stand-in; returns the public key PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()
