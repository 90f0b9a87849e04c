"""``dbtunneld`` with its in-process counters reported: ``python -m bench.daemon_counters OUT ARGS...``
runs ``dbtunneld ARGS...`` (the real CLI and daemon code, in this process) and rewrites the JSON
file OUT twice a second with the counters the benchmark reads (``vault.REQUESTS``: answers the
daemon received from Vault). Used to measure Vault requests per hour from the daemon's own count.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def _report(path: Path, stop: threading.Event) -> None:
    from dbtunneld.adapters import vault

    tmp = path.with_name(path.name + ".tmp")
    while True:
        tmp.write_text(json.dumps({"vault_requests": vault.REQUESTS.total, "pid": os.getpid(), "at": time.time()}))
        os.replace(tmp, path)
        if stop.wait(0.5):
            return


def main(argv: list[str]) -> int:
    from dbtunneld.ui.cli import main as cli_main

    stop = threading.Event()
    threading.Thread(target=_report, args=(Path(argv[0]), stop), name="bench-counters", daemon=True).start()
    try:
        return cli_main(argv[1:])
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
