"""Layer 3, process: the daemon process and its control socket (protocol, server, client), and
``doctor``'s layer-by-layer checks.

May import ``engine``, ``adapters`` and ``core``; never a front-end or a UI toolkit.
"""
