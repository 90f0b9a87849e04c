"""Files and environment a client of the sandbox stack uses.

- ``aws_config_text``: ``~/.aws/config`` with the SSO profile (``sso_session`` form) and a
  ``services`` section pointing every AWS service at the stack;
- ``daemon_config_text``: a ready dbtunneld config (TOML, ``dbtunneld.core.config`` schema),
  transport ``ssh`` to the sandbox sshd, one cluster per MariaDB on a pinned local port;
- ``client_env``: HOME, AWS_CONFIG_FILE, AWS_ENDPOINT_URL_*, AWS_PROFILE, DBTUNNELD_HOME;
- ``write_client_files``: the AWS config and the dbtunneld config, written where ``info`` says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .info import StackInfo

# dbtunneld config key -> (botocore services-section key, AWS_ENDPOINT_URL_ suffix)
_SERVICE_KEYS = {"sts": ("sts", "STS"), "ec2": ("ec2", "EC2"), "rds": ("rds", "RDS"), "ssm": ("ssm", "SSM"),
                 "sso": ("sso", "SSO"), "sso-oidc": ("sso_oidc", "SSO_OIDC"), "iam": ("iam", "IAM")}


def _urls(info: "StackInfo") -> dict[str, str]:
    urls = info.endpoint_urls(region_template=False)
    if info.aws_endpoint:
        urls["iam"] = info.aws_endpoint
    return urls


def aws_config_text(info: "StackInfo") -> str:
    """The AWS config file: profile ``sandbox`` signs in through the SSO stand-in."""
    lines = ["[default]", f"region = {info.region}", ""]
    if info.sso_endpoint:
        lines += [f"[profile {info.profile}]", f"sso_session = {info.sso_session_name}",
                  f"sso_account_id = {info.sso_account_id}", f"sso_role_name = {info.sso_role_name}",
                  f"region = {info.region}", "services = sandbox-endpoints", "",
                  f"[sso-session {info.sso_session_name}]", f"sso_start_url = {info.sso_start_url}",
                  f"sso_region = {info.sso_region}", "sso_registration_scopes = sso:account:access", ""]
    urls = _urls(info)
    if urls:
        lines.append("[services sandbox-endpoints]")
        for key, url in urls.items():
            lines += [f"{_SERVICE_KEYS[key][0]} =", f"  endpoint_url = {url}"]
        lines.append("")
    return "\n".join(lines)


def client_env(info: "StackInfo") -> dict[str, str]:
    """Environment variables for a client process (no credentials: sign in via SSO)."""
    home = Path(info.home)
    env = {"HOME": str(home), "AWS_CONFIG_FILE": info.aws_config_file,
           "AWS_SHARED_CREDENTIALS_FILE": str(home / ".aws" / "credentials"),
           "AWS_DEFAULT_REGION": info.region, "AWS_REGION": info.region,
           "AWS_EC2_METADATA_DISABLED": "true", "DBTUNNELD_HOME": info.dbtunneld_home}
    if info.sso_endpoint:
        env["AWS_PROFILE"] = info.profile
    for key, url in _urls(info).items():
        env[f"AWS_ENDPOINT_URL_{_SERVICE_KEYS[key][1]}"] = url
    if info.vault_addr:
        env["VAULT_ADDR"] = info.vault_addr
    return env


def _toml(value) -> str:
    return json.dumps(value)  # JSON strings and numbers are valid TOML basic values


def daemon_config_text(info: "StackInfo", transport: str = "ssh") -> str:
    """A dbtunneld config for this stack (valid for ``dbtunneld config check``).

    ``transport``: ``ssh`` (straight to the sandbox sshd), ``ssm-ssh`` (SSM session to the
    tagged bastion instance, then SSH) or ``ssm-port-forward`` (SSM port sessions, no SSH);
    the SSM ones need the SSM stand-in (``info.ssm_endpoint``)."""
    lines = ["# dbtunneld config for the sandbox stack (generated; removed at teardown)", "",
             "[aws]", f"profile = {_toml(info.profile)}", f"region = {_toml(info.region)}", ""]
    urls = info.endpoint_urls()
    if urls:
        lines.append("[aws.endpoint_urls]")
        lines += [f"{_toml(k)} = {_toml(v)}" for k, v in urls.items()]
        lines.append("")
    lines += ["[vault]", f"address = {_toml(info.vault_addr)}", f"role = {_toml(info.vault_role)}",
              f"auth_mount = {_toml(info.auth_mount)}", f"iam_server_id = {_toml(info.server_id)}",
              f"database_mount = {_toml(info.database_mount)}"]
    lines += [f"{key} = {_toml(value)}" for key, value in (
        ("sts_region", info.sts_region), ("sts_endpoint", info.sts_endpoint), ("namespace", info.vault_namespace))
        if value] + [""]
    lines += _bastion_lines(info, transport)
    for c in info.clusters.values():
        lines += ["[[clusters]]", f"name = {_toml(c.name)}", f"endpoint = {_toml(c.host)}", f"port = {c.port}",
                  f"local_port = {c.local_port}", f"db_role = {_toml(c.db_role)}",
                  f"database = {_toml(c.database)}", ""]
    return "\n".join(lines)


def _bastion_lines(info: "StackInfo", transport: str) -> list[str]:
    lines = ["[bastion]", f"transport = {_toml(transport)}"]
    if transport == "ssh":
        lines += [f"host = {_toml(info.ssh_host)}", f"port = {info.ssh_port or 22}"]
    else:
        lines.append(f"instance_id = {_toml(info.bastion_instance_id)}")
    if transport != "ssm-port-forward":
        lines.append(f"user = {_toml(info.ssh_user or 'root')}")
        if info.ssh_key_file:
            lines += [f"key_file = {_toml(info.ssh_key_file)}", f"known_hosts = {_toml(info.known_hosts)}",
                      f"host_key = {_toml(info.host_key)}"]
    return lines + [""]


def write_client_files(info: "StackInfo") -> None:
    """``info.aws_config_file`` and ``info.config_file`` (the ``ssh`` transport), in private dirs."""
    home = Path(info.home)
    (home / ".aws").mkdir(parents=True, exist_ok=True, mode=0o700)
    Path(info.aws_config_file).write_text(aws_config_text(info))
    Path(info.dbtunneld_home).mkdir(parents=True, exist_ok=True, mode=0o700)
    Path(info.config_file).write_text(daemon_config_text(info))
