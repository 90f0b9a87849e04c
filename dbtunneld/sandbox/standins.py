"""The stand-in servers as services of the stack, with their test controls."""

from __future__ import annotations

import json
import urllib.request

from .procs import Service


class VaultFront(Service):
    """The aws-auth stand-in process in front of OpenBao (stateless; OpenBao keeps state).

    ``pause()`` makes Vault unreachable (the port refuses connections), ``resume()`` brings
    it back on the same port with every token and lease intact. ``freeze()`` instead makes
    Vault hang (connections accepted, no answer).
    """

    def pause(self) -> None:
        self.stop()

    def resume(self) -> None:
        self.start()


class SsoStandin(Service):
    """The SSO stand-in process, with test controls (browser-less approval, expiry)."""

    def _control(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/_standin/{path}",
                                     data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def approve(self, user_code: str) -> bool:
        """Approve a device authorization as the user would in the browser."""
        return self._control("approve", {"user_code": user_code})["approved"]

    def deny(self, user_code: str) -> bool:
        return self._control("deny", {"user_code": user_code})["denied"]

    def auto_approve(self, enabled: bool = True) -> None:
        """Approve every new device code and /authorize request at once (for tests of code that
        'opens a browser')."""
        self._control("auto-approve", {"enabled": enabled})

    def expire_tokens(self) -> None:
        """Server side: every access token is expired now (the portal answers 401)."""
        self._control("expire-tokens")

    def end_sessions(self) -> None:
        """Server side: the SSO sessions end (refresh tokens expire; a new sign-in is needed)."""
        self._control("end-sessions")

    def expire_registrations(self) -> None:
        """Server side: every client registration's secret expires (clientSecretExpiresAt)."""
        self._control("expire-registrations")

    def revoke_tokens(self) -> None:
        """Server side: access and refresh tokens are revoked (refresh fails too)."""
        self._control("revoke-tokens")

    def state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_standin/state", timeout=10) as resp:
            return json.loads(resp.read())
