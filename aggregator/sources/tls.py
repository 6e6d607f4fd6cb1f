"""The forward input's TLS context, from files or from PEM text in the environment."""

from __future__ import annotations

import os
import ssl
import tempfile

from aggregator.config.model import ForwardTls

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(settings: ForwardTls) -> ssl.SSLContext:
    """Raises ssl.SSLError or OSError (a worker that cannot start says why)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[settings.min_version]
    if settings.cert_path is not None and settings.private_key_path is not None:
        context.load_cert_chain(settings.cert_path, settings.private_key_path)
    else:
        _load_pem_chain(context, settings.cert_pem or "", settings.private_key_pem or "")
    if settings.ca_path is not None:
        context.load_verify_locations(settings.ca_path)
    context.verify_mode = ssl.CERT_REQUIRED if settings.client_cert_auth else ssl.CERT_NONE
    return context


def _load_pem_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    # ssl loads keys from files only: a private file, removed as soon as it is read.
    with tempfile.TemporaryDirectory(prefix="aggregator-tls-") as directory:
        path = os.path.join(directory, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.strip() + "\n" + cert.strip() + "\n")
        context.load_cert_chain(path)
