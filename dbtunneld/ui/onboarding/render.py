"""The commented config.toml that `dbtunneld init` writes, and the merge into an existing one.

A merge never rewrites what is there: sections the file already has are kept as they are (with
the user's edits and comments), and only clusters it does not have yet (by name or endpoint) and
missing sections are appended. The result is validated by ``config.parse_config`` before it is
written (atomically, mode 0600).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ...core.config import Config, parse_config
from .plan import BastionPlan, ClusterPlan, InitPlan, VaultPlan


def _q(value: Any) -> str:
    return json.dumps(value)        # a JSON string or number is a valid TOML basic value


def aws_lines(plan: InitPlan) -> list[str]:
    return ["# AWS: the profile of ~/.aws/config dbtunneld signs in with (`dbtunneld login`).",
            "[aws]", f"profile = {_q(plan.profile)}", f"region = {_q(plan.region)}", ""]


def vault_lines(v: VaultPlan) -> list[str]:
    return ["# Vault: AWS IAM login to `role`, then a database user per cluster from the database mount.",
            "[vault]", f"address = {_q(v.address)}", f"role = {_q(v.role)}",
            f"iam_server_id = {_q(v.iam_server_id)}    # X-Vault-AWS-IAM-Server-ID; \"\" when Vault wants none",
            f"auth_mount = {_q(v.auth_mount)}", f"database_mount = {_q(v.database_mount)}", ""]


def bastion_lines(b: BastionPlan) -> list[str]:
    lines = ["# Bastion: how bytes reach the clusters (ssm-ssh, ssm-port-forward, ssh).", "[bastion]"]
    if b.note:
        lines.insert(1, f"# {b.note}")
    lines.append(f"transport = {_q(b.transport)}")
    if b.tags:
        tags = ", ".join(f"{_q(k)} = {_q(v)}" for k, v in sorted(b.tags.items()))
        lines.append(f"tags = {{ {tags} }}    # found by tag: a replaced bastion is picked up")
    elif b.instance_id:
        lines.append(f"instance_id = {_q(b.instance_id)}")
    if b.transport != "ssm-port-forward":
        lines.append(f"user = {_q(b.user)}")
        if b.key_file:
            lines.append(f"key_file = {_q(b.key_file)}")
    return lines + [""]


def cluster_lines(c: ClusterPlan) -> list[str]:
    lines = [f"# Aurora cluster {c.name}" + (f" (reader endpoint {c.reader_endpoint})" if c.reader_endpoint else ""),
             "[[clusters]]", f"name = {_q(c.name)}", f"endpoint = {_q(c.endpoint)}", f"port = {c.port}",
             f"local_port = {c.local_port}    # stable: mysql -h 127.0.0.1 -P {c.local_port}",
             f"db_role = {_q(c.db_role)}"]
    if c.database:
        lines.append(f"database = {_q(c.database)}")
    if c.reader_endpoint:
        lines.append("# reader_port = 0    # uncomment with a free port for a second tunnel to the reader endpoint")
    return lines + [""]


def render_new(plan: InitPlan) -> str:
    """A whole config file for ``plan``."""
    head = [f"# dbtunneld config written by `dbtunneld init` on {time.strftime('%Y-%m-%d')}.",
            "# Edit freely: re-running `dbtunneld init` only adds clusters and sections that are missing.",
            "# Check it with `dbtunneld config check`; apply changes with `dbtunneld reload`.", ""]
    body = aws_lines(plan) + vault_lines(plan.vault) + bastion_lines(plan.bastion)
    for c in plan.clusters:
        body += cluster_lines(c)
    return "\n".join(head + body)


def merge_into(existing_text: str, existing_doc: dict[str, Any], plan: InitPlan) -> tuple[str, list[str]]:
    """``existing_text`` with what ``plan`` adds; returns (text, names of the clusters added)."""
    added: list[str] = []
    parts = [existing_text.rstrip("\n"), "", f"# added by `dbtunneld init` on {time.strftime('%Y-%m-%d')}"]
    for key, lines in (("aws", aws_lines(plan)), ("vault", vault_lines(plan.vault) if plan.vault else []),
                       ("bastion", bastion_lines(plan.bastion) if plan.bastion else [])):
        if key not in existing_doc and lines:
            parts += lines
    for c in new_clusters(existing_doc, plan.clusters):
        parts += cluster_lines(c)
        added.append(c.name)
    return "\n".join(parts), added


def new_clusters(existing_doc: dict[str, Any], clusters: list[ClusterPlan]) -> list[ClusterPlan]:
    """The planned clusters the file does not have yet (same name or same endpoint: has it)."""
    have = existing_doc.get("clusters") or []
    names = {c.get("name") for c in have if isinstance(c, dict)}
    endpoints = {c.get("endpoint") for c in have if isinstance(c, dict)}
    return [c for c in clusters if c.name not in names and c.endpoint not in endpoints]


def write_config(path: Path, text: str) -> Config:
    """Validate ``text`` as a config, then write it to ``path`` atomically (0600)."""
    config = parse_config(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return config
