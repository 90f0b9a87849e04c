"""The control socket itself: the 0700 runtime directory, the 0600 socket bound in it, and who
is connecting (SO_PEERCRED on Linux, getpeereid on macOS/BSD). The server (``control``) serves it."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..core.errors import PermissionDeniedError
from ..core.paths import short_socket_hint

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 32
SUN_PATH_MAX = 104 if sys.platform == "darwin" else 108


class _HasSocketOptions(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...
    def fileno(self) -> int: ...


# ----------------------------------------------------------------------------- peer credentials

@dataclass(frozen=True)
class PeerCred:
    pid: int | None
    uid: int
    gid: int


def peer_credentials(sock: _HasSocketOptions) -> PeerCred | None:
    """The connecting process's uid (and pid where the OS tells); None when unknown."""
    if hasattr(socket, "SO_PEERCRED"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCred(pid or None, uid, gid)
    return _getpeereid(sock)


def _getpeereid(sock: _HasSocketOptions) -> PeerCred | None:
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    if libc is None or not hasattr(libc, "getpeereid"):
        return None
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        return None
    return PeerCred(None, uid.value, gid.value)


# ----------------------------------------------------------------------------- socket setup

def prepare_runtime_dir(path: Path) -> None:
    """Create the runtime directory as 0700, or refuse one that another user owns."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionDeniedError(f"{path} is not a directory owned by you",
                                    "remove it or point DBTUNNELD_HOME / XDG_RUNTIME_DIR elsewhere")
    if stat.S_IMODE(st.st_mode) != 0o700:
        log.warning("runtime directory %s had mode %o; setting 0700", path, stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)


def bind_control_socket(path: Path) -> socket.socket:
    """Bind and listen on ``path`` (mode 0600); the caller holds the daemon lock, so a leftover is stale."""
    if len(os.fsencode(str(path))) >= SUN_PATH_MAX:
        raise PermissionDeniedError(f"control socket path {path} is longer than {SUN_PATH_MAX - 1} bytes",
                                    short_socket_hint())
    prepare_runtime_dir(path.parent)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
