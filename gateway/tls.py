"""The gateway's TLS server context, from `[gateway] tls_cert` / `tls_key` (PEM files)."""

from __future__ import annotations

import ssl

from gateway.config import GatewaySettings
from launcher.facts.strictconf import ConfigError


def server_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """An SSLContext serving the configured certificate chain, or None when TLS is off.

    Raises ConfigError (naming `gateway.tls_cert`) when a file is missing, unreadable, not PEM, or
    the key does not match the certificate: the gateway fails at start, not at the first handshake.
    """
    if not settings.tls:
        return None
    # Purpose.CLIENT_AUTH: the server side's defaults (TLS 1.2 or newer, the library's cipher list).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except FileNotFoundError as e:
        raise ConfigError("gateway.tls_cert", f"cannot read {e.filename}: no such file") from None
    except PermissionError as e:
        raise ConfigError("gateway.tls_cert", f"cannot read {e.filename}: permission denied") from None
    except ssl.SSLError as e:
        raise ConfigError(
            "gateway.tls_cert",
            f"cannot load {settings.tls_cert} with key {settings.tls_key}: {e.reason or e} "
            "(both must be PEM, and the key must match the certificate)",
        ) from None
    return context
