"""CommandWatch: command boundaries in a client's upload, from packet headers only."""

from __future__ import annotations

import random

from dbtunneld.adapters import mysqlwire as w
from dbtunneld.adapters.command_watch import CommandWatch


def _never(*_args):
    raise AssertionError("no handler in these tests")


def packets(*payloads: bytes, seq: int = 0) -> bytes:
    return b"".join(w.frame(p, seq) for p in payloads)


def feed_in_pieces(watch: CommandWatch, stream: bytes, sizes: list[int]) -> bytes:
    """What the watch lets go up when ``stream`` arrives in chunks of ``sizes``."""
    out, pos = b"", 0
    for n in sizes:
        out += watch.feed(stream[pos:pos + n])
        pos += n
        if watch.held is not None:
            return out
    return out + watch.flush()


def test_stops_at_the_command_and_hands_over_its_bytes():
    before = packets(b"\x03SELECT 1", b"\x03" + b"\x11" * 300)      # 0x11 inside payloads: not a command
    command = w.frame(b"\x11orders\0", 0)
    watch = CommandWatch(w.COM_CHANGE_USER, _never)
    assert watch.feed(before + command) == before
    assert watch.held == command


def test_any_chunking_gives_the_same_boundary():
    before = packets(b"\x03SELECT 1", b"", b"\x03" + b"\x11" * 1000, b"\x0e")
    command = w.frame(b"\x11orders\0" + b"x" * 50, 0)
    stream = before + command
    rnd = random.Random(7)
    for _ in range(300):
        watch = CommandWatch(w.COM_CHANGE_USER, _never)
        sizes = [rnd.randint(1, 9) for _ in range(len(stream))]
        sent = feed_in_pieces(watch, stream, sizes)
        assert sent == before
        assert sent + watch.held == stream[:len(sent) + len(watch.held)]
        assert stream.startswith(sent + watch.held)


def test_continuation_and_file_packets_are_not_commands():
    file_data = w.frame(b"\x11 a LOAD DATA chunk", 2)                # sequence id 2: not a command
    watch = CommandWatch(w.COM_CHANGE_USER, _never)
    assert watch.feed(file_data) == file_data and watch.held is None


def test_a_header_split_over_reads_is_held_back_until_its_command_byte():
    command = w.frame(b"\x11orders\0", 0)
    watch = CommandWatch(w.COM_CHANGE_USER, _never)
    assert watch.feed(command[:3]) == b""                         # nothing of it may go up yet
    assert watch.feed(command[3:4]) == b""
    assert watch.feed(command[4:]) == b"" and watch.held == command


def test_reset_starts_at_a_packet_boundary_and_flush_gives_back_a_carried_header():
    watch = CommandWatch(w.COM_CHANGE_USER, _never)
    watch.feed(w.frame(b"\x11x", 0))
    watch.reset()
    query = w.frame(b"\x03SELECT 2", 0)
    assert watch.feed(query) == query and watch.held is None
    assert watch.feed(b"\x05\x00") == b"" and watch.flush() == b"\x05\x00"
