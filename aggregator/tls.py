"""TLS contexts for the forward protocol: the forward source's (a server's), and the forward
destination's and the hand-off's (a client's), from files or from PEM text in the environment."""

from __future__ import annotations

import os
import ssl
import tempfile

from aggregator.config.model import ForwardClientTls, ForwardTls

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


def client_context(settings: ForwardClientTls) -> ssl.SSLContext:
    """Raises ssl.SSLError or OSError. A CA given may be the server's own certificate (a
    self-signed one, or a leaf): it is trusted as it is, without the rest of its chain."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = _VERSIONS[settings.min_version]
    if settings.ca_path is not None or settings.ca_pem:
        context.load_verify_locations(cafile=settings.ca_path, cadata=settings.ca_pem or None)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not settings.verify_hostname:
        context.check_hostname = False
    if settings.cert_path is not None and settings.private_key_path is not None:
        context.load_cert_chain(settings.cert_path, settings.private_key_path)
    elif settings.cert_pem and settings.private_key_pem:
        _load_pem_chain(context, settings.cert_pem, settings.private_key_pem)
    return context


def trusting(source: ForwardTls) -> ForwardClientTls:
    """Client settings that trust exactly the certificate ``source`` serves (the hand-off to
    our own service), whatever name it has: the load balancer's need not be in it."""
    if source.cert_path is not None:
        with open(source.cert_path, encoding="ascii") as f:
            pem = f.read()
    else:
        pem = source.cert_pem or ""
    return ForwardClientTls(ca_pem=pem, verify_hostname=False, min_version=source.min_version)


def _load_pem_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    # ssl loads keys from files only: a private file, removed as soon as it is read.
    with tempfile.TemporaryDirectory(prefix="aggregator-tls-") as directory:
        path = os.path.join(directory, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.strip() + "\n" + cert.strip() + "\n")
        context.load_cert_chain(path)
