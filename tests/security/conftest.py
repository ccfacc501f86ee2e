"""Fixtures for the security tests: a relay protocol in the test's own loop, TLS made by trustme."""
from __future__ import annotations

import ssl

import pytest
import trustme

from tests.security.harness import start_relay


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_tls(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def relays():
    """start(**kw) -> Relay; every relay started is closed at the end of the test."""
    started = []

    async def start(*args, **kw):
        relay = await start_relay(*args, **kw)
        started.append(relay)
        return relay
    yield start
    for relay in started:
        await relay.close()
