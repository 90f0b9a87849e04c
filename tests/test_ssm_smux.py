"""smux v1 frames and the client multiplexer (dbtunneld.adapters.ssm.smux)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from dbtunneld.adapters.ssm import smux
from dbtunneld.core.errors import ClosedError, ProtocolError


def test_frame_layout_is_smux_v1_little_endian():
    raw = smux.encode_frame(smux.PSH, 3, b"abc")
    assert raw == bytes([1, smux.PSH]) + struct.pack("<H", 3) + struct.pack("<I", 3) + b"abc"
    assert smux.encode_frame(smux.SYN, 0x01020304) == b"\x01\x00\x00\x00\x04\x03\x02\x01"


def test_large_data_is_split_into_max_frames():
    data = bytes(range(256)) * 300  # 76800 bytes
    frames = smux.FrameParser().feed(smux.encode_data(5, data))
    assert [len(f.data) for f in frames] == [32768, 32768, 11264]
    assert b"".join(f.data for f in frames) == data and {f.sid for f in frames} == {5}


def test_parser_handles_frames_split_at_any_byte():
    stream = smux.encode_frame(smux.SYN, 3) + smux.encode_frame(smux.PSH, 3, b"hello") + smux.encode_frame(smux.FIN, 3)
    parser = smux.FrameParser()
    frames = []
    for i in range(len(stream)):
        frames += parser.feed(stream[i : i + 1])
    assert frames == [smux.Frame(smux.SYN, 3), smux.Frame(smux.PSH, 3, b"hello"), smux.Frame(smux.FIN, 3)]


def test_parser_rejects_other_versions_and_unknown_commands():
    with pytest.raises(ProtocolError, match="version"):
        smux.FrameParser().feed(b"\x02\x02\x00\x00\x01\x00\x00\x00")
    with pytest.raises(ProtocolError, match="command"):
        smux.FrameParser().feed(b"\x01\x09\x00\x00\x01\x00\x00\x00")


def test_oversized_frame_data_is_refused():
    with pytest.raises(ValueError):
        smux.encode_frame(smux.PSH, 1, bytes(65536))


class Pipe:
    """What the multiplexer writes to the data channel, parsed back into frames."""

    def __init__(self) -> None:
        self.parser = smux.FrameParser()
        self.frames: list[smux.Frame] = []
        self.changed = asyncio.Event()

    async def send(self, data: bytes) -> None:
        self.frames += self.parser.feed(data)
        self.changed.set()

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not predicate(self.frames):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)


async def recv_until(sock, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.run_in_executor(None, sock.recv, 65536)
        if not chunk:
            break
        data += chunk
    return data


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_client_streams_use_odd_ids_and_relay_both_ways():
    async def scenario() -> None:
        pipe = Pipe()
        mux = smux.MuxClient(pipe.send)
        mux.start()
        a = await mux.open_stream()
        b = await mux.open_stream()
        await pipe.wait_for(lambda fs: len(fs) >= 2)
        assert pipe.frames[:2] == [smux.Frame(smux.SYN, 3), smux.Frame(smux.SYN, 5)]
        a.sendall(b"ping from a")
        await pipe.wait_for(lambda fs: any(f.cmd == smux.PSH and f.sid == 3 for f in fs))
        assert b"".join(f.data for f in pipe.frames if f.sid == 3 and f.cmd == smux.PSH) == b"ping from a"
        await mux.feed(smux.encode_frame(smux.PSH, 5, b"for b") + smux.encode_frame(smux.PSH, 3, b"for a"))
        assert await recv_until(b, 5) == b"for b"
        assert await recv_until(a, 5) == b"for a"
        a.close()
        b.close()
        await mux.close()

    run(scenario())


def test_remote_fin_gives_eof_after_the_data():
    async def scenario() -> None:
        pipe = Pipe()
        mux = smux.MuxClient(pipe.send)
        mux.start()
        sock = await mux.open_stream()
        await mux.feed(smux.encode_frame(smux.PSH, 3, b"last words") + smux.encode_frame(smux.FIN, 3))
        assert await recv_until(sock, 100) == b"last words"  # then EOF
        sock.close()
        await mux.close()

    run(scenario())


def test_local_close_sends_fin_and_forgets_the_stream_after_the_peers_fin():
    async def scenario() -> None:
        pipe = Pipe()
        mux = smux.MuxClient(pipe.send)
        mux.start()
        sock = await mux.open_stream()
        sock.close()
        await pipe.wait_for(lambda fs: smux.Frame(smux.FIN, 3) in fs)
        assert mux.stream_count == 1
        await mux.feed(smux.encode_frame(smux.FIN, 3))
        assert mux.stream_count == 0
        await mux.close()

    run(scenario())


def test_streams_opened_by_the_agent_are_refused():
    async def scenario() -> None:
        pipe = Pipe()
        mux = smux.MuxClient(pipe.send)
        mux.start()
        await mux.feed(smux.encode_frame(smux.SYN, 2))
        await pipe.wait_for(lambda fs: smux.Frame(smux.FIN, 2) in fs)
        await mux.close()

    run(scenario())


def test_keepalive_sends_nops_when_the_agent_wants_them():
    async def scenario() -> None:
        pipe = Pipe()
        mux = smux.MuxClient(pipe.send, keepalive=0.01)
        mux.start()
        await pipe.wait_for(lambda fs: sum(f.cmd == smux.NOP for f in fs) >= 2)
        await mux.close()

    run(scenario())


def test_closed_multiplexer_closes_local_sockets_and_refuses_new_streams():
    async def scenario() -> None:
        pipe = Pipe()
        mux = smux.MuxClient(pipe.send)
        mux.start()
        sock = await mux.open_stream()
        await mux.close()
        assert await recv_until(sock, 1) == b""
        with pytest.raises(ClosedError):
            await mux.open_stream()
        sock.close()

    run(scenario())
