"""The real units behind the supervisor's seams: ``engine_factory`` (``credentials.CredentialEngine``
seen as an ``EngineUnit``) and ``tunnel_factory`` (a ``tunnel.Tunnel`` over the configured
transport that waits for its cluster's credentials and probes with a DB login)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from ..adapters.sso import refresh_sso_token
from ..core.config import ClusterConfig, Config, VaultConfig
from ..core.errors import DbtunneldError, SignInNeededError
from ..core.model import CredentialState, CredentialStatus
from ..core.paths import Paths
from .login_probe import login_probe
from .supervisor import credential_problem
from .units import EngineUnit, TunnelUnit, UnitSpec

SIGN_IN_RECHECK = 1.0     # a sign-in made elsewhere (``aws sso login``) sends no event: re-check this often

class EngineAdapter:
    """``credentials.CredentialEngine`` seen as the supervisor's ``EngineUnit``."""

    def __init__(self, config: Config, paths: Paths, on_event: Callable[[str, Any], None]) -> None:
        from ..adapters.keystore import Keystore
        from .credentials import CredentialEngine

        from .local_login import LocalPasswords

        self.keystore = Keystore.open()
        self.local_passwords = LocalPasswords(self.keystore)   # login = "local": one per cluster
        self.paths = paths
        self._on_event = on_event
        self._sso_news = threading.Event()        # set on every sso.* event (sign-in done or failed)
        self.engine = CredentialEngine(config, paths, self.keystore, on_event=self._forward)

    def _forward(self, ev: Any) -> None:
        """Engine events go out as ``credentials`` events (never with secrets: the engine's rule)."""
        if ev.kind.startswith("sso."):
            self._sso_news.set()
        self._on_event("credentials", {"kind": ev.kind, "name": ev.name, "at": ev.at, "detail": ev.detail,
                                       "status": ev.status.to_dict() if ev.status else None})

    def attach(self, engine_loop: Any, scheduler: Any) -> None:
        """Run the keepers on the supervisor's engine loop and scheduler (before ``start``)."""
        self.engine.attach(engine_loop, scheduler)

    def start(self) -> None:
        self.engine.start()

    def stop(self, timeout: float) -> list[dict[str, Any]]:
        """Stop and revoke within ``credentials.revoke_timeout`` (README: quit revokes within it,
        even when Vault hangs), or the caller's shorter bound."""
        bound = min(timeout, self.engine.config.credentials.revoke_timeout)
        return [o.to_dict() for o in self.engine.stop(revoke=True, timeout=bound)]

    def want(self, cluster: ClusterConfig) -> None:
        self.engine.request(cluster.name)

    def release(self, name: str) -> list[dict[str, Any]]:
        return [o.to_dict() for o in self.engine.release(name)]   # the engine logs each lease's outcome

    def renew_now(self, name: str, rotate: bool = False) -> None:
        self.engine.renew_now(name, rotate=rotate)

    def check_now(self) -> None:
        """Re-run every keeper's schedule now: after a sleep, wall-clock deadlines may have passed."""
        self.engine.tokens.wake()
        for keeper in list(self.engine.keepers.values()):
            keeper.wake()

    def current(self, name: str) -> Any:
        return self.engine.current(name)

    def credential_status(self) -> tuple[CredentialStatus, CredentialStatus, dict[str, CredentialStatus]]:
        return self.engine.status()

    def keyring_note(self) -> str:
        return self.keystore.describe()

    def update_config(self, config: Config) -> None:
        self.engine.config = config          # the engine reads clusters from it when one is wanted

    def session_factory(self) -> Any:
        return self.engine.aws.boto3()

    def sso_login(self, wait: float, use_device_code: bool = False) -> dict[str, Any]:
        """Start the sign-in unless signed in (authorization code with PKCE, or the device flow);
        with ``wait`` > 0, wait for the confirmation. The client opens the browser."""
        if self._signed_in():
            return self._signed_in_result()
        info = self.engine.sso_login(open_browser=None, use_device_code=use_device_code)
        deadline = time.monotonic() + wait
        while wait > 0 and time.monotonic() < deadline:
            if self._signed_in():
                return self._signed_in_result()
            self._sso_news.wait(max(0.0, min(SIGN_IN_RECHECK, deadline - time.monotonic())))
            self._sso_news.clear()
        return {**info, "signed_in": False}

    def _signed_in(self) -> bool:
        """Signed in = the SSO token works or refreshes (an expired access token alone is not
        a reason to sign in again); other profiles: as the engine found them."""
        try:
            if self.engine.aws.sso_settings() is not None:
                return refresh_sso_token(self.engine.aws) > time.time()
        except SignInNeededError:
            return False
        except DbtunneldError:
            pass
        return self.engine.aws_status().state == CredentialState.VALID

    def _signed_in_result(self) -> dict[str, Any]:
        st = self.engine.aws_status()
        return {"signed_in": True, "identity": st.identity, "expires_at": st.expires_at}


def engine_factory(config: Config, paths: Paths, on_event: Callable[[str, Any], None]) -> EngineUnit:
    return EngineAdapter(config, paths, on_event)


def _transport_config(spec: UnitSpec) -> Config:
    """The parts of a config a transport is built from (bastion, AWS) for one unit."""
    return Config(vault=VaultConfig(address="", role=""), clusters=(spec.cluster,), aws=spec.aws,
                  bastion=spec.bastion, tunnels=spec.tunnels)


def tunnel_factory(spec: UnitSpec, port: int, engine: EngineUnit, on_change: Callable[[], None]) -> TunnelUnit:
    """A real ``tunnel.Tunnel`` that waits for the cluster's credentials before connecting."""
    from ..adapters.transport_config import build_transport
    from .tunnel import Tunnel

    c = spec.cluster
    cred_name = c.reader_of or c.name
    transport = build_transport(_transport_config(spec), c, session_factory=engine.session_factory)

    def credentials_ready() -> bool:
        if engine.current(cred_name) is not None:
            return True
        problem = credential_problem(engine.credential_status(), cred_name)
        if problem is not None:
            raise problem
        return False

    from .aurora import RoleCheckedTunnel, expected_role

    checked: list[RoleCheckedTunnel] = []
    tunnel = Tunnel(c.name, port, c.endpoint, c.port, transport, spec.tunnels,
                    prerequisite=credentials_ready, on_change=lambda status: on_change(),
                    probe=login_probe(lambda: engine.current(cred_name), lambda ro: checked[0].observe(ro)),
                    before_relay=local_login_for(c, engine))
    checked.append(RoleCheckedTunnel(tunnel, expected_role(c)))
    return checked[0]


def local_login_for(c: ClusterConfig, engine: EngineUnit) -> Any:
    """The tunnel's ``before_relay`` step for ``login = "local"`` (None: pass-through)."""
    passwords = getattr(engine, "local_passwords", None)
    if c.login != "local" or passwords is None:
        return None
    from .local_login import LocalLogin, local_user

    cred_name = c.reader_of or c.name
    tls = None
    if c.local_tls:
        from ..adapters.local_tls import server_context
        tls = server_context(getattr(engine, "paths").state_dir)
    return LocalLogin(c.name, local_user(c), lambda: passwords.get(cred_name), lambda: engine.current(cred_name),
                      tls=tls, upstream_tls=c.upstream_tls)
