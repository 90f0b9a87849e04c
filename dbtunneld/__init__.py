"""dbtunneld: password-free, self-healing access to private Aurora MySQL clusters."""

__version__ = "0.1.0"
