"""Layer 2, engine: the credential chain (keepers, leases, revocation, the credential facade) and the
tunnels (units, the supervisor's reconcile, wiring, status), all owned by one asyncio loop.

May import ``adapters`` and ``core``; never a front-end or a UI toolkit.
"""
