"""Aurora writer and reader ports: the probe reports what the server says; a writer port that
answers read-only (a failover) is rebuilt once and announced once.

On the sandbox the "failover" is `SET GLOBAL read_only=1` on the cluster's MariaDB (which has no
innodb_read_only set: the probe then goes by @@read_only). A real daemon, free ports only.
"""

from __future__ import annotations

import time

import pytest

from dbtunneld.core.config import parse_config
from dbtunneld.core.config_schema import aurora_reader_endpoint
from dbtunneld.core.errors import ConfigError
from dbtunneld.core.model import DaemonStatus, TunnelState, TunnelStatus
from dbtunneld.engine.aurora import RoleCheckedTunnel, reader_unit
from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest
from dbtunneld.sandbox.procs import free_port
from dbtunneld.ui import notify

from helpers.faultkit import query

pymysql = pytest.importorskip("pymysql")


def _with_reader_port(config: str, reader_port: int) -> str:
    return config.replace('name = "orders"\n', f'name = "orders"\nreader_port = {reader_port}\nreader_endpoint = "127.0.0.1"\n', 1)


def _role(d: DaemonUnderTest, name: str) -> tuple[str, int]:
    t = d.tunnel(name)
    return t.get("role", ""), t["reconnects"]


def test_writer_port_answering_read_only_is_rebuilt_once_and_announced_once(stack, tmp_path):
    db = stack.db("orders")
    options = DaemonOptions(clusters=("orders",), tunnels={"health_interval": 1})
    with DaemonUnderTest(stack, tmp_path, options) as d:
        reader_port = free_port()
        d.write_config(_with_reader_port(d.config, reader_port))
        d.start()
        d.sign_in()
        d.cli("connect", "--all", "--wait", "60", timeout=120)
        d.wait_for(lambda st: {t["name"]: t.get("role") for t in st["tunnels"]} ==
                   {"orders": "writer", "orders-reader": "writer"}, 30, "roles from the probe")
        assert d.local_port("orders-reader") == reader_port
        status_text = d.cli("status", check=False).stdout
        assert "writer" in status_text
        port, creds = d.local_port("orders"), d.creds("orders")
        before = d.tunnel("orders")["reconnects"]
        tracker, notices = notify.IncidentTracker(), []
        try:
            db.query("SET GLOBAL read_only=1")
            deadline = time.monotonic() + 40
            cut = 0
            while time.monotonic() < deadline:
                try:
                    query(port, creds, "SELECT 1")           # a client logs in: the probe is due
                except pymysql.err.OperationalError as exc:
                    if exc.args[0] != 2013:                  # CR_SERVER_LOST: cut by the rebuild it set off
                        raise
                    cut += 1
                st = d.status()
                notices += [n for n in tracker.observe(DaemonStatus.from_dict(st), time.time()) if n.key[0] == "failover"]
                role, reconnects = _role(d, "orders")
                if role == "reader" and reconnects > before and len(notices) == 1:
                    break
                time.sleep(0.3)
            assert (role, reconnects > before) == ("reader", True), d.log_text()[-2000:]
            assert cut <= 1                                  # only the client whose login found the flip
            for _ in range(6):                               # more probes while still read-only
                query(port, creds, "SELECT 1")
                query(reader_port, creds, "SELECT 1")        # the reader port shares the DB user
                notices += [n for n in tracker.observe(DaemonStatus.from_dict(d.status()), time.time())
                            if n.key[0] == "failover"]
                time.sleep(0.5)
            assert len(notices) == 1 and "writer endpoint of orders answered read-only" in notices[0].message
            assert d.tunnel("orders")["reconnects"] == reconnects               # rebuilt once, not in a loop
            assert d.log_text().count("the writer endpoint answers read-only") == 1
            assert "writer port answers as a reader" in d.cli("status", check=False).stdout
            assert d.tunnel("orders-reader")["role"] == "reader"                # truthful, and no rebuild
        finally:
            db.query("SET GLOBAL read_only=0")
        deadline = time.monotonic() + 30
        while _role(d, "orders")[0] != "writer" and time.monotonic() < deadline:
            query(port, creds, "SELECT 1")
            time.sleep(0.3)
        assert _role(d, "orders")[0] == "writer"
        assert not [n for n in tracker.observe(DaemonStatus.from_dict(d.status()), time.time()) if n.key[0] == "failover"]


# ---- pure parts


def test_reader_endpoint_is_derived_from_an_aurora_endpoint_and_ports_are_checked():
    assert aurora_reader_endpoint("orders.cluster-abc.eu-west-1.rds.amazonaws.com") == \
        "orders.cluster-ro-abc.eu-west-1.rds.amazonaws.com"
    assert aurora_reader_endpoint("db.example.com") == ""
    base = '[vault]\naddress = "https://v.example.com"\nrole = "r"\n[bastion]\ntransport = "ssh"\nhost = "b"\n'
    cfg = parse_config(base + '[[clusters]]\nname = "o"\nendpoint = "o.cluster-x.eu-west-1.rds.amazonaws.com"\n'
                              'db_role = "r"\nlocal_port = 13306\nreader_port = 13307\n')
    unit = reader_unit(cfg.clusters[0])
    assert (unit.name, unit.endpoint, unit.local_port, unit.reader_of) == (
        "o-reader", "o.cluster-ro-x.eu-west-1.rds.amazonaws.com", 13307, "o")
    with pytest.raises(ConfigError) as info:
        parse_config(base + '[[clusters]]\nname = "o"\nendpoint = "db.example.com"\ndb_role = "r"\nreader_port = 13307\n'
                            '[[clusters]]\nname = "p"\nendpoint = "p.example.com"\ndb_role = "r"\nlocal_port = 13307\n')
    text = info.value.message
    assert "clusters[0].reader_endpoint" in text
    assert 'local_port 13307 is already used by cluster "o (reader)"' in text


class _FakeUnit:
    name = "orders"

    def __init__(self) -> None:
        self.rebuilds = 0

    def reconnect(self) -> None:
        self.rebuilds += 1

    def status(self) -> TunnelStatus:
        return TunnelStatus("orders", 13306, TunnelState.UP)


def test_role_checked_tunnel_rebuilds_once_per_failover_and_only_writer_ports():
    writer = RoleCheckedTunnel(_FakeUnit(), "writer")
    for read_only in (False, True, True, True, False, True):
        writer.observe(read_only)
    assert writer.tunnel.rebuilds == 2 and writer.status().role == "reader"
    reader = RoleCheckedTunnel(_FakeUnit(), "reader")
    reader.observe(True)
    reader.observe(False)
    assert reader.tunnel.rebuilds == 0 and reader.status().role == "writer"
