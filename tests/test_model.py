"""Status vocabulary: JSON round trips and the worst-state summary the tray icon shows."""

from __future__ import annotations

import json

import pytest

from dbtunneld.core.model import (CredentialState, CredentialStatus, DaemonStatus, Health, TunnelState,
                             TunnelStatus, overall_health)


def _status(tunnel_states=(), vault=CredentialState.VALID, aws=CredentialState.VALID):
    tunnels = tuple(TunnelStatus(name=f"c{i}", local_port=20000 + i, state=s) for i, s in enumerate(tunnel_states))
    return DaemonStatus(version="0", pid=1, started_at=0.0, config_path="c", log_path="l",
                        aws=CredentialStatus("aws", "p", aws), vault=CredentialStatus("vault", "v", vault),
                        tunnels=tunnels)


def test_round_trip_through_json_keeps_types():
    cred = CredentialStatus("db", "orders", CredentialState.VALID, identity="v-token-x", expires_at=5.0)
    status = _status([TunnelState.UP])
    status = DaemonStatus(**{**status.__dict__, "tunnels": (TunnelStatus("orders", 13306, TunnelState.UP, credential=cred),)})
    back = DaemonStatus.from_dict(json.loads(json.dumps(status.to_dict())))
    assert back == status
    assert back.tunnels[0].state is TunnelState.UP
    assert back.tunnels[0].credential.state is CredentialState.VALID


def test_from_dict_ignores_unknown_fields_from_newer_daemons():
    data = TunnelStatus("a", 1).to_dict() | {"added_later": 1}
    assert TunnelStatus.from_dict(data) == TunnelStatus("a", 1)


@pytest.mark.parametrize("tunnels,vault,expected", [
    ((), CredentialState.VALID, Health.IDLE),
    ((TunnelState.STOPPED,), CredentialState.VALID, Health.IDLE),
    ((TunnelState.UP, TunnelState.STOPPED), CredentialState.VALID, Health.PARTIAL),   # one turned off
    ((TunnelState.UP, TunnelState.UP), CredentialState.VALID, Health.OK),
    ((TunnelState.UP, TunnelState.RECONNECTING), CredentialState.VALID, Health.DEGRADED),
    ((TunnelState.UP, TunnelState.BACKOFF), CredentialState.VALID, Health.DEGRADED),
    ((TunnelState.UP,), CredentialState.BACKOFF, Health.DEGRADED),
    ((TunnelState.UP, TunnelState.FAILED), CredentialState.VALID, Health.NEEDS_ACTION),
    ((TunnelState.RECONNECTING, TunnelState.NEEDS_SIGN_IN), CredentialState.VALID, Health.NEEDS_ACTION),
    ((), CredentialState.NEEDS_SIGN_IN, Health.NEEDS_ACTION),
])
def test_overall_health_is_the_worst_state(tunnels, vault, expected):
    assert overall_health(_status(tunnels, vault=vault)) is expected
