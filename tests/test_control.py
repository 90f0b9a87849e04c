"""The control server on a real Unix socket: framing, errors, events, peer uid, cleanup."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dbtunneld.core import errors
from dbtunneld.engine import engine_loop
from dbtunneld.process import control, protocol as P
from dbtunneld.process.client import Client, DaemonNotRunning

NOBODY = 65534


@pytest.fixture
def rundir():
    d = Path(tempfile.mkdtemp(prefix="dbt-ctl-", dir="/tmp")) / "run"
    yield d
    shutil.rmtree(d.parent, ignore_errors=True)


class FakeDaemon:
    """A dispatch function with scripted answers."""

    def __init__(self):
        self.calls = []

    def __call__(self, req: P.Request):
        self.calls.append(req)
        if req.cmd == "status":
            return {"tunnels": [], "n": len(self.calls)}
        if req.cmd == "connect" and req.args.get("name") == "busy":
            raise errors.PortInUseError(13306, "pid 9 (nc)")
        if req.cmd == "connect" and req.args.get("name") == "boom":
            raise ZeroDivisionError("division by zero")
        if req.cmd == "creds":
            return {"username": "u"}
        return {"cmd": req.cmd, "args": req.args}


@pytest.fixture
def server(rundir):
    srv = control.ControlServer(rundir / "control.sock", FakeDaemon()).start()
    yield srv
    srv.close()


def raw(server, payload: bytes, *, read_lines: int = 1, timeout: float = 5.0) -> list[dict]:
    """Send raw bytes; return the first read_lines JSON replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(server.path))
        s.sendall(payload)
        return read_replies(s, read_lines)


def read_replies(s: socket.socket, n: int) -> list[dict]:
    data = b""
    while data.count(b"\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(x) for x in data.splitlines()[:n]]


def test_request_round_trip_and_modes(server, rundir):
    assert Client(server.path).request("status")["tunnels"] == []
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700


def test_error_kinds_reach_the_client(server):
    c = Client(server.path)
    with pytest.raises(errors.PortInUseError) as info:
        c.request("connect", name="busy")
    assert info.value.port == 13306 and "pid 9" in info.value.message
    with pytest.raises(P.RemoteError) as info:
        c.request("connect", name="boom")
    assert info.value.kind == "internal"
    assert c.request("status")["tunnels"] == []   # still serving


def test_malformed_line_gets_a_reply_and_the_connection_goes_on(server):
    replies = raw(server, b"garbage\n" + P.encode_request(5, "status"), read_lines=2)
    assert replies[0]["ok"] is False and replies[0]["error"]["kind"] == "malformed"
    assert replies[0]["id"] is None
    assert replies[1]["ok"] is True and replies[1]["id"] == 5


def test_unknown_command_keeps_the_id(server):
    [reply] = raw(server, b'{"v":1,"id":9,"cmd":"rm","args":{}}\n')
    assert reply["id"] == 9 and reply["error"]["kind"] == "unknown_command"
    assert "status" in reply["error"]["hint"]


def test_oversized_line_is_refused_without_buffering_it(server):
    big = b'{"v":1,"id":1,"cmd":"status","args":{"x":"' + b"a" * (P.MAX_REQUEST_BYTES * 3) + b'"}}\n'
    replies = raw(server, big + P.encode_request(2, "status"), read_lines=2)
    assert replies[0]["error"]["kind"] == "too_large"
    assert replies[1]["ok"] is True


def test_client_sending_only_garbage_is_dropped(server):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(server.path))
        s.sendall(b"x\n" * (control.MAX_BAD_LINES + 10))
        replies = read_replies(s, control.MAX_BAD_LINES + 10)
    assert len(replies) == control.MAX_BAD_LINES       # then the daemon hung up
    assert Client(server.path).request("status")


def test_truncated_line_then_close_leaves_server_up(server):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.path))
        s.sendall(b'{"v":1,"id":1,"cmd":"sta')
    assert Client(server.path).request("status")


def test_random_bytes_fuzz(server):
    rng = random.Random(1234)
    for _ in range(40):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(server.path))
            try:
                s.sendall(blob + (b"\n" if rng.random() < 0.5 else b""))
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                pass          # dropped by the daemon: allowed
    assert Client(server.path).request("status")
    deadline = time.monotonic() + 5
    while server.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.clients == 0


def test_subscribe_streams_snapshot_then_events(server):
    with Client(server.path).subscribe() as sub:
        events = iter(sub)
        first = next(events)
        assert first.event == "status" and first.data["tunnels"] == []
        wait_for(lambda: server.bus.subscribers == 1)
        server.bus.publish("tunnel", {"name": "orders", "state": "up"})
        assert next(events) == P.Event("tunnel", {"name": "orders", "state": "up"})
    wait_for(lambda: server.bus.subscribers == 0)


def test_close_wakes_a_blocked_subscriber(server):
    sub = Client(server.path).subscribe()
    got = []
    t = threading.Thread(target=lambda: got.extend(sub))
    t.start()
    wait_for(lambda: len(got) == 1)
    sub.close()
    t.join(5)
    assert not t.is_alive()


def test_slow_subscriber_is_dropped_not_the_daemon(server, monkeypatch):
    monkeypatch.setattr(control, "EVENT_QUEUE", 4)
    with socket.socket(socket.AF_UNIX) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(server.path))
        s.sendall(P.encode_request(1, "subscribe"))
        wait_for(lambda: server.bus.subscribers == 1)
        payload = {"blob": "z" * 60000}
        for _ in range(200):                      # never read: the daemon's queue overflows
            server.bus.publish("noise", payload)
            if server.bus.subscribers == 0:
                break
        wait_for(lambda: server.bus.subscribers == 0)   # publish hands the event to the loop
        wait_for(lambda: server.clients == 0)           # and the slow client's connection is dropped
    assert Client(server.path).request("status")


def test_other_uid_is_refused(rundir):
    srv = control.ControlServer(rundir / "control.sock", FakeDaemon(), allowed_uid=os.getuid() + 4242).start()
    try:
        with pytest.raises(errors.PermissionDeniedError) as info:
            Client(srv.path).request("status")
        assert f"uid {os.getuid()}" in info.value.message
        assert srv.dispatch.calls == []
    finally:
        srv.close()


def test_peer_credentials_name_us():
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        cred = control.peer_credentials(a)
    assert cred.uid == os.getuid() and cred.pid in (os.getpid(), None)


def _connect_as_nobody(path: Path) -> str:
    """Fork a child that drops to uid 65534, connects and reports what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        result = "?"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(path))
                s.sendall(P.encode_request(1, "stop"))
                result = s.recv(65536).decode() or "closed"
        except PermissionError:
            result = "EACCES"
        except BaseException as exc:  # report anything to the parent
            result = f"error {exc!r}"
        finally:
            os.write(w, result.encode()[:4000])
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_nobody_cannot_reach_the_socket_through_the_0700_dir(server, rundir):
    os.chmod(rundir.parent, 0o711)      # only the runtime dir's own 0700 stands in the way
    os.chmod(server.path, 0o666)
    assert _connect_as_nobody(server.path) == "EACCES"
    assert server.dispatch.calls == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_nobody_is_refused_by_peer_uid_even_when_the_socket_is_reachable(server, rundir):
    os.chmod(rundir.parent, 0o711)      # loosen both layers so only the uid check stands
    os.chmod(rundir, 0o711)
    os.chmod(server.path, 0o666)
    reply = json.loads(_connect_as_nobody(server.path).splitlines()[0])
    assert reply["ok"] is False and reply["error"]["kind"] == "permission_denied"
    assert f"uid {NOBODY}" in reply["error"]["message"]
    assert server.dispatch.calls == []               # `stop` never reached the daemon
    assert Client(server.path).request("status")


def test_close_removes_socket_and_ends_threads(rundir):
    srv = control.ControlServer(rundir / "control.sock", FakeDaemon()).start()
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(str(srv.path))
    wait_for(lambda: srv.clients == 1)
    [conn] = list(srv._clients)
    srv.close()
    srv.close()                                      # idempotent
    assert not srv.path.exists()
    assert idle.recv(10) == b""
    idle.close()
    assert conn.task.done()
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith(("control-", srv.engine.name))],
             timeout=2)                              # the loop's thread, its pool and the snapshot thread
    with pytest.raises(DaemonNotRunning):
        Client(srv.path).request("status")


def test_stale_socket_file_is_replaced(rundir):
    rundir.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(rundir / "control.sock"))
    stale.close()
    with control.ControlServer(rundir / "control.sock", FakeDaemon()) as srv:
        assert Client(srv.path).request("status")


def test_loose_runtime_dir_is_tightened(rundir):
    rundir.mkdir(mode=0o755)
    os.chmod(rundir, 0o755)
    control.prepare_runtime_dir(rundir)
    assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown")
def test_runtime_dir_of_another_user_is_refused(rundir):
    rundir.mkdir(mode=0o700)
    os.chown(rundir, NOBODY, NOBODY)
    with pytest.raises(errors.PermissionDeniedError):
        control.prepare_runtime_dir(rundir)


def test_too_long_socket_path_is_a_clear_error(rundir):
    with pytest.raises(errors.PermissionDeniedError) as info:
        control.bind_control_socket(rundir / ("x" * 120) / "control.sock")
    assert "DBTUNNELD_HOME" in info.value.hint


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# ---- nobody locks the owner out (issue 15, point 4) -----------------------------------------

def test_a_client_without_a_complete_request_is_dropped(rundir, monkeypatch):
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.2)      # the reader's tick
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.5)
    with control.ControlServer(rundir / "control.sock", FakeDaemon()) as srv:
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(str(srv.path))
        slow.sendall(b'{"id": 1, "cmd": "sta')             # never finished
        sub = Client(srv.path).subscribe()
        events = iter(sub)
        assert next(events).event == "status"
        slow.settimeout(5)
        started = time.monotonic()
        assert slow.recv(100) == b"", "the server closes a client that never completes a request"
        took = time.monotonic() - started
        srv.bus.publish("ping", {"n": 1})
        assert next(events).event == "ping", "a quiet subscriber is not idle"
        sub.close()
        slow.close()
    assert took < 3


def test_subscribers_are_capped_apart_and_requests_still_served(server):
    subs = [Client(server.path).subscribe() for _ in range(control.MAX_SUBSCRIBERS)]
    try:
        for s in subs:
            assert next(iter(s)).event == "status"
        extra = Client(server.path).subscribe()
        with pytest.raises(errors.DbtunneldError, match="subscribers"):
            next(iter(extra))
        extra.close()
        assert Client(server.path).request("status")["tunnels"] == []
    finally:
        for s in subs:
            s.close()


# ---- one asyncio loop (issue 16) -------------------------------------------------------------

class HungReloadDaemon(FakeDaemon):
    """``reload`` blocks until released, like a reload against a Vault that hangs."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.reloading = threading.Semaphore(0)

    def __call__(self, req: P.Request):
        if req.cmd == "reload":
            self.reloading.release()
            assert self.release.wait(30)
        return super().__call__(req)


def _send_without_waiting(path: Path, cmd: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.sendall(P.encode_request(1, cmd))
    return s


def _timed_status(path: Path) -> float:
    started = time.monotonic()
    assert Client(path).request("status", timeout=5)["tunnels"] == []
    return time.monotonic() - started


def test_status_answers_at_once_while_reload_hangs(rundir):
    daemon = HungReloadDaemon()
    with control.ControlServer(rundir / "control.sock", daemon) as srv:
        hung = _send_without_waiting(srv.path, "reload")
        assert daemon.reloading.acquire(timeout=5)
        took = max(_timed_status(srv.path) for _ in range(5))
        print(f"status while reload hangs: slowest of 5 in {took * 1000:.1f} ms")
        assert took < 0.5
        daemon.release.set()
        hung.settimeout(5)
        assert read_replies(hung, 1)[0]["ok"] is True       # the reload still gets its answer
        hung.close()


def test_status_answers_while_commands_and_the_engine_pool_are_all_stuck(rundir):
    """More hung commands than COMMAND_SLOTS, and every engine worker busy with a hung blocking
    call (keepers against a hung Vault): status has its own thread, so it still answers."""
    daemon = HungReloadDaemon()
    with control.ControlServer(rundir / "control.sock", daemon) as srv:
        hung = [_send_without_waiting(srv.path, "reload") for _ in range(control.COMMAND_SLOTS + 3)]
        for _ in range(control.COMMAND_SLOTS):
            assert daemon.reloading.acquire(timeout=5)
        pool_stuck = [srv.engine.submit(srv.engine.run_blocking(daemon.release.wait, 30))
                      for _ in range(engine_loop.DEFAULT_WORKERS)]
        took = max(_timed_status(srv.path) for _ in range(5))
        print(f"status with {len(hung)} hung reloads and a full engine pool: slowest of 5 in {took * 1000:.1f} ms")
        assert took < 0.5
        assert not daemon.reloading.acquire(timeout=0.2), "only COMMAND_SLOTS blocking commands run at once"
        daemon.release.set()
        for s in hung:
            s.settimeout(10)
            assert read_replies(s, 1)[0]["ok"] is True       # queued ones are served once slots free up
            s.close()
        for f in pool_stuck:
            assert f.result(5) is True


def test_an_async_dispatch_is_awaited_on_the_loop(rundir):
    release = asyncio.Event()
    seen_on = []

    async def dispatch(req: P.Request):
        seen_on.append(threading.current_thread().name)
        if req.cmd == "reload":
            await release.wait()
        return {"cmd": req.cmd, "tunnels": []}

    with control.ControlServer(rundir / "control.sock", dispatch) as srv:
        hung = _send_without_waiting(srv.path, "reload")
        wait_for(lambda: len(seen_on) == 1)
        took = _timed_status(srv.path)
        print(f"status while an async reload waits: {took * 1000:.1f} ms")
        assert took < 0.5
        srv.engine.call(release.set)
        hung.settimeout(5)
        assert read_replies(hung, 1)[0]["result"]["cmd"] == "reload"
        hung.close()
        assert set(seen_on) == {srv.engine.name}


def test_a_command_past_its_bound_gets_a_transient_error(rundir, monkeypatch):
    monkeypatch.setattr(control, "COMMAND_TIMEOUT", 0.3)
    daemon = HungReloadDaemon()
    with control.ControlServer(rundir / "control.sock", daemon) as srv:
        with pytest.raises(errors.TransientError, match="`reload` did not finish within 0.3 s"):
            Client(srv.path).request("reload", timeout=5)
        assert Client(srv.path).request("status")["tunnels"] == []
        daemon.release.set()


def test_events_published_from_any_thread_arrive_in_order(server):
    with Client(server.path).subscribe() as sub:
        events = iter(sub)
        assert next(events).event == "status"
        wait_for(lambda: server.bus.subscribers == 1)
        worker = threading.Thread(target=lambda: [server.bus.publish("n", i) for i in range(50)])
        worker.start()
        worker.join(5)

        async def from_the_loop():
            server.bus.publish("n", 50)
        server.engine.run(from_the_loop(), timeout=5)
        assert [next(events).data for _ in range(51)] == list(range(51))


def test_a_given_engine_is_left_running(rundir):
    with engine_loop.EngineLoop(name="t-shared") as engine:
        bus = control.EventBus(engine)
        with control.ControlServer(rundir / "control.sock", FakeDaemon(), bus, engine=engine) as srv:
            assert srv.bus is bus
            assert Client(srv.path).request("status")["tunnels"] == []

        async def alive():
            return True
        assert engine.run(alive(), timeout=5)


def test_threads_do_not_grow_with_clients(rundir):
    """20 clients, 5 of them subscribed: the server's threads stay a handful (before issue 16:
    an accept thread, one per client and one per subscriber: 26)."""
    before = threading.active_count()
    with control.ControlServer(rundir / "control.sock", FakeDaemon()) as srv:
        started = threading.active_count()
        subs = [Client(srv.path).subscribe() for _ in range(5)]
        for s in subs:
            assert next(iter(s)).event == "status"
        idle = [_send_without_waiting(srv.path, cmd) for cmd in ("status", "renew") * 5]
        idle += [socket.socket(socket.AF_UNIX) for _ in range(5)]
        for s in idle[10:]:
            s.connect(str(srv.path))
        for s in idle[:10]:
            s.settimeout(5)
            assert read_replies(s, 1)[0]["ok"] is True       # on the snapshot thread and on the engine's pool
        wait_for(lambda: srv.clients == 20)
        srv.bus.publish("ping", {})
        for s in subs:
            assert next(iter(s)).event == "ping"
        during = threading.active_count()
        print(f"threads: {before} before the server, {started} listening, {during} with 20 clients "
              f"(5 subscribed): the server uses {during - before}")
        assert during - before <= 6
        for s in idle + subs:
            s.close()


def test_close_sends_the_events_already_published(rundir):
    srv = control.ControlServer(rundir / "control.sock", FakeDaemon()).start()
    subs = [Client(srv.path).subscribe() for _ in range(3)]
    got: list[list[str]] = [[] for _ in subs]
    readers = [threading.Thread(target=lambda s=s, g=g: g.extend(e.event for e in s)) for s, g in zip(subs, got)]
    try:
        for t in readers:
            t.start()
        wait_for(lambda: srv.bus.subscribers == 3 and all(got))
        for i in range(30):
            srv.bus.publish("n", {"i": i, "pad": "x" * 20000})
        srv.bus.publish("stopping", {"pid": os.getpid()})
        srv.close()
        for t in readers:
            t.join(5)
        assert got == [["status"] + ["n"] * 30 + ["stopping"]] * 3, "every event published before close arrives"
    finally:
        for s in subs:
            s.close()


def test_close_cuts_off_a_client_that_does_not_read(rundir):
    srv = control.ControlServer(rundir / "control.sock", FakeDaemon()).start()
    stuck = socket.socket(socket.AF_UNIX)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(str(srv.path))
    stuck.sendall(P.encode_request(1, "subscribe"))
    wait_for(lambda: srv.bus.subscribers == 1)
    for i in range(20):
        srv.bus.publish("n", {"i": i, "pad": "x" * 60000})
    started = time.monotonic()
    srv.close(answer_grace=0.5)
    took = time.monotonic() - started
    stuck.settimeout(5)
    while stuck.recv(1 << 20):                           # what was sent, then EOF: the socket is closed
        pass
    stuck.close()
    assert took < 3, f"close took {took:.1f} s"
