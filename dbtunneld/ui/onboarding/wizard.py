"""`dbtunneld init`: from an AWS profile to a checked config.toml, by asking and discovering.

Steps: pick a profile of ~/.aws/config, sign in (the SSO device flow of ``sso.SsoDeviceLogin``),
log in to Vault and LIST the database roles (a 403 means: ask for each role), find the bastion by
its tags, list the Aurora MySQL clusters, propose stable local ports, then write (or merge into)
the config. Sections the file already has are used as they are and not asked again.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from ...adapters import inventory
from ...adapters.aws import AwsSession
from ...adapters.ports import PortBook
from ...adapters.sso import SsoDeviceLogin
from ...adapters.vault import VaultClient
from ...core.config import AwsConfig, VaultConfig
from ...core.errors import ConfigError, DbtunneldError, PermissionDeniedError, Problem, SignInNeededError
from .plan import BastionPlan, ClusterPlan, InitPlan, PortProposer, VaultPlan
from .prompt import Prompter
from .render import merge_into, new_clusters, render_new, write_config

log = logging.getLogger(__name__)

DEFAULT_RANGE = (13306, 13399)
TRANSPORT_CHOICES = ("ssm-ssh", "ssm-port-forward")


@dataclass
class Existing:
    """The config file as it is before init (empty when there is none)."""

    path: Path
    text: str = ""
    doc: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "Existing":
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        try:
            return cls(path, text, tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), [Problem("", f"not valid TOML: {exc}",
                                                  "fix it first: init merges into it and never overwrites it")]) from None

    def section(self, name: str) -> dict[str, Any]:
        value = self.doc.get(name)
        return value if isinstance(value, dict) else {}

    def claimed_ports(self) -> set[int]:
        return {c["local_port"] for c in self.doc.get("clusters") or []
                if isinstance(c, dict) and isinstance(c.get("local_port"), int)}

    def port_range(self) -> tuple[int, int]:
        rng = self.section("tunnels").get("port_range")
        return (rng[0], rng[1]) if isinstance(rng, list) and len(rng) == 2 else DEFAULT_RANGE


class InitWizard:
    """One run of `dbtunneld init` (answers from ``prompter``)."""

    def __init__(self, config_path: Path, prompter: Prompter, *, ports_file: Path | None = None,
                 open_browser: bool = True, sleep: Callable[[float], None] = time.sleep) -> None:
        self.existing = Existing.read(Path(config_path))
        self.ui = prompter
        self.ports_file = ports_file
        self.open_browser = open_browser
        self._sleep = sleep

    # -- the run

    def run(self) -> list[str]:
        """Ask, discover, write; returns the names of the clusters added."""
        plan = self._aws_plan()
        session = AwsSession(AwsConfig(profile=plan.profile, region=plan.region))
        self._sign_in(session)
        plan.vault = self._vault_plan()
        roles = self._vault_roles(plan.vault, session)
        plan.bastion = None if self.existing.section("bastion") else self._bastion_plan(session)
        plan.clusters = self._cluster_plans(session, roles)
        return self._write(plan)

    def _aws_plan(self) -> InitPlan:
        aws = self.existing.section("aws")
        if aws.get("profile"):
            self.ui.say(f"AWS: using profile {aws['profile']!r} from {self.existing.path}")
            return InitPlan(aws["profile"], aws.get("region") or "us-east-1")
        profiles = inventory.aws_profiles()
        if not profiles:
            raise DbtunneldError("~/.aws/config has no profile",
                                 hint="create one with `aws configure sso`, then run `dbtunneld init` again")
        env_profile = os.environ.get("AWS_PROFILE", "")
        default = profiles.index(env_profile) if env_profile in profiles else 0
        profile = profiles[self.ui.choose("AWS profile", profiles, default)]
        region = self.ui.ask("AWS region", inventory.profile_region(profile) or "us-east-1", required=True)
        return InitPlan(profile, region)

    def _sign_in(self, session: AwsSession) -> None:
        try:
            session.credentials()
            return
        except SignInNeededError:
            pass
        login = SsoDeviceLogin(session)
        auth = login.start()
        self.ui.show_sign_in(auth.verification_uri_complete, auth.user_code)
        if self.open_browser:
            webbrowser.open(auth.verification_uri_complete)
        interval = auth.interval
        while not (result := login.poll(auth, interval)).done:
            interval = result.interval
            self._sleep(interval)
        session.reset()
        self.ui.say(f"signed in as {session.caller_arn()}")

    # -- Vault

    def _vault_plan(self) -> VaultPlan:
        v = self.existing.section("vault")
        if v.get("address") and v.get("role"):
            self.ui.say(f"Vault: using [vault] from {self.existing.path}")
            return VaultPlan(v["address"], v["role"], v.get("iam_server_id", ""), v.get("auth_mount", "aws"),
                             v.get("database_mount", "database"))
        address = self.ui.ask("Vault address", os.environ.get("VAULT_ADDR", ""), required=True).rstrip("/")
        role = self.ui.ask("Vault AWS auth role (your team's role for database access)", required=True)
        server_id = self.ui.ask("Vault IAM server id header (empty if Vault needs none)",
                                urlsplit(address).hostname or "")
        mount = self.ui.ask("Vault aws auth mount", "aws", required=True)
        db_mount = self.ui.ask("Vault database secrets mount", "database", required=True)
        return VaultPlan(address, role, server_id, mount, db_mount)

    def _vault_roles(self, plan: VaultPlan, session: AwsSession) -> list[str] | None:
        """The database roles Vault lets this user LIST; None when the policy refuses (then ask)."""
        cfg = VaultConfig(address=plan.address, role=plan.role, auth_mount=plan.auth_mount,
                          iam_server_id=plan.iam_server_id, database_mount=plan.database_mount)
        creds = session.credentials()
        with VaultClient(cfg) as vault:
            vault.login_aws_iam(creds.access_key, creds.secret_key, creds.token)
            self.ui.say(f"Vault: logged in as role {plan.role!r}")
            try:
                roles = vault.list_database_roles()
            except PermissionDeniedError:
                self.ui.say(f"Vault refused to list {plan.database_mount}/roles (403): you will be asked for each role")
                roles = None
            finally:
                _revoke_quietly(vault)
        if roles is not None:
            self.ui.say(f"Vault database roles you may read: {', '.join(roles) or 'none'}")
        return roles

    # -- bastion

    def _bastion_plan(self, session: AwsSession) -> BastionPlan:
        search = inventory.bastion_candidates(session.client("ec2"), session.client("ssm"))
        if search.ssm_note:
            self.ui.say(search.ssm_note)
        for c in search.skipped:
            self.ui.say(f"bastion {c.instance_id} {c.name}: skipped, its SSM agent is {c.ping_status}")
        transport = TRANSPORT_CHOICES[self.ui.choose("Transport", TRANSPORT_CHOICES, 0)]
        plan = self._bastion_target(search, transport)
        if transport == "ssm-ssh":
            plan.user = self.ui.ask("SSH user on the bastion", "ec2-user", required=True)
            plan.key_file = self.ui.ask("SSH private key file (empty: use the SSH agent)", _default_key())
        return plan

    def _bastion_target(self, search: inventory.BastionSearch, transport: str) -> BastionPlan:
        found = search.candidates
        if not found:
            self.ui.say("no running EC2 instance is tagged dbtunneld:role=bastion or named *bastion*")
            instance = self.ui.ask("Bastion instance id (i-...)", required=True)
            return BastionPlan(transport, instance_id=instance, note="bastion given by hand")
        labels = [f"{c.instance_id} {c.name} (SSM: {c.ping_status or 'unknown'})" for c in found]
        chosen = found[self.ui.choose("Bastion", labels, 0)]
        key, value = inventory.BASTION_ROLE_TAG
        tagged = [c for c in found + search.skipped if c.tags.get(key) == value]
        how = "SSM agent " + chosen.ping_status if chosen.ping_status else "EC2 tags (SSM status unknown)"
        if tagged == [chosen]:
            return BastionPlan(transport, tags={key: value}, note=f"found by init: {chosen.instance_id}, {how}")
        return BastionPlan(transport, instance_id=chosen.instance_id, note=f"found by init, {how}")

    # -- clusters

    def _cluster_plans(self, session: AwsSession, roles: list[str] | None) -> list[ClusterPlan]:
        found = inventory.aurora_clusters(session.client("rds"))
        candidates = [_plan_of(c) for c in found]
        fresh = new_clusters(self.existing.doc, candidates)
        for c in candidates:
            if c not in fresh:
                self.ui.say(f"cluster {c.name}: already in the config (kept as it is)")
        if not fresh:
            self.ui.say("no new Aurora MySQL cluster found")
            return []
        by_name = {c.identifier: c for c in found}
        proposer = PortProposer(self.existing.port_range(), self._claimed_ports())
        ports = [proposer.propose(by_name[c.name].tag_port()) for c in fresh]
        picked = self.ui.choose_many("Clusters to add", [f"{c.name}  {c.endpoint}  -> 127.0.0.1:{port}"
                                                         for c, port in zip(fresh, ports)])
        return [self._finish_cluster(fresh[i], by_name[fresh[i].name], roles, proposer, ports[i]) for i in picked]

    def _claimed_ports(self) -> set[int]:
        claimed = self.existing.claimed_ports()
        if self.ports_file is not None:
            claimed |= set(PortBook(self.ports_file, self.existing.port_range()).assignments().values())
        return claimed

    def _finish_cluster(self, plan: ClusterPlan, found: inventory.AuroraCluster, roles: list[str] | None,
                        proposer: PortProposer, proposed: int) -> ClusterPlan:
        plan.db_role = self._role_for(plan.name, found.tag_role, roles)
        while True:
            answer = self.ui.ask(f"Local port for {plan.name}", str(proposed))
            if answer.isdigit() and 1024 <= int(answer) <= 65535:
                break
            self.ui.say("  give a port from 1024 to 65535")
        if int(answer) != proposed:
            proposer.claimed.discard(proposed)
            proposer.claimed.add(int(answer))
        plan.local_port = int(answer)
        return plan

    def _role_for(self, name: str, tag_role: str, roles: list[str] | None) -> str:
        if not roles:
            return self.ui.ask(f"Vault database role for {name}", tag_role, required=True)
        default = tag_role if tag_role in roles else next((r for r in roles if r.startswith(name)), roles[0])
        return roles[self.ui.choose(f"Vault database role for {name}", roles, roles.index(default))]

    # -- writing

    def _write(self, plan: InitPlan) -> list[str]:
        path = self.existing.path
        if self.existing.text:
            text, added = merge_into(self.existing.text, self.existing.doc, plan)
        else:
            text, added = render_new(plan), [c.name for c in plan.clusters]
        if text == self.existing.text or (self.existing.text and not added and plan.bastion is None):
            self.ui.say(f"{path}: nothing to add")
            return []
        config = write_config(path, text)
        self.ui.say(f"wrote {path} ({len(config.clusters)} clusters; added: {', '.join(added) or 'none'})")
        for c in plan.clusters:
            self.ui.say(f"  {c.name}: `dbtunneld connect {c.name}`, then mysql -h 127.0.0.1 -P {c.local_port}")
        return added


def _plan_of(c: inventory.AuroraCluster) -> ClusterPlan:
    return ClusterPlan(name=c.identifier, endpoint=c.endpoint, port=c.port, db_role="", local_port=0,
                       reader_endpoint=c.reader_endpoint, database=c.database)


def _default_key() -> str:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        if (Path.home() / ".ssh" / name).is_file():
            return str(Path("~/.ssh") / name)
    return ""


def _revoke_quietly(vault: VaultClient) -> None:
    """init's token is not needed afterwards: revoke it (the daemon logs in on its own)."""
    try:
        vault.revoke_self()
    except DbtunneldError as exc:
        log.info("init: could not revoke its Vault token (%s); it expires on its own", exc.message)


def run_init(config_path: Path, *, ports_file: Path | None = None, open_browser: bool = True,
             prompter: Prompter | None = None) -> list[str]:
    """`dbtunneld init`: returns the names of the clusters added."""
    return InitWizard(config_path, prompter or Prompter(), ports_file=ports_file, open_browser=open_browser).run()
