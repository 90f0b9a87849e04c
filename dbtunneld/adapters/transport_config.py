"""From the config to a ``Transport``: the bastion section, the cluster's override, the SSH
options, how the bastion is found (instance id or tags) and EC2 Instance Connect's fresh keys."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from ..core.config import BastionConfig, ClusterConfig, Config
from ..core.errors import NeedsUserError
from . import ssh, ssh_auth
from .discovery import classify_aws_error, find_bastion
from .transport import (PluginTransport, SessionFactory, SshTransport, SsmPortForwardTransport, SsmSshTransport,
                        Transport)


def build_transport(config: Config, cluster: ClusterConfig,
                    session_factory: SessionFactory | None = None) -> Transport:
    """The transport for one cluster, as configured (``bastion`` + the cluster's override)."""
    bastion = config.bastion
    kind = cluster.effective_transport(bastion)
    aws = config.aws
    target = _target_resolver(bastion, session_factory, aws.region, aws.endpoint_urls.get("ec2"))
    options_for = _options_factory(bastion)
    ssm_url = aws.endpoint_urls.get("ssm")
    if kind == "ssh" and bastion.client in ("openssh", "auto"):
        from .openssh_transport import OpenSshTransport, master_settings
        from .ssh_auto import AutoSshTransport

        def openssh() -> Transport:
            return OpenSshTransport(master_settings(bastion, config.tunnels))

        def paramiko() -> Transport:
            return SshTransport(bastion.host, bastion.port, options_for)
        if bastion.client == "openssh":
            return openssh()
        return AutoSshTransport(bastion.host, bastion.port, openssh, paramiko)
    if kind == "ssh":
        eic_ssh = _eic_for_ssh(bastion, session_factory, target, aws.region, aws.endpoint_urls)
        return SshTransport(bastion.host, bastion.port, options_for, ephemeral=eic_ssh)
    if session_factory is None:
        raise NeedsUserError(f"transport {kind!r} needs AWS credentials", hint="sign in to AWS first")
    if kind == "ssm-ssh":
        eic = _eic(bastion, session_factory, aws.region, aws.endpoint_urls)
        return SsmSshTransport(session_factory, target, options_for, ephemeral=eic,
                               endpoint_url=ssm_url, region=aws.region, port=bastion.port,
                               kms_endpoint_url=aws.endpoint_urls.get("kms"))
    if kind == "plugin":
        return PluginTransport(session_factory, target, options_for, bastion.plugin_path,
                               endpoint_url=ssm_url, region=aws.region, port=bastion.port)
    return SsmPortForwardTransport(session_factory, target, cluster.endpoint, cluster.port,
                                   endpoint_url=ssm_url, region=aws.region,
                                   kms_endpoint_url=aws.endpoint_urls.get("kms"))


def _options_factory(bastion: BastionConfig) -> Callable[[str], ssh.SshOptions]:
    def options_for(label: str) -> ssh.SshOptions:
        return ssh.SshOptions(user=bastion.user, host_label=label, key_file=bastion.key_file,
                              use_agent=True, host_key=bastion.host_key, known_hosts=bastion.known_hosts)
    return options_for


def _target_resolver(bastion: BastionConfig, session_factory: SessionFactory | None, region: str,
                     ec2_url: str | None) -> Callable[[], str]:
    def target() -> str:
        if bastion.instance_id:
            return bastion.instance_id
        if session_factory is None:
            raise NeedsUserError("finding the bastion by tags needs AWS credentials", hint="sign in to AWS first")
        ec2 = session_factory().client("ec2", region_name=region, endpoint_url=ec2_url)
        return find_bastion(ec2, tags=bastion.tags).instance_id
    return target


def _eic(bastion: BastionConfig, session_factory: SessionFactory | None, region: str,
         urls: dict[str, str]) -> Callable[[str, ssh.SshOptions], ssh.SshOptions] | None:
    """With ec2_instance_connect on: push a fresh key before each SSH login."""
    if not bastion.ec2_instance_connect or session_factory is None:
        return None

    def with_key(instance_id: str, options: ssh.SshOptions) -> ssh.SshOptions:
        client = session_factory().client("ec2-instance-connect", region_name=region,
                                          endpoint_url=urls.get("ec2-instance-connect"))
        key = ssh_auth.send_ephemeral_key(client, instance_id, options.user, classify_aws_error)
        return replace(options, pkey=key)
    return with_key


def _eic_for_ssh(bastion: BastionConfig, session_factory: SessionFactory | None, target: Callable[[], str],
                 region: str, urls: dict[str, str]) -> Callable[[ssh.SshOptions], ssh.SshOptions] | None:
    eic = _eic(bastion, session_factory, region, urls)
    if eic is None:
        return None
    return lambda options: eic(target(), options)
