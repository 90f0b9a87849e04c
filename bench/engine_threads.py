"""Threads of a daemon with N connected tunnels, and the lock instantiations in the engine's source
(issue 16): ``python -m bench.engine_threads [N]`` (default 10) on a private sandbox stack.

Counts the daemon process's threads (``/proc/PID/task``) once every tunnel is up, groups them by
name (digits folded), and counts ``threading.Lock/RLock/Condition`` instantiations in
``dbtunneld/`` (the sandbox excluded). Prints one JSON object.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import tempfile
from pathlib import Path

LOCK_CALL = re.compile(r"threading\.(Lock|RLock|Condition)\(")


def lock_instantiations(package: Path | None = None) -> dict[str, int]:
    """In the ``dbtunneld`` that is imported (run with PYTHONPATH=<another tree> to count that one)."""
    import dbtunneld

    package = package or Path(dbtunneld.__file__).parent
    counts: collections.Counter[str] = collections.Counter()
    for path in sorted(package.rglob("*.py")):
        if "sandbox" in path.relative_to(package).parts:
            continue
        counts.update(m.group(1) for m in LOCK_CALL.finditer(path.read_text()))
    return {**dict(sorted(counts.items())), "total": sum(counts.values())}


def thread_names(pid: int) -> list[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            pass
    return names


def measure(tunnels: int) -> dict[str, object]:
    from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest
    from dbtunneld.sandbox.stack import start_stack

    with tempfile.TemporaryDirectory() as root, start_stack(home=Path(root) / "stack") as stack:
        copies = max(0, tunnels - len(stack.clusters))
        with DaemonUnderTest(stack, Path(root) / "d", DaemonOptions(copies=copies)) as d:
            d.start()
            d.sign_in()
            names = [t["name"] for t in d.status()["tunnels"]]
            d.client.request("connect", all=True, wait=120, timeout=180)
            d.wait_up(names, timeout=180)
            pid = d.status()["pid"]
            threads = thread_names(pid)
    grouped = collections.Counter(re.sub(r"\d+", "N", n) for n in threads)
    return {"tunnels": len(names), "threads": len(threads), "by_name": dict(grouped.most_common()),
            "locks_in_source": lock_instantiations()}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10), indent=1))
