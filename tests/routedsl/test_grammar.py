"""The grammar: conflict-free LALR, canonical forms, the seed's wording, and the fast scanner."""
import importlib.util

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lark.exceptions import UnexpectedInput

import routedsl
from routedsl import syntax
from routedsl.ast import Is, Value


def test_grammar_builds_in_strict_mode():
    """Strict mode fails on any shift/reduce conflict (and, with interegular, on terminal collisions)."""
    if importlib.util.find_spec("interegular") is not None:
        syntax.make_parser(strict=True)
    else:   # no collision checker installed: still refuse every parser-table conflict
        from lark.common import ParserConf
        from lark.load_grammar import load_grammar
        from lark.parsers.lalr_analysis import LALR_Analyzer
        grammar, _ = load_grammar(syntax.grammar_text(), "<routes>", None, False)
        terminals, rules, _ = grammar.compile(["start"], set())
        LALR_Analyzer(ParserConf(rules, None, ["start"]), strict=True).compute_lalr()


SEED = """\
engine smtp.someisp.com      = smtp://smtp.someisp.com:587 user "me@someisp.com" password env:ISP_PASSWORD
engine direct                = direct
engine smtp.somehost.com     = smtps://smtp.somehost.com:465 user "me" password file:/etc/routedsl/somehost.pw
engine smtp.someprovider.com = smtp://smtp.someprovider.com:587 user "youraccount@someprovider.com" password env:PROVIDER_PASSWORD

If <destination mail server> is <aol.com>
then try this delivery engine first:[smtp.somehost.com]

If <from address> is <youraccount@someprovider.com>
then try this delivery engine first:[smtp.someprovider.com]

If <mail size> is larger than <2000kb>
then try this delivery engine first:[smtp.someisp.com]
"""

SHORT = SEED.split("If ")[0] + """\
if destination is aol.com then try smtp.somehost.com first
if from is youraccount@someprovider.com then try smtp.someprovider.com first
if size is larger than 2000kb then try smtp.someisp.com first
"""


def test_seed_wording_and_short_forms_give_equal_trees_and_tables():
    seed_ast, d1 = syntax.parse(SEED)
    short_ast, d2 = syntax.parse(SHORT)
    assert d1 == d2 == []
    assert seed_ast == short_ast
    assert [r.span.line for r in seed_ast.rules] == [6, 9, 12]
    seed, short = routedsl.compile_text(SEED), routedsl.compile_text(SHORT)
    # the manual's third rule names the first declared engine: valid, and worth a warning
    assert [(d.code, d.line) for d in routedsl.check_text(SEED)] == [("no-effect", 13)]
    for args in [("friend@aol.com", "me@home.net", 10), ("bob@example.org", "youraccount@someprovider.com", 10),
                 ("bob@example.org", "me@home.net", 3_000_000), ("bob@example.org", "me@home.net", 2_000_000)]:
        a, b = seed.plan(*args), short.plan(*args)
        assert a.engines == b.engines
        assert (a.rule and a.rule.text) == (b.rule and b.rule.text)
    assert seed.plan("friend@aol.com").engines == (
        "smtp.somehost.com", "smtp.someisp.com", "direct", "smtp.someprovider.com")
    assert seed.plan("x@y.org", size=2_000_001).rule.line == 12


CANONICAL = [
    ("IF Destination IS aol.com THEN TRY isp FIRST", "if destination is aol.com then try isp first"),
    ("if destination domain is <aol.com> then try isp first", "if destination is aol.com then try isp first"),
    ("if to domain is aol.com then try isp first", "if destination is aol.com then try isp first"),
    ("if to is a@b.c then try isp first", "if recipient is a@b.c then try isp first"),
    ("if to address is a@b.c then try isp first", "if recipient is a@b.c then try isp first"),
    ("if sender is <> then use only isp", "if from is <> then use only isp"),
    ('if from is "" then use only isp', "if from is <> then use only isp"),
    ("if sender domain is not x.org then use only isp", "if from domain is not x.org then use only isp"),
    ("if message size is bigger than 2048kib then try isp first", "if size is larger than 2mib then try isp first"),
    ("if size is less than 1000 then try isp first", "if size is smaller than 1kb then try isp first"),
    ("if mx host is one of a.net, *.b.net then try isp, direct first",
     "if mx is one of a.net, *.b.net then try isp, direct first"),
    ("if destination is not one of a.net, b.net then try isp first",
     "if destination is not one of a.net, b.net then try isp first"),
    ('if from matches "^a\\\\.b" then try isp first', 'if from matches "^a\\\\.b" then try isp first'),
    ("if not (destination is a.net or destination is b.net) and size is larger than 1mb then use only isp",
     "if not (destination is a.net or destination is b.net) and size is larger than 1mb then use only isp"),
    ("if destination is a.net or destination is b.net and from is x@y.z then use only isp",
     "if destination is a.net or destination is b.net and from is x@y.z then use only isp"),
    ("if (destination is a.net or destination is b.net) and from is x@y.z then use only isp",
     "if (destination is a.net or destination is b.net) and from is x@y.z then use only isp"),
    ("if destination is aol.com then use only these delivery engines: [isp, direct]",
     "if destination is aol.com then use only isp, direct"),
    ("if destination is \"then\" then try isp first", 'if destination is "then" then try isp first'),
    ("engine ISP = SMTP://Mail.Example.com:587 tls none max size 10mb",
     "engine isp = SMTP://Mail.Example.com:587 tls none max size 10mb"),
    ("expect mail to a@b.c from <> size 3mb with mx m1.b.c, m2.b.c goes via isp",
     "expect mail from <> to a@b.c size 3mb with mx m1.b.c, m2.b.c goes via isp"),
]


@pytest.mark.parametrize("text,canonical", CANONICAL)
def test_canonical_form_round_trips(text, canonical):
    tree, diags = syntax.parse(text + "\n")
    assert diags == []
    assert str(tree).strip() == canonical
    again, _ = syntax.parse(canonical)
    assert str(again).strip() == canonical
    if "kib" not in text and "1000" not in text:      # sizes are re-spelled: 2048kib -> 2mib
        assert again == tree


def test_precedence_not_binds_tighter_than_and_tighter_than_or():
    tree, _ = syntax.parse("if not destination is a.net and from is b@c.d or size is larger than 1mb then try x first")
    cond = tree.rules[0].condition
    assert type(cond).__name__ == "Or"
    assert type(cond.operands[0]).__name__ == "And"
    assert type(cond.operands[0].operands[0]).__name__ == "Not"


def test_keywords_are_names_where_no_keyword_fits():
    tree, diags = syntax.parse("engine only = direct\nengine first = direct port 26\n"
                               "if destination is one.example then try only, first first\n")
    assert diags == []
    assert [n.key for n in tree.rules[0].action.engines] == ["only", "first"]
    assert tree.rules[0].condition == Is(tree.rules[0].condition.field, (Value("one.example"),))


def test_spans_point_at_what_was_written():
    tree, _ = syntax.parse("\n\nif   destination is aol.com then try isp first\n")
    rule = tree.rules[0]
    assert (rule.span.line, rule.span.column) == (3, 1)
    value = rule.condition.values[0]
    assert (value.span.line, value.span.column, value.span.end_column) == (3, 21, 28)


# ---- the fast scanner against lark's own contextual lexer

FRAGMENTS = [
    "engine", "if", "then", "try", "first", "use", "only", "is", "not", "one", "of", "larger", "smaller",
    "than", "matches", "and", "or", "expect", "mail", "to", "from", "size", "with", "mx", "goes", "via",
    "max", "this", "delivery", "engines", "destination", "aol.com", "*.aol.com", "a@b.c", "isp", "direct",
    "2000kb", "smtp://h.example:587", "env:X", "file:/p", '"q s"', "=", ",", "(", ")", "<", ">", "[", "]", ":",
    "\n", "\\\n", "# c\n", "\t", "user", "password", "tls", "none", "timeout", "5s",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=25), st.lists(st.sampled_from([" ", "", "  "]), min_size=25, max_size=25))
def test_fast_scanner_agrees_with_lark(frags, seps):
    text = "".join(f + s for f, s in zip(frags, seps))
    try:
        expected = syntax.parser().parse(text)
    except UnexpectedInput:
        expected = None
    try:
        got = syntax.scanner().parse(text)
    except UnexpectedInput:
        got = None
    assert got == expected
