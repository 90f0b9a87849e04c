"""What an SSM data channel is configured with (``ChannelOptions``) and the SSM API calls it makes
(``SessionService``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .api import Grant
from .channel_handshake import CLIENT_VERSION
from .reliability import GIVE_UP_AFTER


class SessionService(Protocol):
    """The SSM API calls the channel makes (blocking; run in a worker thread)."""

    def resume_session(self, session_id: str) -> Grant | None: ...

    def terminate_session(self, session_id: str) -> None: ...

    def websocket_headers(self, stream_url: str) -> dict[str, str]: ...

    def generate_data_key(self, key_id: str, context: dict[str, str]) -> tuple[bytes, bytes]: ...


@dataclass(frozen=True)
class ChannelOptions:
    client_version: str = CLIENT_VERSION
    max_payload: int = 1024  # bytes per message we send; AWS's own clients use 1024
    window: int = 1024  # messages we may run ahead of the oldest unacknowledged one
    reorder_capacity: int = 10_000
    handshake_timeout: float = 30.0
    open_timeout: float = 15.0
    resume_delays: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
    give_up_after: float = GIVE_UP_AFTER
    pause_cap: float = 3.0  # longest we honour a pause_publication nothing else cleared
    stall_after: float = 10.0  # unacknowledged data waiting this long with no acknowledgement: stalled
    terminate_timeout: float = 10.0
    ping_interval: float | None = 30.0
    max_message: int = 4 << 20
    ca_bundle: str | None = None  # trusted CAs for wss:// (AWS_CA_BUNDLE / the profile's ca_bundle)
