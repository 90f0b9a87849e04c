"""Command line of the SSM stand-in (``python -m dbtunneld.sandbox.ssm_standin``).

Prints one line ``READY http://HOST:PORT`` on stdout when it listens, logs on stderr, runs until
SIGTERM/SIGINT or until its parent exits::

    python -m dbtunneld.sandbox.ssm_standin --port 0 \\
        --target i-0abc0123456789def=127.0.0.1:2222   # SSH sessions to this target reach this sshd
        --target '*=127.0.0.1:2222'                   # any instance id / ECS target (the sandbox)
        --allow-remote 127.0.0.1[:PORT]               # hosts port sessions may reach (repeatable)
        --credentials-file creds.json                 # {"AKID...": "secret"}: keys whose SigV4 is checked
        [--accept-unknown-keys]                       # other keys: everything but the HMAC is checked
        [--mode realistic|fast] [--idle-timeout 1200] [--max-session-duration 0]
        [--drop 0.05] [--delay-ms 0] [--jitter-ms 0] [--close-after-messages 0]
        [--agent-payload 1024] [--seed N] [--agent-version 3.3.1142.0]
        [--forward-url http://127.0.0.1:MOTO] [--allow-unsigned-websocket] [--log-level INFO]
        [--stream-base wss://NAME[:PORT]]            # stream URLs behind a TLS front (proxy tests)
        [--kms-key-id KEY --kms-endpoint URL [--kms-require-challenge]]  # KMS-encrypted sessions

Secrets never go in argv: credentials come from a file (or the in-process ``credentials=``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from .ssm_agent import DEFAULT_AGENT_VERSION, MODES, Faults
from .ssm_standin import SsmStandIn
from .ssm_kms import KmsSettings


def parse_target(text: str) -> tuple[str, tuple[str, int]]:
    name, _, address = text.partition("=")
    host, _, port = address.rpartition(":")
    if not name or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--target wants ID=HOST:PORT, got {text!r}")
    return name, (host, int(port))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dbtunneld.sandbox.ssm_standin", description="SSM Session Manager stand-in (API + agent side)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--target", action="append", type=parse_target, default=[], help="ID=HOST:PORT: SSH sessions to ID reach this sshd")
    p.add_argument("--allow-remote", action="append", default=[], help="HOST or HOST:PORT port sessions may reach (repeatable, comma lists ok)")
    p.add_argument("--credentials-file", default=None, help='JSON {"ACCESS_KEY_ID": "SECRET"}: SigV4 is verified for these keys')
    p.add_argument("--accept-unknown-keys", action="store_true", help="keys not in the file pass with every check but the HMAC (moto-minted keys)")
    p.add_argument("--mode", choices=MODES, default="realistic", help="realistic: the agent's pacing and resends; fast: for client throughput tests")
    p.add_argument("--idle-timeout", type=float, default=1200.0, help="seconds without data messages before the service closes a session")
    p.add_argument("--max-session-duration", type=float, default=0.0, help="seconds; 0 = no limit")
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--close-after-messages", type=int, default=0)
    p.add_argument("--agent-payload", type=int, default=1024)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--agent-version", default=DEFAULT_AGENT_VERSION)
    p.add_argument("--forward-url", default=None, help="where other AmazonSSM.* calls go (moto)")
    p.add_argument("--allow-unsigned-websocket", action="store_true", help="accept upgrades without SigV4 (older session-manager-plugin releases)")
    p.add_argument("--vpc-dns-seed", default=None, help="moto seed file: its Aurora endpoints resolve to 127.0.0.1 (the VPC's DNS)")
    p.add_argument("--stream-base", default="", help="scheme://host[:port] of the stream URLs handed out (e.g. wss://ssmmessages.example behind a TLS front); default ws://HOST:PORT")
    p.add_argument("--kms-key-id", default="", help="encrypt every session with this KMS key (Session Manager preference); the agent's credentials come from the environment")
    p.add_argument("--kms-endpoint", default="", help="the KMS API the agent calls (moto)")
    p.add_argument("--kms-region", default="us-east-1")
    p.add_argument("--kms-require-challenge", action="store_true", help="the agent's RequireKMSChallengeResponse")
    p.add_argument("--log-level", default="INFO")
    return p


def read_credentials(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise SystemExit(f"--credentials-file {path}: want a JSON object of access key id -> secret key")
    return data


def standin_from_args(args: argparse.Namespace) -> SsmStandIn:
    faults = Faults()
    faults.update({
        "drop": args.drop, "delay_ms": args.delay_ms, "jitter_ms": args.jitter_ms, "close_after_messages": args.close_after_messages,
        "agent_payload": args.agent_payload, "seed": args.seed, "mode": args.mode, "idle_timeout": args.idle_timeout,
        "max_session_duration": args.max_session_duration,
    })
    allow = [h.strip() for item in args.allow_remote for h in item.split(",") if h.strip()]
    return SsmStandIn(
        host=args.host, port=args.port, targets=dict(args.target), allow_remote=allow, faults=faults, agent_version=args.agent_version,
        forward_url=args.forward_url, allow_unsigned_websocket=args.allow_unsigned_websocket,
        credentials=read_credentials(args.credentials_file), accept_unknown_keys=args.accept_unknown_keys,
        vpc_dns_file=args.vpc_dns_seed,
        stream_base=args.stream_base, kms=_kms_settings(args),
    )


def _kms_settings(args: argparse.Namespace) -> KmsSettings | None:
    if not args.kms_key_id:
        return None
    if not args.kms_endpoint:
        raise SystemExit("--kms-key-id needs --kms-endpoint (the KMS API the agent calls)")
    return KmsSettings(args.kms_key_id, args.kms_endpoint, args.kms_region, require_challenge=args.kms_require_challenge)


async def _serve_until_stopped(standin: SsmStandIn) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = await standin.start()
    print(f"READY {url}", flush=True)
    parent = os.getppid()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            if os.getppid() != parent:
                break
    await standin.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve_until_stopped(standin_from_args(args)))
    return 0
