"""Run a CredentialEngine in a process of its own, for crash tests.

    python tests/helpers/engine_proc.py CONFIG.toml CLUSTER

Environment: HOME (holds the AWS SSO token cache), DBTUNNELD_HOME (state and log folders),
AWS_CONFIG_FILE, DBTUNNELD_KEYRING. Once it holds credentials for CLUSTER it prints one JSON
line ``{"pid", "username", "lease_id"}`` (never the password), then runs until stdin closes
or SIGTERM, and stops revoking its leases. Killed with SIGKILL it leaves its lease behind,
recorded in the state folder: the next start must revoke it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading


def main(argv: list[str]) -> int:
    from dbtunneld.adapters.keystore import Keystore
    from dbtunneld.adapters.log import setup_logging
    from dbtunneld.core.config import load_config
    from dbtunneld.core.paths import default_paths
    from dbtunneld.engine.credentials import CredentialEngine

    config_path, cluster = argv
    paths = default_paths().ensure()
    setup_logging(paths.log_file, stderr=False, level=logging.DEBUG)
    engine = CredentialEngine(load_config(config_path), paths, Keystore.open())
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    engine.start()
    creds = engine.want(cluster, timeout=60)
    print(json.dumps({"pid": os.getpid(), "username": creds.username, "lease_id": creds.lease_id}), flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    engine.stop(revoke=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
