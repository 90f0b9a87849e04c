"""Command boundaries in a client's upload, for the forwarding loop (``forward_link.Link``).

In the MySQL command phase every client command is a packet with sequence id 0 whose first
payload byte is the command. ``CommandWatch`` follows the client -> server byte stream reading
only packet headers (payload bytes are skipped by counting, not looked at) and stops at the first
packet of one command (``COM_CHANGE_USER`` for the local login): the loop sends what came before
it, and hands the connection to ``handler`` on a worker thread, with the command's bytes
(``held``). Cost on the hot path: one comparison per chunk inside a packet, a few slices per
packet header.

Not told apart: a ``LOAD DATA LOCAL`` file packet whose sequence id wrapped to 0 and whose first
byte is the command's (the handler then refuses a malformed packet and the connection ends).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

HEADER = 4

# handler(client, upstream, held) -> bytes the client sent after the command (usually none);
# both sockets blocking; it raises to end the connection.
Handler = Callable[[socket.socket, socket.socket, bytes], bytes]


class CommandWatch:
    """Follows packet headers of the upload; ``feed`` returns what may go upstream now."""

    def __init__(self, command: int, handler: Handler) -> None:
        self.command = command
        self.handler = handler
        self._skip = 0              # payload bytes of the current packet still to come
        self._carry = b""           # a packet's first bytes, held until its command byte is seen
        self.held: bytes | None = None   # from the watched command on: the handler's

    def feed(self, data: bytes) -> bytes:
        if not self._carry and self._skip >= len(data):     # inside a packet: the hot path
            self._skip -= len(data)
            return data
        if self._carry:
            data, self._carry = self._carry + data, b""
        pos, end = self._skip, len(data)
        while pos < end:
            if end - pos < HEADER:
                return self._hold_from(data, pos)
            length = int.from_bytes(data[pos:pos + 3], "little")
            if length == 0:
                pos += HEADER
                continue
            if end - pos == HEADER:
                return self._hold_from(data, pos)
            if data[pos + 3] == 0 and data[pos + HEADER] == self.command:
                self.held, self._skip = data[pos:], 0
                return data[:pos]
            pos += HEADER + length
        self._skip = pos - end
        return data

    def _hold_from(self, data: bytes, pos: int) -> bytes:
        self._carry, self._skip = data[pos:], 0
        return data[:pos]

    def flush(self) -> bytes:
        """At the client's end: whatever was carried goes up as it is."""
        carry, self._carry = self._carry, b""
        return carry

    def reset(self) -> None:
        """After the handler: the next byte starts a packet."""
        self._skip, self._carry, self.held = 0, b"", None


@dataclass(frozen=True)
class Handoff:
    """What a tunnel's ``before_relay`` may return instead of a bare socket: the socket to
    relay, the watch its upload goes through, and what stands for the server when it is not
    the channel itself (a TLS bridge)."""
    client: socket.socket
    commands: CommandWatch | None = None
    server: socket.socket | None = None
