"""What the `dbtunneld` command prints: the status table, connect/disconnect lines, the revocation
report and the creds block (pure: tested from literals), and the exit code a status means."""

from __future__ import annotations

import time
from typing import Any

from ..core.exitcodes import EXIT_OK, EXIT_SIGN_IN, EXIT_UNHEALTHY


def _ago(t: float | None, now: float) -> str:
    return _span(now - t) if t else ""


def _span(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _credential_line(label: str, c: dict[str, Any] | None, now: float) -> str:
    if not c:
        return f"{label:<6} -"
    parts = [f"{label:<6} {c.get('name', '')}", c.get("state", "")]
    if c.get("expires_at"):
        parts.append(f"expires in {_span(c['expires_at'] - now)}")
    if c.get("identity"):
        # Vault's identity is the token's accessor (safe to show: it cannot be used as the token)
        parts.append(f"accessor {c['identity']}" if c.get("kind") == "vault" else c["identity"])
    if c.get("last_error"):
        parts.append(c["last_error"])
    return "  ".join(p for p in parts if p)


def _tunnel_detail(t: dict[str, Any], now: float) -> str:
    if t.get("state") == "up" and t.get("role") and t.get("role") != t.get("expected_role"):
        return f"{t['expected_role']} port answers as a {t['role']} (failover?)"
    if t.get("next_retry_at") and t.get("state") in ("backoff", "reconnecting"):
        return f"retry in {_span(t['next_retry_at'] - now)}: {t.get('last_error', '')}".rstrip(": ")
    if t.get("last_error") and t.get("state") != "up":
        error: str = t["last_error"]
        return error + (f" (hint: {t['hint']})" if t.get("hint") else "")
    role = t.get("role", "") if t.get("state") == "up" else ""
    return "  ".join(p for p in (role, "PRODUCTION" if t.get("production") else "") if p)


def render_status(st: dict[str, Any], now: float) -> str:
    """The `dbtunneld status` table (pure: tested from literals)."""
    lines = [_credential_line("AWS", st.get("aws"), now), _credential_line("Vault", st.get("vault"), now), ""]
    rows = [("NAME", "LOCAL", "STATE", "SINCE", "USER", "DETAIL")]
    for t in st.get("tunnels", []):
        rows.append((t["name"], f"127.0.0.1:{t['local_port']}" if t.get("local_port") else "-",
                     t.get("state", ""), _ago(t.get("since"), now), t.get("username", ""), _tunnel_detail(t, now)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
    if st.get("keyring"):
        lines += ["", f"keyring: {st['keyring']}"]
    return "\n".join(line.rstrip() for line in lines)


def status_exit_code(st: dict[str, Any]) -> int:
    creds = [c for c in (st.get("aws"), st.get("vault")) if c]
    tunnels = [t for t in st.get("tunnels", []) if t.get("state") != "stopped"]
    if any(c.get("state") == "needs_sign_in" for c in creds) or any(t.get("state") == "needs_sign_in" for t in tunnels):
        return EXIT_SIGN_IN
    return EXIT_UNHEALTHY if st.get("health") in ("degraded", "needs_action") else EXIT_OK


def describe_tunnel(t: dict[str, Any]) -> str:
    where = f"127.0.0.1:{t.get('local_port')}"
    if t.get("state") == "up":
        who = f" as {t['username']}" if t.get("username") else ""
        return f"{t['name']}: up on {where}{who}"
    detail = f": {t['last_error']}" if t.get("last_error") else ""
    hint = f" (hint: {t['hint']})" if t.get("hint") else ""
    return f"{t['name']}: {t.get('state')} on {where}{detail}{hint}"


def render_revocation(outcomes: list[dict[str, Any]], now: float) -> list[str]:
    """One line per DB user that was to be revoked, then each distinct fix once."""
    lines, hints = [], []
    for o in outcomes:
        who = f"{o['cluster']}: user {o['username']}"
        if o.get("revoked"):
            lines.append(f"{who} revoked" + (" (with the Vault token that created it)" if o.get("how") == "token" else ""))
            continue
        until = o.get("valid_until")
        end = (f"it stays valid until {_utc(until)} (in {_span(until - now)})" if until else
               "it stays valid until its lease expires")
        lines.append(f"{who} NOT revoked ({o.get('reason') or 'unknown'}); "
                     + ("the next start tries again" if o.get("retried") else end))
        if o.get("hint") and o["hint"] not in hints:
            hints.append(o["hint"])
    return lines + [f"hint: {h}" for h in hints]


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def revocation_summary(outcomes: list[dict[str, Any]] | None) -> str:
    if outcomes is None:
        return "what was revoked is in the daemon's log (it did not report in time)"
    if not outcomes:
        return "no DB user was held"
    kept = sum(1 for o in outcomes if not o.get("revoked"))
    return f"{kept} of {len(outcomes)} DB user(s) NOT revoked (see above)" if kept else "every DB user revoked"


def render_creds(c: dict[str, Any], now: float) -> str:
    """The `dbtunneld creds NAME` block; the password is never in it."""
    db = f", database {c['database']}" if c.get("database") else ""
    prod = "  PRODUCTION" if c.get("production") else ""
    lines = [f"{c['name']} (127.0.0.1:{c['port']}{db}){prod}",
             f"username  {c['username']}",
             f"password  not shown: `dbtunneld creds {c['name']} --field password` or `--copy`",
             f"mysql     {c['mysql']}", f"url       {c['url']}", f"jdbc      {c['jdbc']}"]
    if c.get("login") == "local":
        lines.append(f"login     local: stable, saved logins keep working (now as {c.get('lease_user', '')})")
    if c.get("expires_at"):
        lines.append(f"expires   in {_span(c['expires_at'] - now)} (renewed while connected)")
    return "\n".join(lines)


def signed_in_line(info: dict[str, Any]) -> str:
    who = info.get("identity") or ""
    return f"signed in as {who}" if who else "signed in"
