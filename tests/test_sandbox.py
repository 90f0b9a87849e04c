"""The sandbox stack itself: start, describe, fault methods, and a clean teardown by pid."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from dbtunneld.core.config import load_config
from dbtunneld.sandbox.procs import Service, StartError, banner_probe, free_port, pid_alive, tcp_probe, wait_until
from dbtunneld.sandbox.stack import Stack, StackOptions


def greeting(port: int, timeout: float = 2.0) -> bytes:
    """The first bytes a server sends on connect (b"" if none within ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        try:
            return s.recv(64)
        except socket.timeout:
            return b""


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


# ------------------------------------------------------------------ the session stack

def test_every_service_runs_on_its_port(stack):
    names = {s.name for s in stack.services}
    assert {"mariadb-orders", "mariadb-billing", "openbao", "moto", "aws-auth-standin", "sso-standin",
            "sshd"} <= names
    for svc in stack.services:
        assert svc.is_running(), svc.name
        assert tcp_probe(svc.port)(), f"{svc.name} not listening on {svc.port}"
    assert greeting(stack.ssh_port).startswith(b"SSH-2.0-")
    assert greeting(stack.clusters["orders"].port)[4:5] == b"\x0a"   # MySQL protocol v10


def test_clusters_hold_sample_data(stack):
    for name, table in (("orders", "orders"), ("billing", "invoices")):
        assert stack.db(name).query(f"SELECT COUNT(*) FROM `{name}`.`{table}`") == [["300"]]
        assert stack.clusters[name].table == table


def test_generated_daemon_config_is_valid(stack):
    cfg = load_config(stack.config_file)
    assert cfg.vault.address == stack.vault_addr
    assert cfg.vault.iam_server_id == stack.server_id
    assert cfg.bastion.transport == "ssh" and cfg.bastion.port == stack.ssh_port
    assert Path(cfg.bastion.key_file).is_file() and Path(cfg.bastion.known_hosts).is_file()
    assert {c.name: (c.port, c.db_role) for c in cfg.clusters} == {
        n: (c.port, f"{n}-ro") for n, c in stack.clusters.items()}
    assert cfg.aws.endpoint_urls["sso-oidc"] == stack.sso_endpoint + "/oidc.{region}"


@pytest.mark.parametrize("transport", ["ssm-ssh", "ssm-port-forward"])
def test_daemon_config_for_ssm_transports_is_valid(stack, tmp_path, transport):
    path = tmp_path / "config.toml"
    path.write_text(stack.daemon_config(transport))
    cfg = load_config(path)
    assert cfg.bastion.transport == transport and cfg.bastion.instance_id == stack.bastion_instance_id
    assert cfg.aws.endpoint_urls["ssm"] == (stack.ssm_endpoint or stack.aws_endpoint)


def test_aws_config_has_sso_profile(stack):
    parser = configparser.ConfigParser()
    parser.read(stack.aws_config_file)
    profile = parser[f"profile {stack.profile}"]
    assert profile["sso_session"] == stack.sso_session_name
    assert profile["sso_role_name"] == "db-developer"
    assert parser[f"sso-session {stack.sso_session_name}"]["sso_start_url"] == stack.sso_start_url
    env = stack.env()
    assert env["AWS_ENDPOINT_URL_SSO_OIDC"] == stack.oidc_url()
    assert env["AWS_ENDPOINT_URL_STS"] == stack.aws_endpoint
    assert env["HOME"] == stack.home and "AWS_ACCESS_KEY_ID" not in env


def test_to_json_masks_secrets(stack):
    data = stack.to_json()
    text = repr(data)
    assert stack.root_token not in text and stack.secret_access_key not in text
    assert stack.clusters["orders"].admin_password not in text
    assert data["services"]["sshd"]["pid"] == stack.sshd.pid
    assert stack.to_json(secrets=True)["root_token"] == stack.root_token


def test_moto_is_seeded_and_enforces_sigv4_and_iam(stack):
    import boto3
    from botocore.exceptions import ClientError

    def client(service, **creds):
        return boto3.client(service, endpoint_url=stack.aws_endpoint, region_name=stack.region, **creds)

    dev = stack.role_credentials("db-developer")
    found = client("ec2", **dev).describe_instances(Filters=[
        {"Name": f"tag:{k}", "Values": [v]} for k, v in stack.bastion_tags.items()] + [
        {"Name": "instance-state-name", "Values": ["running"]}])
    assert [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]] == [stack.bastion_instance_id]
    clusters = client("rds", **dev).describe_db_clusters()["DBClusters"]
    assert {c["DBClusterIdentifier"]: (c["Engine"], c["Port"]) for c in clusters} == {
        n: ("aurora-mysql", c.port) for n, c in stack.clusters.items()}
    cases = [
        ("sts", dict(aws_access_key_id=stack.access_key_id, aws_secret_access_key="x" * 40), "SignatureDoesNotMatch"),
        ("sts", dict(aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="x" * 40), "InvalidClientTokenId"),
        ("ec2", stack.role_credentials("analyst"), "AccessDenied"),   # signed fine, not allowed by IAM
    ]
    for service, creds, code in cases:
        with pytest.raises(ClientError) as info:
            c = client(service, **creds)
            c.get_caller_identity() if service == "sts" else c.describe_instances()
        assert info.value.response["Error"]["Code"] == code, (service, code)


def test_known_hosts_pins_the_sshd_host_key(stack):
    line = Path(stack.known_hosts).read_text().strip()
    assert line == f"[127.0.0.1]:{stack.ssh_port} {stack.host_key}"
    assert stack.host_key.startswith("ssh-ed25519 ")


# ------------------------------------------------------------------ fault methods

def test_sshd_kill_then_start_on_same_port(stack):
    port, old_pid = stack.ssh_port, stack.sshd.pid
    stack.sshd.kill()
    assert not pid_alive(old_pid) and refused(port)
    stack.sshd.start()
    assert stack.sshd.pid != old_pid and stack.sshd.port == port
    assert greeting(port).startswith(b"SSH-")


def test_freeze_hangs_and_thaw_answers(stack):
    port = stack.ssh_port
    stack.sshd.freeze()
    try:
        assert greeting(port, timeout=0.5) == b""   # accepted by the kernel, never answered
    finally:
        stack.sshd.thaw()
    assert greeting(port).startswith(b"SSH-")


def test_vault_front_pause_resume_keeps_openbao_state(stack):
    import hvac

    root = stack.root_vault()
    token = root.write("auth/token/create", {"policies": ["default"], "ttl": "5m"})["auth"]["client_token"]
    port = stack.vault_front.port
    stack.vault_front.pause()
    assert refused(port)
    stack.vault_front.resume()
    client = hvac.Client(url=stack.vault_addr, token=token)
    assert client.auth.token.lookup_self()["data"]["policies"] == ["default"]


def test_heal_brings_back_killed_and_frozen_services(stack):
    stack.moto.freeze()
    stack.sshd.kill()
    assert sorted(stack.heal()) == ["moto", "sshd"]
    assert greeting(stack.ssh_port).startswith(b"SSH-")
    assert not stack.moto.frozen and stack.heal() == []


# ------------------------------------------------------------------ teardown and failures

def test_stop_leaves_no_process_and_no_files(make_stack):
    import paramiko

    st = make_stack(clusters=("orders",))
    # an open SSH connection gives sshd a per-connection child in its own session
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", st.ssh_port, username=st.ssh_user, key_filename=st.ssh_key_file,
                   allow_agent=False, look_for_keys=False)
    try:
        assert wait_until(lambda: len(st.sshd.pids()) > 1, 5), "sshd has no connection child"
        pids = st.pids()
        assert len(pids) >= len(st.services)
        st.stop()
    finally:
        client.close()
    assert [p for p in pids if pid_alive(p)] == []
    assert not Path(st.dir).exists()
    st.stop()  # idempotent


def test_failing_service_fails_start_with_its_log_tail(monkeypatch):
    from dbtunneld.sandbox import sshd

    monkeypatch.setattr(sshd.Bastion, "config_text", lambda self: "NoSuchOption yes\n")
    st = Stack(StackOptions(clusters=("orders",), aws=False))
    with pytest.raises(StartError) as info:
        st.start()
    assert info.value.name == "sshd"
    assert "NoSuchOption" in info.value.log_tail and "NoSuchOption" in str(info.value)
    assert [p for s in st.services if s.pid for p in [s.pid] if pid_alive(p)] == []
    assert not Path(st.dir).exists()


def test_stale_stack_of_a_dead_owner_is_swept(tmp_path):
    import subprocess

    from dbtunneld.sandbox.stack import sweep_stale_stacks

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "dbtunneld-sandbox-stale"
    (stale / "sshd").mkdir(parents=True)
    (stale / "owner.pid").write_text(str(dead.pid))
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(stale / "sshd" / "cfg")],
                              start_new_session=True)
    live = tmp_path / "dbtunneld-sandbox-live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    cmdline = Path(f"/proc/{orphan.pid}/cmdline")          # until exec, it still shows pytest's command
    deadline = time.monotonic() + 10
    while str(stale).encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert sweep_stale_stacks(tmp_path) == [str(stale)]
        assert orphan.wait(timeout=5) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
    assert not stale.exists() and live.exists()


def test_concurrent_mariadb_installs_do_not_break_each_other(tmp_path):
    """Several stacks starting at once (parallel test runs) each install a datadir; with a
    shared /tmp the bootstraps deleted each other's temporary tables."""
    from concurrent.futures import ThreadPoolExecutor

    from dbtunneld.sandbox.mariadb import install_datadir

    def install(i: int) -> None:
        install_datadir(tmp_path / f"db{i}" / "data", tmp_path / f"db{i}.log", f"mariadb-{i}")

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(install, range(6)))
    assert all((tmp_path / f"db{i}" / "data" / "mysql" / "user.frm").exists() or
               (tmp_path / f"db{i}" / "data" / "mysql" / "global_priv.frm").exists() for i in range(6))


# ------------------------------------------------------------------ the process manager

def test_service_that_exits_reports_its_log(tmp_path):
    svc = Service(name="quitter", argv=[sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"],
                  log_path=tmp_path / "q.log", ready=lambda: False, start_timeout=10)
    with pytest.raises(StartError) as info:
        svc.start()
    assert "exited with status 3" in str(info.value) and "boom: bad flag" in info.value.log_tail


def test_service_not_ready_in_time_is_stopped(tmp_path):
    svc = Service(name="sleeper", argv=[sys.executable, "-c", "import time; time.sleep(60)"],
                  log_path=tmp_path / "s.log", ready=lambda: False, start_timeout=0.5)
    with pytest.raises(StartError, match="not ready after"):
        svc.start()
    assert not pid_alive(svc.pid)


def test_stop_escalates_to_sigkill(tmp_path):
    port = free_port()
    code = ("import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)")
    svc = Service(name="stubborn", argv=[sys.executable, "-c", code], log_path=tmp_path / "x.log",
                  ready=tcp_probe(port), port=port, stop_timeout=0.5)
    svc.start()
    pid = svc.pid
    svc.stop()
    assert not pid_alive(pid)
    assert svc.proc.returncode == -signal.SIGKILL


def test_restart_comes_back_on_the_same_port(tmp_path):
    port = free_port()
    code = ("import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
            f"s.bind(('127.0.0.1', {port})); s.listen()\nwhile True:\n c, _ = s.accept(); c.sendall(b'hi'); c.close()")
    svc = Service(name="echo", argv=[sys.executable, "-c", code], log_path=tmp_path / "e.log",
                  ready=banner_probe(port, b"hi"), port=port)
    try:
        svc.start()
        first = svc.pid
        svc.restart()
        assert svc.pid != first and greeting(port) == b"hi" and svc.starts == 2
    finally:
        svc.stop()
    assert not pid_alive(svc.pid)


# ------------------------------------------------------------------ `dbtunneld sandbox`

@pytest.mark.parametrize("options", [[], ["--sts-region", "eu-west-1", "--vault-namespace", "team-a"]],
                         ids=["default", "regional-sts-and-namespace"])
def test_sandbox_command_prints_a_working_login_and_cleans_up(options):
    import re
    import subprocess

    import pymysql

    proc = subprocess.Popen([sys.executable, "-m", "dbtunneld.ui.cli", "sandbox", "--no-daemon", *options],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ), start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "sandbox exited early:\n" + "".join(lines)
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        text = "".join(lines)
        cmd = re.search(r"orders: mysql -h 127\.0\.0\.1 -P (\d+) -u (\S+) -p (\S+)\n\s+password: (\S+)", text)
        assert cmd, text
        port, user, database, password = cmd.groups()
        workdir = re.search(r"everything under (\S+)\)", text).group(1)
        conn = pymysql.connect(host="127.0.0.1", port=int(port), user=user, password=password, database=database)
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM orders")
            assert cur.fetchone() == (300,)
        conn.close()
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout.split()]
        assert len(pids) >= 6   # every server but OpenBao names the work dir in its argv
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, rest
    assert "stopped; no process or file left behind" in rest
    assert [p for p in pids if pid_alive(p)] == [] and not Path(workdir).exists()


# ------------------------------------------------------------------ `dbtunneld sandbox` as a newcomer sees it

def _wait_for_line(path: Path, needle: str, proc, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        assert proc.poll() is None, "sandbox exited early:\n" + text
        time.sleep(0.2)
    raise AssertionError(f"no {needle!r} within {timeout:g} s:\n" + (path.read_text() if path.exists() else ""))


def _run(argv: list[str], env: dict[str, str], timeout: float = 90):
    import subprocess

    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_sandbox_piped_through_tee_as_a_newcomer_uses_it(tmp_path):
    """`dbtunneld sandbox | tee`, then in "another terminal" only the printed export line and
    commands; a daemon restarted by hand; Ctrl-C to the whole pipeline (issue 15, point 7)."""
    import json
    import re
    import shlex
    import shutil
    import subprocess

    from dbtunneld.core.paths import process_identity

    real_home = tmp_path / "real-home"                 # stands for the user's own home
    real_home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "DBTUNNELD_", "XDG_CONFIG", "XDG_STATE", "XDG_DATA", "XDG_CACHE"))}
    env["HOME"] = str(real_home)
    out, err = tmp_path / "tee.out", tmp_path / "sandbox.stderr"
    line = (f"{shlex.quote(sys.executable)} -m dbtunneld.ui.cli sandbox --no-tray --base-port {free_port()} "
            f"2>{shlex.quote(str(err))} | tee {shlex.quote(str(out))} >/dev/null")
    proc = subprocess.Popen(["sh", "-c", line], env=env, cwd=tmp_path, start_new_session=True)
    by_hand = None
    try:
        text = _wait_for_line(out, "Ctrl-C stops", proc, 120)
        lines = text.splitlines()
        # one config line, and the AWS config the daemon really uses
        config_lines = [ln for ln in lines if "config.toml" in ln]
        assert len(config_lines) == 1, config_lines
        aws_config = re.search(r"AWS config: (\S+)", text).group(1)
        export = next(ln.strip() for ln in lines if ln.strip().startswith("export "))
        assert sum(1 for ln in lines if "export " in ln and "DBTUNNELD_HOME" in ln) == 1
        user_env = dict(item.split("=", 1) for item in shlex.split(export)[1:])
        shell = {"PATH": env["PATH"], "PYTHONPATH": env.get("PYTHONPATH", ""), **user_env}
        assert user_env["AWS_CONFIG_FILE"] == aws_config and Path(aws_config).is_file()
        status_cmd = next(ln.strip() for ln in lines if ln.strip().endswith(" status"))
        cli = shlex.split(status_cmd)[:-1]
        assert shutil.which(cli[0], path=env["PATH"]) or Path(cli[0]).is_file(), f"{cli[0]} cannot be run as printed"
        assert "the CLI below" not in text
        # every command works with only the export line
        st = json.loads(_run(cli + ["status", "--json"], shell).stdout)
        daemon_pid = st["pid"]
        assert config_lines[0].split("config: ", 1)[1].strip() == st["config_path"]
        daemon_env = Path(f"/proc/{daemon_pid}/environ").read_bytes().decode().split("\0")
        assert f"AWS_CONFIG_FILE={aws_config}" in daemon_env
        transports = {t["name"]: t["transport"] for t in st["tunnels"]}
        assert transports == {"orders": "ssh", "billing": "ssm-ssh"} and "ssm-ssh" in text
        doctor = _run(cli + ["doctor"], shell, timeout=120)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert _run(cli + ["creds", "orders"], shell).returncode == 0
        # the daemon's log: no traceback, no false claim
        log_text = Path(re.search(r"log: (\S+)", text).group(1)).read_text()
        assert "Traceback" not in log_text and "SSOTokenLoadError" not in log_text, log_text[-3000:]
        assert "will need a new sign-in" not in log_text
        # restarted by hand: stop, then `connect` starts a new daemon, without a new sign-in
        assert _run(cli + ["stop"], shell).returncode == 0
        started = _run(cli + ["connect", "orders", "--wait", "45"], shell, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        by_hand = json.loads(_run(cli + ["status", "--json"], shell).stdout)["pid"]
        assert by_hand != daemon_pid and process_identity(by_hand) is not None
        # Ctrl-C to the whole pipeline: tee dies with it
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if by_hand and process_identity(by_hand) is not None:
            os.kill(by_hand, signal.SIGKILL)
            pytest.fail(f"the daemon restarted by hand (pid {by_hand}) was left running")
    stderr = err.read_text()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert list(real_home.rglob("*")) == [], "the sandbox wrote into the real home"
