"""Layer 1, adapters: one module per outside system or wire format (AWS, SSO, Vault, SSH, the SSM
data channel in ``ssm/``, the keyring, logging, ports, TLS, the MySQL wire, the forwarding loop).

They translate errors into ``core.errors`` and never retry. May import ``core`` and each other.
"""
