"""The pure DATA and header policy: line ends, NUL, hop counting, header size, the Received
header built from hostile values, and text cleaning for logs and bounces."""
from __future__ import annotations

import email
import re

import pytest
from hypothesis import given, strategies as st

from server.hygiene import (Path, Refusal, check_helo, clean_message, count_received,
                            normalise_line_ends, parse_path, received_header)
from server.text import clean_text

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@pytest.mark.parametrize("raw, cleaned", [
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\rb\r\n", b"a\r\nb\r\n"),
    (b"before\n.\r\nafter\r\n", b"before\r\n.\r\nafter\r\n"),
    (b"x\r\r\n", b"x\r\n\r\n"),
    (b"ok\r\n", b"ok\r\n"),
])
def test_bare_cr_and_lf_become_crlf(raw, cleaned):
    assert clean_message(raw) == cleaned


@given(st.binary(max_size=300))
def test_cleaned_content_has_no_bare_line_ends_and_no_nul(data):
    result = clean_message(data, hop_limit=10**6, max_header_size=10**6)
    if isinstance(result, Refusal):
        assert b"\x00" in data and result.reply.startswith("550 5.6.0")
    else:
        assert not BARE.search(result) and b"\x00" not in result
        assert normalise_line_ends(result) == result   # idempotent: stored == sent


def test_nul_is_refused():
    assert clean_message(b"a\r\n\x00.\r\nb\r\n").reply == "550 5.6.0 Message contains NUL characters"


def test_received_headers_are_counted_in_the_top_level_header_section_only():
    head = b"Received: a\r\n\tfolded\r\nRECEIVED : b\r\nSubject: s\r\nreceived:c\r\n"
    body = b"\r\nReceived: in the body\r\n"
    assert count_received(head + body) == 3
    assert isinstance(clean_message(head + body, hop_limit=3), bytes)
    assert clean_message(head + body, hop_limit=2).reply.startswith("554 5.4.6")


def test_header_section_ends_at_the_first_non_header_line():
    data = b"Subject: s\r\nnot a header line\r\n" + b"x" * 5000 + b"\r\n"
    assert isinstance(clean_message(data, max_header_size=100), bytes)
    assert clean_message(b"X: " + b"v" * 200 + b"\r\n\r\n", max_header_size=100).reply.startswith("552 5.3.4")


def test_received_header_from_hostile_values_is_one_header():
    header = received_header(helo="a\rX-Injected: yes\r\n", peer_ip="127.0.0.1\nX-Evil: 1",
                             hostname="relay.test", protocol="ESMTPS", queue_id="Q1\r\nX: y",
                             recipient="b\r\nX-Bcc: x@y.test@z.test", tls="TLSv1.3", when=0)
    assert header.endswith(b"\r\n") and not BARE.search(header)
    message = email.message_from_bytes(header + b"Subject: s\r\n\r\nbody\r\n")
    assert [k for k in message.keys()] == ["Received", "Subject"]
    assert b"\r\nX-" not in header
    assert all(line.startswith((b"Received:", b"\t")) for line in header.split(b"\r\n")[:-1])
    assert all(len(line) <= 998 for line in header.split(b"\r\n"))


def test_clean_text_removes_controls():
    text = "5.1.1 User unknown\n5.1.1 \x1b[31mX-Injected: evil\n5.1.1 bye\rX-Also: bare-cr"
    cleaned = clean_text(text)
    assert not re.search(r"[\x00-\x1f\x7f]", cleaned)
    assert clean_text("x" * 1000, limit=50).endswith("...") and len(clean_text("x" * 1000, limit=50)) == 50


@pytest.mark.parametrize("name, ok", [
    ("mail.example.org", True), ("[192.0.2.1]", True), ("bücher.test", True),
    ("", False), ("a b", False), ("a\rb", False), ("a\x00", False), ("\x1b[2J", False), ("x" * 256, False),
])
def test_helo_names(name, ok):
    assert (check_helo(name) is None) == ok


@pytest.mark.parametrize("arg, expected", [
    ("<a@x.test>", Path("a@x.test", ())),
    ("<a@x.test> SIZE=10 BODY=8BITMIME", Path("a@x.test", ("SIZE=10", "BODY=8BITMIME"))),
    (" <a@x.test>", Path("a@x.test", ())),
    ("<>", Path("", ())),
    ("<@r1.test,@r2.test:a@x.test>", Path("a@x.test", ())),
    ('<"a b>c"@x.test>', Path('"a b>c"@x.test', ())),
    ("<u%outside.test@local.test>", Path("u%outside.test@local.test", ())),
    ("<a@[192.0.2.1]>", Path("a@[192.0.2.1]", ())),
])
def test_valid_paths(arg, expected):
    assert parse_path(arg, role="sender", smtputf8=False) == expected


def test_null_recipient_and_postmaster_without_domain():
    assert parse_path("<>", role="recipient", smtputf8=False).reply.startswith("501 5.1.3")
    assert parse_path("<Postmaster>", role="recipient", smtputf8=False).reply.startswith("550 5.1.1")


_ADDR_CHARS = st.sampled_from(list("ab.@\"\\<>()[]:;, %!+-=/?^_`{|}~#$&'*x1 é\t\x00\x7f\udcff"))


@given(st.text(_ADDR_CHARS, max_size=24), st.booleans())
def test_paths_are_validated_or_refused_never_raising(text, smtputf8):
    """Everything accepted is canonical: the outbound client quotes it back unchanged (H8),
    and it holds no control character, space outside quotes, or undecodable byte."""
    from aiosmtplib.email import quote_address
    for arg in (text, f"<{text}>"):
        result = parse_path(arg, role="recipient", smtputf8=smtputf8)
        assert isinstance(result, (Path, Refusal))
        if isinstance(result, Path):
            assert not re.search(r"[\x00-\x1f\x7f\ud800-\udfff]", result.address)
            assert quote_address(result.address) == f"<{result.address}>"
            assert smtputf8 or result.address.isascii()
