"""Delivery status notifications: structure parsed back with `email`, cleaned diagnostics."""
from __future__ import annotations

import email
import email.policy

import pytest

from server.bounce import RecipientReport, build_notice, may_notify
from server.queue import QueuedMessage

MSG = QueuedMessage("0000018C2F3A4B5C6D7E", "alice@home.test", ("bob@far.test", "carol@far.test"),
                    1234, 1_700_000_000.0)
HEADERS = b"From: alice@home.test\r\nTo: bob@far.test\r\nSubject: Hello\r\nMessage-ID: <m1@home.test>\r\n"


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_failed_dsn_structure() -> None:
    raw = build_notice(
        notice="failed", msg=MSG, headers=HEADERS, hostname="relay.test", now=1_700_000_100.0,
        reports=[RecipientReport("bob@far.test", "5.1.1", "550 5.1.1 no such user", "mx1.far.test",
                                 (("isp", "451 4.3.0 try later"), ("direct", "550 5.1.1 no such user")))])
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    dsn = parse(raw)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["To"].addresses[0].addr_spec == "alice@home.test"
    assert "MAILER-DAEMON@relay.test" in dsn["From"]
    human, status, original = dsn.iter_parts()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "engine isp: 451 4.3.0 try later" in text
    assert "engine direct: 550 5.1.1 no such user" in text
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@far.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.far.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: Hello" in original.get_content()


def test_hostile_reply_text_cannot_inject_headers() -> None:
    evil = "550 5.1.1 x\r\n550 5.1.1 \x1b[31mX-Injected: y\rZ"
    raw = build_notice(notice="failed", msg=MSG, headers=HEADERS, hostname="relay.test",
                       reports=[RecipientReport("bob@far.test", "5.1.1", evil, None, (("isp", evil),))])
    assert b"\x1b" not in raw
    dsn = parse(raw)
    _, status, _ = dsn.iter_parts()
    rcpt = status.get_payload()[1]
    assert "X-Injected" not in rcpt.keys()
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 x 550 5.1.1")
    for line in raw.split(b"\r\n"):
        assert not line.startswith(b"X-Injected")


def test_delayed_notice_and_local_diagnostic() -> None:
    raw = build_notice(notice="delayed", msg=MSG, headers=HEADERS, hostname="relay.test",
                       now=MSG.arrival + 4 * 3600, retry_until=MSG.arrival + 5 * 86400,
                       reports=[RecipientReport("bob@far.test", "4.4.1", "cannot connect to isp.test",
                                                None, (("isp", "cannot connect to isp.test"),)),
                                RecipientReport("carol@far.test", "4.4.1", None, None, ())])
    dsn = parse(raw)
    assert dsn["Subject"].startswith("Delayed Mail")
    _, status, _ = dsn.iter_parts()
    blocks = status.get_payload()
    assert [b["Action"] for b in blocks[1:]] == ["delayed", "delayed"]
    assert blocks[1]["Diagnostic-Code"] == "X-routedsl; cannot connect to isp.test"
    assert blocks[1]["Will-Retry-Until"]
    assert "4.0 hours" in next(dsn.iter_parts()).get_content()


def test_never_to_the_null_sender_nor_about_a_bounce() -> None:
    import dataclasses
    assert may_notify(MSG)
    for msg in (dataclasses.replace(MSG, sender=""), dataclasses.replace(MSG, kind="bounce"),
                dataclasses.replace(MSG, kind="delay")):
        assert not may_notify(msg)
        with pytest.raises(ValueError):
            build_notice(notice="failed", msg=msg, headers=b"", hostname="h",
                         reports=[RecipientReport("x@y", "5.0.0")])


def test_a_non_ascii_sender_gets_a_utf8_notice() -> None:
    import dataclasses
    from server.bounce import needs_smtputf8
    msg = dataclasses.replace(MSG, sender="jörg@bücher.test", smtputf8=True)
    raw = build_notice(notice="failed", msg=msg, headers="Subject: grüße\r\n".encode(), hostname="relay.test",
                       reports=[RecipientReport("ñandú@far.test", "5.1.1", "550 5.1.1 unknown")])
    assert needs_smtputf8(msg) and not needs_smtputf8(MSG)
    assert "To: <jörg@bücher.test>".encode() in raw and b"=?utf-8?" not in raw.split(b"\r\n\r\n")[0]
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    block = list(dsn.iter_parts())[1].get_payload()[1]
    assert block["Final-Recipient"] == "utf-8; ñandú@far.test"
