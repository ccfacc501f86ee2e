"""Client TLS contexts: shared by engines with the same settings, no store when nothing is verified."""
from __future__ import annotations

import os

from server.engines.base import build_engine, client_tls_context
from tests.engines.helpers import context, direct_spec, smarthost_spec
from tests.support import certs


def test_engines_with_the_same_settings_share_one_context():
    ctx = context(ca_file=certs.ca_file())
    one = build_engine(smarthost_spec("one", port=25, tls="required"), None, ctx)
    two = build_engine(smarthost_spec("two", port=26, tls="required"), None, ctx)
    assert one._plan.tls_context is two._plan.tls_context  # type: ignore[attr-defined]
    other = build_engine(smarthost_spec("three", port=27, tls="required", verify=False), None, ctx)
    assert other._plan.tls_context is not one._plan.tls_context  # type: ignore[attr-defined]


def test_a_context_that_verifies_nothing_loads_no_certificate_store():
    direct = build_engine(direct_spec(port=25), None, context())
    tls = direct._tls  # type: ignore[attr-defined]
    assert tls.cert_store_stats()["x509_ca"] == 0 and not tls.check_hostname


def test_a_changed_ca_file_is_read_again(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(open(certs.ca_file(), "rb").read())
    first = client_tls_context(verify=True, ca_file=str(ca))
    assert client_tls_context(verify=True, ca_file=str(ca)) is first
    ca.write_bytes(ca.read_bytes() + b"\n")
    os.utime(ca, ns=(1, 1))
    assert client_tls_context(verify=True, ca_file=str(ca)) is not first
