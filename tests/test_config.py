"""Config parsing: good files load; each bad file gives every problem with key path and fix."""

from __future__ import annotations

import re
import textwrap

import pytest

from dbtunneld.core.config import load_config, parse_config
from dbtunneld.core.errors import ConfigError

GOOD = """
[aws]
profile = "dev-sso"
region = "eu-west-1"

[vault]
address = "https://vault.example.com:8200"
role = "db-developer"
iam_server_id = "vault.example.com"

[bastion]
transport = "ssm-ssh"
tags = { Name = "bastion" }
user = "ec2-user"

[tunnels]
port_range = [13306, 13320]
connect_wait = 5

[[clusters]]
name = "orders"
endpoint = "orders.cluster-abc.eu-west-1.rds.amazonaws.com"
local_port = 13306
db_role = "orders-ro"
autoconnect = true

[[clusters]]
name = "billing"
endpoint = "billing.cluster-abc.eu-west-1.rds.amazonaws.com"
db_role = "billing-rw"
production = true
transport = "ssm-port-forward"
"""


def test_good_config_loads_with_defaults():
    cfg = parse_config(GOOD, "config.toml")
    assert cfg.aws.profile == "dev-sso" and cfg.aws.region == "eu-west-1"
    assert cfg.vault.auth_mount == "aws" and cfg.vault.database_mount == "database"
    assert cfg.bastion.tags == {"Name": "bastion"}
    assert cfg.tunnels.port_range == (13306, 13320)
    assert cfg.tunnels.connect_wait == 5.0
    orders, billing = cfg.clusters
    assert (orders.name, orders.local_port, orders.port, orders.autoconnect) == ("orders", 13306, 3306, True)
    assert billing.local_port is None and billing.production
    assert billing.effective_transport(cfg.bastion) == "ssm-port-forward"
    assert orders.effective_transport(cfg.bastion) == "ssm-ssh"
    assert cfg.cluster("billing") is billing
    with pytest.raises(KeyError, match='no cluster named "nope"'):
        cfg.cluster("nope")


def test_loopback_http_vault_is_allowed():
    text = GOOD.replace("https://vault.example.com:8200", "http://127.0.0.1:8200")
    assert parse_config(text).vault.address == "http://127.0.0.1:8200"


def test_ssh_transport_with_host():
    text = GOOD.replace('transport = "ssm-ssh"\ntags = { Name = "bastion" }', 'transport = "ssh"\nhost = "bastion.example.com"')
    cfg = parse_config(text)
    assert cfg.bastion.transport == "ssh" and cfg.bastion.host == "bastion.example.com"


BASE_VAULT = '[vault]\naddress = "https://v.example.com"\nrole = "r"\n'
BASE_BASTION = '[bastion]\ninstance_id = "i-0123456789abcdef0"\n'
ONE_CLUSTER = '[[clusters]]\nname = "a"\nendpoint = "a.example.com"\ndb_role = "a-ro"\n'

BAD = [
    ("not toml", "x = = 1", ["config.toml: not valid TOML: "]),
    ("no vault", BASE_BASTION + ONE_CLUSTER,
     ["config.toml: vault: section is missing; add [vault] with address and role"]),
    ("vault fields missing", '[vault]\n' + BASE_BASTION + ONE_CLUSTER,
     ['config.toml: vault.address: is required; write e.g. address = "https://vault.example.com:8200"',
      'config.toml: vault.role: is required; name the Vault aws auth role, e.g. role = "db-developer"']),
    ("http vault not loopback", '[vault]\naddress = "http://vault.example.com"\nrole = "r"\n' + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: vault.address: 'http://vault.example.com' sends the Vault token in clear text; use https (plain http is allowed only for a loopback address)"]),
    ("vault not a url", '[vault]\naddress = "vault"\nrole = "r"\n' + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: vault.address: 'vault' is not a URL; write e.g. \"https://vault.example.com:8200\""]),
    ("vault creds in url", '[vault]\naddress = "https://u:p@vault.example.com"\nrole = "r"\n' + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: vault.address: must not carry credentials or a query; keep only scheme://host:port"]),
    ("vault sts and namespace", '[vault]\naddress = "https://v.example.com"\nrole = "r"\nsts_region = "Europe"\n'
     'sts_endpoint = "https://sts.eu-west-1.amazonaws.com/x"\nnamespace = "team a"\n' + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: vault.sts_region: 'Europe' is not an AWS region; write the region Vault's aws auth signs STS for",
      "config.toml: vault.sts_endpoint: 'https://sts.eu-west-1.amazonaws.com/x' has a path, query or credentials; "
      "keep only scheme://host[:port]",
      "config.toml: vault.namespace: 'team a' is not a Vault namespace path; write e.g. \"admin\""]),
    ("vault sts endpoint not a url", BASE_VAULT.replace('role = "r"', 'role = "r"\nsts_endpoint = "sts.eu-west-1"')
     + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: vault.sts_endpoint: 'sts.eu-west-1' is not a URL; write the STS endpoint Vault is configured with"]),
    ("unknown transport", BASE_VAULT + '[bastion]\ntransport = "telnet"\ninstance_id = "i-0123456789abcdef0"\n' + ONE_CLUSTER,
     ["config.toml: bastion.transport: unknown transport 'telnet'; use one of ssm-ssh, ssm-port-forward, ssh, plugin"]),
    ("ssm without target", BASE_VAULT + ONE_CLUSTER,
     ["config.toml: bastion: transport 'ssm-ssh' needs a target; set bastion.instance_id or bastion.tags"]),
    ("bad instance id", BASE_VAULT + '[bastion]\ninstance_id = "bastion-1"\n' + ONE_CLUSTER,
     ["config.toml: bastion.instance_id: 'bastion-1' is not an instance id; write e.g. \"i-0123456789abcdef0\" or \"ecs:cluster_taskid_runtimeid\""]),
    ("ssh without host", BASE_VAULT + '[bastion]\ntransport = "ssh"\n' + ONE_CLUSTER,
     ["config.toml: bastion.host: transport 'ssh' needs the bastion's address; write e.g. host = \"bastion.example.com\""]),
    ("no clusters", BASE_VAULT + BASE_BASTION,
     ["config.toml: clusters: no cluster is defined; add at least one [[clusters]] table with name, endpoint and db_role"]),
    ("cluster missing keys", BASE_VAULT + BASE_BASTION + '[[clusters]]\nname = "a"\n',
     ["config.toml: clusters[0].endpoint: is required; give the cluster's writer or reader endpoint",
      'config.toml: clusters[0].db_role: is required; name the Vault database role, e.g. db_role = "orders-ro"']),
    ("duplicate names and ports", BASE_VAULT + BASE_BASTION
     + '[[clusters]]\nname = "orders"\nendpoint = "o"\ndb_role = "o"\nlocal_port = 13306\n'
     + '[[clusters]]\nname = "billing"\nendpoint = "b"\ndb_role = "b"\nlocal_port = 13306\n'
     + '[[clusters]]\nname = "orders"\nendpoint = "o2"\ndb_role = "o"\n',
     ['config.toml: clusters[1].local_port: cluster "billing": local_port 13306 is already used by cluster "orders"; pick another port',
      'config.toml: clusters[2].name: cluster "orders" is defined twice (also clusters[0]); give each cluster a unique name']),
    ("port out of range", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + "local_port = 70000\n",
     ["config.toml: clusters[0].local_port: port 70000 is out of range; use a port from 1 to 65535"]),
    ("privileged port", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + "local_port = 80\n",
     ["config.toml: clusters[0].local_port: port 80 is privileged; pick a port from 1024 to 65535, e.g. 13306"]),
    ("wrong type", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + 'local_port = "13306"\n',
     ["config.toml: clusters[0].local_port: must be an integer, not a string '13306'; write an integer"]),
    ("bool as int", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + "port = true\n",
     ["config.toml: clusters[0].port: must be an integer, not a boolean True; write an integer"]),
    ("unknown key with suggestion", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + "autoconect = true\n",
     ['config.toml: clusters[0].autoconect: unknown key; did you mean "autoconnect"?']),
    ("unknown section", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + "[tunnel]\nconnect_wait = 1\n",
     ['config.toml: tunnel: unknown section; did you mean "tunnels"?']),
    ("bad port range", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + "[tunnels]\nport_range = [14000, 13000]\n",
     ["config.toml: tunnels.port_range: [14000, 13000] is not a port range; write two ports from 1024 to 65535, low first, e.g. [13306, 13399]"]),
    ("number out of range", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + "[tunnels]\nconnect_wait = -1\n",
     ["config.toml: tunnels.connect_wait: -1 is out of range; use a value from 0 to 300"]),
    ("bad region", '[aws]\nregion = "europe"\n' + BASE_VAULT + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: aws.region: 'europe' is not an AWS region; write e.g. \"eu-west-1\""]),
    ("bad endpoint service", '[aws]\nendpoint_urls = { s3 = "http://127.0.0.1:1" }\n' + BASE_VAULT + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: aws.endpoint_urls.s3: unknown service; use one of sts, ec2, rds, ssm, kms, sso, sso-oidc, ec2-instance-connect"]),
    ("clusters not array", 'clusters = "a"\n' + BASE_VAULT + BASE_BASTION,
     ["config.toml: clusters: must be an array of tables, not a string; write each cluster as [[clusters]]"]),
    ("bad cluster name", BASE_VAULT + BASE_BASTION + '[[clusters]]\nname = "my cluster"\nendpoint = "a"\ndb_role = "r"\n',
     ["config.toml: clusters[0].name: 'my cluster' is not a valid name; use letters, digits, '.', '_' and '-' (max 63)"]),
    ("tags not strings", BASE_VAULT + '[bastion]\ntags = { Name = 1 }\n' + ONE_CLUSTER,
     ['config.toml: bastion.tags.Name: must be a string, not an integer; write it in quotes, e.g. "bastion"']),
    ("section not a table", 'vault = "x"\n' + BASE_BASTION + ONE_CLUSTER,
     ["config.toml: vault: must be a table, not a string; write it as [vault]"]),
    ("bad host key", BASE_VAULT + '[bastion]\ninstance_id = "i-0123456789abcdef0"\nhost_key = "AAAA"\n' + ONE_CLUSTER,
     ['config.toml: bastion.host_key: is not an OpenSSH public key line; write "ssh-ed25519 AAAA..." as in known_hosts']),
    ("unknown login", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + 'login = "vault"\n',
     ["config.toml: clusters[0].login: unknown login 'vault'; use \"local\" (a stable local user and password; saved logins keep working) or \"lease\""]),
    ("bad local user", BASE_VAULT + BASE_BASTION + ONE_CLUSTER + 'local_user = "me@host"\n',
     ["config.toml: clusters[0].local_user: 'me@host' is not a usable MySQL user name; use up to 32 letters"]),
]


@pytest.mark.parametrize("label,text,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_lists_every_problem(label, text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "config.toml")
    lines = str(info.value).splitlines()
    for want in expected:
        assert any(line.startswith(want) for line in lines), f"missing {want!r} in {lines}"
    if not label == "not toml":
        assert len(lines) == len(expected), lines
    assert "config check" in info.value.hint


def test_vault_sts_and_namespace_settings():
    text = BASE_VAULT + 'sts_region = "auto"\nnamespace = "/admin/team-a/"\n' + BASE_BASTION + ONE_CLUSTER
    vault = parse_config(text).vault
    assert (vault.sts_region, vault.sts_endpoint, vault.namespace) == ("auto", "", "admin/team-a")
    text = BASE_VAULT + 'sts_region = "eu-west-1"\nsts_endpoint = "https://vpce-1-a.sts.eu-west-1.vpce.amazonaws.com/"\n'
    vault = parse_config(text + BASE_BASTION + ONE_CLUSTER).vault
    assert vault.sts_endpoint == "https://vpce-1-a.sts.eu-west-1.vpce.amazonaws.com" and vault.sts_region == "eu-west-1"
    assert parse_config(BASE_VAULT + BASE_BASTION + ONE_CLUSTER).vault.sts_region == "us-east-1"


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: file not found; create it (see README: Configuration) or pass --config PATH"


def test_key_file_must_exist(tmp_path):
    text = BASE_VAULT + f'[bastion]\ninstance_id = "i-0123456789abcdef0"\nkey_file = "{tmp_path}/id"\n' + ONE_CLUSTER
    with pytest.raises(ConfigError, match=r"bastion.key_file: file .* does not exist; give the path of your SSH private key"):
        parse_config(text, "config.toml")
    (tmp_path / "id").write_text("k")
    assert parse_config(text).bastion.key_file == f"{tmp_path}/id"


def test_cli_config_check_exit_codes(tmp_path, capsys):
    from dbtunneld.ui.cli import main

    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert main(["config", "check", str(good)]) == 0
    assert "ok (2 clusters)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(textwrap.dedent(BASE_VAULT + BASE_BASTION))
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "clusters: no cluster is defined" in err and "hint:" in err


@pytest.mark.parametrize("key,line", [("vault.role", 'role = "  "'), ("clusters[0].name", 'name = ""'),
                                      ("clusters[0].db_role", 'db_role = ""')])
def test_required_keys_must_not_be_empty(key, line):
    text = BASE_VAULT + BASE_BASTION + ONE_CLUSTER
    name = line.split(" =")[0]
    text = "\n".join(line if row.startswith(f"{name} = ") else row for row in text.split("\n"))
    with pytest.raises(ConfigError, match=rf"config.toml: {re.escape(key)}: is empty"):
        parse_config(text, "config.toml")


def test_login_defaults_to_local_and_lease_is_kept():
    cfg = parse_config(BASE_VAULT + BASE_BASTION + ONE_CLUSTER)
    assert (cfg.clusters[0].login, cfg.clusters[0].local_user) == ("local", "")
    cfg = parse_config(BASE_VAULT + BASE_BASTION + ONE_CLUSTER + 'login = "lease"\nlocal_user = "me"\n')
    assert (cfg.clusters[0].login, cfg.clusters[0].local_user) == ("lease", "me")


def test_upstream_tls_defaults_to_off_and_names_its_modes():
    assert parse_config(BASE_VAULT + BASE_BASTION + ONE_CLUSTER).clusters[0].upstream_tls == "off"
    cfg = parse_config(BASE_VAULT + BASE_BASTION + ONE_CLUSTER + 'upstream_tls = "required"\n')
    assert cfg.clusters[0].upstream_tls == "required"
    with pytest.raises(ConfigError, match=r'clusters\[0\].upstream_tls: unknown mode .yes.*"auto"'):
        parse_config(BASE_VAULT + BASE_BASTION + ONE_CLUSTER + 'upstream_tls = "yes"\n', "config.toml")
