"""TLS for the connections dbtunneld opens itself (the SSM websocket): which CAs to trust.

boto3 and hvac verify through certifi (urllib3 / requests). ``ssl.create_default_context()`` uses
OpenSSL's default paths, and the python.org macOS installer's OpenSSL has none until "Install
Certificates.command" is run: every wss:// connection then fails with CERTIFICATE_VERIFY_FAILED.
``client_ssl_context()`` chooses, in order: the bundle in AWS_CA_BUNDLE (as botocore does), the
default context when it has CA certificates, the OS trust store through ``truststore`` (macOS
keychain, Windows certificate store), certifi.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Callable, Mapping

from ..core.errors import NeedsUserError

log = logging.getLogger(__name__)


class CaBundleError(NeedsUserError):
    """AWS_CA_BUNDLE names a file that cannot be used."""


def client_ssl_context(env: Mapping[str, str] | None = None, *,
                       default: Callable[[], ssl.SSLContext] = ssl.create_default_context,
                       verify_paths: Callable[[], ssl.DefaultVerifyPaths] = ssl.get_default_verify_paths,
                       ) -> ssl.SSLContext:
    """A verifying client context (hostname checked) with a usable set of CA certificates."""
    env = os.environ if env is None else env
    bundle = env.get("AWS_CA_BUNDLE", "")
    if bundle:
        return _bundle_context(bundle)
    context = default()
    if has_ca_certificates(context, verify_paths()):
        return context
    log.info("Python's OpenSSL has no CA certificates (python.org Python?): using the OS trust store")
    return _trust_store_context() or _certifi_context() or context


def has_ca_certificates(context: ssl.SSLContext, paths: ssl.DefaultVerifyPaths) -> bool:
    """Loaded CAs (Windows' store, a cafile) or a CA folder OpenSSL reads on demand."""
    return context.cert_store_stats()["x509_ca"] > 0 or bool(paths.cafile or paths.capath)


def _bundle_context(bundle: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise CaBundleError(f"AWS_CA_BUNDLE={bundle}: cannot load CA certificates ({exc})",
                            "point AWS_CA_BUNDLE at a PEM file of CA certificates, or unset it") from None


def _trust_store_context() -> ssl.SSLContext | None:
    try:
        import truststore
    except ImportError:
        return None
    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _certifi_context() -> ssl.SSLContext | None:
    try:
        import certifi
    except ImportError:
        return None
    return ssl.create_default_context(cafile=certifi.where())
