"""The failure policy (spec §7): every reply and error lands in exactly one decision."""
from __future__ import annotations

import ssl

import aiosmtplib
import dns.name
import dns.resolver
import pytest

from server import outcome as oc
from server.outcome import Kind, Stage
from server.text import clean_text

D, T, P = Kind.DELIVERED, Kind.TEMPORARY, Kind.PERMANENT


def _classify(exc: BaseException, stage: Stage = Stage.RCPT) -> oc.Outcome:
    return oc.classify(exc, engine="isp", host="smtp.isp.test", stage=stage)


REPLIES = [
    # (exception, stage, kind, final, enhanced)
    (aiosmtplib.SMTPRecipientRefused(550, "5.1.1 <bob@ok.test>: user unknown", "bob@ok.test"),
     Stage.RCPT, P, True, "5.1.1"),
    (aiosmtplib.SMTPRecipientRefused(553, "5.1.3 bad address syntax", "x"), Stage.RCPT, P, True, "5.1.3"),
    (aiosmtplib.SMTPDataError(550, "5.1.1 mailbox gone"), Stage.DATA, P, True, "5.1.1"),
    (aiosmtplib.SMTPRecipientRefused(554, "5.7.1 <bob@ok.test>: Relay access denied", "b"),
     Stage.RCPT, P, False, "5.7.1"),
    (aiosmtplib.SMTPRecipientRefused(550, "relaying denied", "b"), Stage.RCPT, P, False, None),
    (aiosmtplib.SMTPDataError(552, "5.3.4 message too big"), Stage.DATA, P, False, "5.3.4"),
    (aiosmtplib.SMTPDataError(554, "5.7.0 spam"), Stage.DATA, P, False, "5.7.0"),
    (aiosmtplib.SMTPRecipientRefused(451, "4.3.0 try later", "b"), Stage.RCPT, T, False, "4.3.0"),
    (aiosmtplib.SMTPRecipientRefused(450, "4.1.1 mailbox busy", "b"), Stage.RCPT, T, False, "4.1.1"),
    (aiosmtplib.SMTPDataError(421, "4.3.2 shutting down"), Stage.DATA, T, False, "4.3.2"),
    (aiosmtplib.SMTPSenderRefused(553, "5.1.7 bad sender", "a"), Stage.MAIL, P, False, "5.1.7"),
    (aiosmtplib.SMTPConnectResponseError(421, "4.3.2 busy"), Stage.CONNECT, T, False, "4.3.2"),
    (aiosmtplib.SMTPConnectResponseError(554, "5.1.1 go away"), Stage.CONNECT, P, False, "5.1.1"),
    (aiosmtplib.SMTPHeloError(550, "5.1.1 odd"), Stage.EHLO, P, False, "5.1.1"),
    (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 Authentication credentials invalid"),
     Stage.AUTH, T, False, "5.7.8"),
    # an enhanced code whose class disagrees with the reply is not believed
    (aiosmtplib.SMTPRecipientRefused(550, "4.1.1 confused", "b"), Stage.RCPT, P, False, None),
]


@pytest.mark.parametrize("exc,stage,kind,final,enhanced", REPLIES,
                         ids=[f"{e.code}-{s.value}-{i}" for i, (e, s, *_rest) in enumerate(REPLIES)])
def test_replies(exc, stage, kind, final, enhanced):
    got = _classify(exc, stage)
    assert (got.kind, got.final, got.enhanced, got.code) == (kind, final, enhanced, exc.code)
    assert got.engine == "isp" and got.host == "smtp.isp.test"


ERRORS = [
    (aiosmtplib.SMTPConnectError("Error connecting to x on port 25: [Errno 111] refused"), Stage.CONNECT, "4.4.1"),
    (aiosmtplib.SMTPConnectTimeoutError("Timed out connecting"), Stage.CONNECT, "4.4.1"),
    (aiosmtplib.SMTPServerDisconnected("Connection lost"), Stage.DATA, "4.4.2"),
    (aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"), Stage.MAIL, "4.4.2"),
    (ConnectionResetError(104, "reset"), Stage.RCPT, "4.4.2"),
    (ssl.SSLCertVerificationError(1, "certificate verify failed"), Stage.TLS, "4.7.5"),
    (aiosmtplib.SMTPException("SMTP STARTTLS extension not supported"), Stage.TLS, "4.7.5"),
    (aiosmtplib.SMTPNotSupported("no AUTH"), Stage.AUTH, "4.3.0"),
    (dns.resolver.NoNameservers(), Stage.DNS, "4.4.3"),
    (dns.resolver.LifetimeTimeout(timeout=2.0, errors=[]), Stage.DNS, "4.4.3"),
    (RuntimeError("bug"), Stage.LOCAL, "4.3.0"),
]


@pytest.mark.parametrize("exc,stage,enhanced", ERRORS, ids=[type(e).__name__ for e, *_ in ERRORS])
def test_errors_are_temporary_engine_faults(exc, stage, enhanced):
    got = _classify(exc, stage)
    assert got.kind is T and not got.final
    assert got.enhanced == enhanced
    assert got.code is None


def test_tls_failure_inside_a_connect_error_is_a_tls_failure():
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
        except ssl.SSLError as inner:
            raise aiosmtplib.SMTPConnectError("Error connecting") from inner
    except aiosmtplib.SMTPConnectError as exc:
        got = _classify(exc, Stage.CONNECT)
    assert (got.kind, got.enhanced) == (T, "4.7.5")
    assert "CERTIFICATE_VERIFY_FAILED" in got.text


def test_nxdomain_is_a_final_destination_verdict():
    exc = dns.resolver.NXDOMAIN(qnames=[dns.name.from_text("nowhere.test")], responses={})
    got = _classify(exc, Stage.DNS)
    assert (got.kind, got.final, got.enhanced) == (P, True, "5.1.2")
    assert "nowhere.test" in got.text


def test_bad_addresses_refused_by_the_client_library():
    rcpt = _classify(ValueError("address contains control characters"), Stage.RCPT)
    assert (rcpt.kind, rcpt.final, rcpt.enhanced) == (P, True, "5.1.3")
    sender = _classify(ValueError("bad"), Stage.MAIL)
    assert (sender.kind, sender.final, sender.enhanced) == (P, False, "5.1.7")
    utf8 = _classify(UnicodeEncodeError("ascii", "jörg", 1, 2, "no"), Stage.RCPT)
    assert (utf8.kind, utf8.final, utf8.enhanced) == (P, False, "5.6.7")


def test_delivered_and_reply_form():
    got = oc.delivered("2.0.0 Ok: queued as ABC", engine="isp", host="h")
    assert got.delivered and got.reply == "250 2.0.0 Ok: queued as ABC"


def test_local_verdicts():
    assert oc.null_mx("nomail.test", engine="direct").reply.startswith("556 5.1.10 ")
    assert oc.null_mx("nomail.test", engine="direct").final
    big = oc.too_large(3000, 2000, engine="isp", host="h")
    assert (big.kind, big.final, big.enhanced) == (P, False, "5.3.4")
    route = oc.no_route("ok.test", engine="direct")
    assert (route.kind, route.final, route.enhanced) == (P, False, "5.4.4")
    assert oc.dns_temporary("ok.test", "SERVFAIL", engine="direct").enhanced == "4.4.3"


def test_evil_multiline_reply_is_cleaned():
    exc = aiosmtplib.SMTPRecipientRefused(
        550, "5.1.1 x\n5.1.1 \x1b[31mX-Injected: y\rZ\x00\x7f\u2028\u202eW", "b")
    got = _classify(exc, Stage.RCPT)
    for bad in ("\x1b", "\r", "\n", "\x00", "\x7f", "\u2028", "\u202e"):
        assert bad not in got.reply
    assert got.reply.startswith("550 5.1.1 x ")
    assert got.reply.count("5.1.1") == 1  # the repeated enhanced code is read once
    assert got.final


def test_reply_text_is_bounded():
    got = _classify(aiosmtplib.SMTPDataError(554, "5.7.1 " + "A" * 100_000), Stage.DATA)
    assert len(got.reply) <= oc.MAX_TEXT + 20


@pytest.mark.parametrize("text", ["", "\x00\x01", "ok", "x" * 5000, "é\u0085ü", b"\xff\xfe bytes"])
def test_clean_text_total(text):
    cleaned = clean_text(text)
    assert all(c == " " or c.isprintable() for c in cleaned)
    assert len(cleaned) <= oc.MAX_TEXT


def test_rank_prefers_a_retry_to_a_bounce():
    temp = _classify(aiosmtplib.SMTPRecipientRefused(451, "4.3.0 later", "b"))
    perm = _classify(aiosmtplib.SMTPRecipientRefused(554, "5.7.1 no", "b"))
    verdict = _classify(aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "b"))
    assert oc.rank(perm) < oc.rank(temp) < oc.rank(verdict)


from hypothesis import given, strategies as st  # noqa: E402


@given(st.integers(min_value=-1, max_value=999), st.text())
def test_any_reply_gives_a_clean_bounded_outcome(code, text):
    got = oc.from_reply(code, text, engine="e", host="h", stage=Stage.RCPT)
    assert all(c.isprintable() for c in got.reply)
    assert len(got.reply) <= oc.MAX_TEXT + 20
    assert got.final is (got.kind is Kind.PERMANENT and (got.enhanced or "").startswith("5.1."))
    if not 200 <= code < 600:
        assert got.temporary and got.code is None
