"""Test certificates made with trustme: one CA for the whole test session.

* `ca_file()`: path of the CA's PEM, to pass as `EngineContext.ca_file` (or a client's cafile);
* `server_context()`: a server SSLContext for "localhost", "127.0.0.1" … "127.0.0.9",
  "smarthost.test" and "*.test", signed by that CA;
* `untrusted_server_context()`: the same names signed by a CA nobody trusts;
* `client_context()`: a client context that trusts the session CA.

Nothing here touches the network; files live in one temporary folder removed at exit.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
from pathlib import Path

import trustme

NAMES = ("localhost", "smarthost.test", "*.test", "127.0.0.1", "127.0.0.2", "127.0.0.3",
         "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9")


@functools.cache
def _folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="routedsl-certs-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def ca() -> trustme.CA:
    return trustme.CA()


@functools.cache
def _untrusted_ca() -> trustme.CA:
    return trustme.CA()


@functools.cache
def ca_file() -> str:
    path = _folder() / "ca.pem"
    ca().cert_pem.write_to_path(str(path))
    return str(path)


@functools.cache
def _server_cert(trusted: bool) -> trustme.LeafCert:
    return (ca() if trusted else _untrusted_ca()).issue_cert(*NAMES)


def server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _server_cert(True).configure_cert(context)
    return context


def untrusted_server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _server_cert(False).configure_cert(context)
    return context


def cert_files() -> tuple[str, str]:
    """(certificate chain PEM, private key PEM) paths of the trusted server cert."""
    folder = _folder()
    cert, key = folder / "server.pem", folder / "server.key"
    if not cert.exists():
        _server_cert(True).private_key_pem.write_to_path(str(key))
        for i, blob in enumerate(_server_cert(True).cert_chain_pems):
            blob.write_to_path(str(cert), append=i > 0)
    return str(cert), str(key)


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca().configure_trust(context)
    return context
