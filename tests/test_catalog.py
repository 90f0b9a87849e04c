"""The team catalog: a TOML file (path or https) or RDS tags, merged into the user's config.

Real daemon on the sandbox: a catalog change adds a cluster on reload without moving any port,
a catalog port that collides is refused naming both clusters, and RDS-tagged clusters arrive
once AWS answers. Pure parts: the merge rules and the config keys.
"""

from __future__ import annotations

import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from dbtunneld.adapters import catalog
from dbtunneld.adapters.ports import PortBook
from dbtunneld.core.config import ClusterConfig, parse_config
from dbtunneld.core.errors import ConfigError
from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest
from dbtunneld.sandbox.procs import free_port

from helpers.faultkit import query

BASE = '[vault]\naddress = "https://vault.example.com"\nrole = "dev"\n[bastion]\ntransport = "ssh"\nhost = "b"\n'


def _catalog_entry(stack, name: str, local_port: int | None) -> str:
    c = stack.clusters[name]
    port_line = f"local_port = {local_port}\n" if local_port else ""
    return (f'[[clusters]]\nname = "{name}"\nendpoint = "127.0.0.1"\nport = {c.port}\n{port_line}'
            f'db_role = "{c.db_role}"\ndatabase = "{c.database}"\n')


def test_a_catalog_change_adds_a_cluster_on_reload_without_moving_ports(stack, tmp_path):
    team = tmp_path / "dbtunneld" / "team.toml"
    with DaemonUnderTest(stack, tmp_path, DaemonOptions(clusters=("orders",))) as d:
        team.parent.mkdir(parents=True, exist_ok=True)
        team.write_text("# the team's clusters\n")
        d.write_config(d.config + '\n[catalog]\nsource = "team.toml"\n')
        d.start()
        d.sign_in()
        d.cli("connect", "orders", "--wait", "60", timeout=120)
        orders_port = d.local_port("orders")
        billing_port = free_port()
        team.write_text(_catalog_entry(stack, "billing", billing_port))
        assert d.cli("reload").stdout.strip() == "reloaded: started billing"
        d.cli("connect", "billing", "--wait", "60", timeout=120)
        assert d.local_port("billing") == billing_port and d.local_port("orders") == orders_port
        assert query(billing_port, d.creds("billing"), "SELECT 1") == (1,)

        team.write_text(_catalog_entry(stack, "billing", free_port()))     # the team moves billing
        assert d.cli("reload").stdout.strip() == "reloaded: no change"
        assert d.local_port("billing") == billing_port                     # not for this user

        team.write_text(_catalog_entry(stack, "billing", billing_port) + _catalog_entry(stack, "orders", None)
                        .replace('name = "orders"', 'name = "reports"') + f"local_port = {orders_port}\n")
        r = d.cli("reload", check=False)
        assert r.returncode == 2
        assert (f'catalog cluster "reports" (from team.toml) wants local_port {orders_port}, '
                f'already used by cluster "orders"') in r.stderr
        assert [t["name"] for t in d.status()["tunnels"]] == ["orders", "billing"]   # running config stays


def test_rds_tagged_clusters_join_on_reload_once_aws_answers(stack, tmp_path):
    with DaemonUnderTest(stack, tmp_path, DaemonOptions(clusters=("orders",), transport="ssm-port-forward")) as d:
        d.write_config(d.config + "\n[catalog]\nrds_tags = true\n")
        d.start()                                   # not signed in yet: no tagged cluster, a warning
        assert [t["name"] for t in d.status()["tunnels"]] == ["orders"]
        d.sign_in()
        assert d.cli("reload").stdout.strip() == "reloaded: started billing"   # orders is the user's own
        d.cli("connect", "billing", "--wait", "60", timeout=120)
        tunnel = d.tunnel("billing")
        assert tunnel["state"] == "up"
        assert query(tunnel["local_port"], d.creds("billing"), "SELECT 1") == (1,)
        assert "RDS tags unavailable" in d.log_text()


# ---- merge rules and config keys


def _config(clusters: str = "", catalog: str = 'source = "team.toml"') -> object:
    return parse_config(BASE + clusters + f"\n[catalog]\n{catalog}\n", "/tmp/x/config.toml")


def _cluster(name: str, port: int | None) -> ClusterConfig:
    return ClusterConfig(name=name, endpoint=f"{name}.example.com", db_role=f"{name}-ro", local_port=port)


def test_merge_keeps_the_users_entry_and_the_first_port(tmp_path, caplog):
    cfg = _config('[[clusters]]\nname = "orders"\nendpoint = "mine"\ndb_role = "r"\nlocal_port = 14000\n')
    book = PortBook(tmp_path / "ports.json", (13306, 13399))
    with caplog.at_level(logging.INFO, "dbtunneld.adapters.catalog"):
        merged = catalog.merge_catalog(cfg, [_cluster("orders", 15000), _cluster("billing", 15001)], book, "team.toml")
        again = catalog.merge_catalog(cfg, [_cluster("billing", 15999)], book, "team.toml")
    assert [(c.name, c.endpoint, c.local_port) for c in merged.clusters] == [
        ("orders", "mine", 14000), ("billing", "billing.example.com", 15001)]
    assert merged.catalog_clusters == ("billing",)
    assert again.cluster("billing").local_port == 15001
    assert "keeps local port 15001 (the catalog now says 15999)" in caplog.text


def test_merge_refuses_a_port_already_used_naming_both(tmp_path):
    cfg = _config('[[clusters]]\nname = "orders"\nendpoint = "o"\ndb_role = "r"\n')
    book = PortBook(tmp_path / "ports.json", (13306, 13399))
    book.keep("orders", 13310)                      # assigned to the user's cluster earlier
    with pytest.raises(ConfigError) as info:
        catalog.merge_catalog(cfg, [_cluster("billing", 13310)], book, "team.toml")
    text = info.value.message
    assert 'catalog cluster "billing" (from team.toml) wants local_port 13310' in text
    assert 'cluster "orders" in /tmp/x/config.toml (assigned earlier)' in text
    with pytest.raises(ConfigError, match='already used by catalog cluster "a"'):
        catalog.merge_catalog(cfg, [_cluster("a", 13320), _cluster("b", 13320)], book, "RDS tags")


def test_catalog_keys_are_checked():
    with pytest.raises(ConfigError) as info:
        _config(catalog='source = "http://catalog.example.com/team.toml"')
    assert "catalog.source" in info.value.message and "https" in info.value.message
    assert _config(catalog="rds_tags = true").clusters == ()          # no [[clusters]] needed then
    with pytest.raises(ConfigError, match="no cluster is defined"):
        parse_config(BASE)


def test_a_bad_catalog_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "team.toml").write_text('[[clusters]]\nname = "x"\nendpoint = "e"\n')
    cfg = parse_config(BASE + '[catalog]\nsource = "team.toml"\n', str(tmp_path / "config.toml"))
    with pytest.raises(ConfigError) as info:
        catalog.with_catalog(cfg, tmp_path / "ports.json")
    assert "catalog team.toml" in info.value.message and "db_role" in info.value.message


def _tls_server(tmp_path: Path, body: bytes) -> tuple[HTTPServer, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, cert_file


def test_https_catalog_is_fetched_verified_and_cached(tmp_path, monkeypatch):
    server, cert = _tls_server(tmp_path, b'[[clusters]]\nname = "billing"\nendpoint = "b"\ndb_role = "r"\n')
    url = f"https://localhost:{server.server_port}/team.toml"
    cfg = parse_config(BASE + f'[catalog]\nsource = "{url}"\ntimeout = 2\n', str(tmp_path / "config.toml"))
    try:
        unverified = catalog.with_catalog(cfg, tmp_path / "ports.json", tmp_path / "state")
        assert unverified.clusters == ()               # the self-signed cert is not trusted: nothing
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        merged = catalog.with_catalog(cfg, tmp_path / "ports.json", tmp_path / "state")
        assert [c.name for c in merged.clusters] == ["billing"]
    finally:
        server.shutdown()
        server.server_close()
    offline = catalog.with_catalog(cfg, tmp_path / "ports.json", tmp_path / "state")
    assert [c.name for c in offline.clusters] == ["billing"]      # the last good copy
