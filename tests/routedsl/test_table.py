"""RouteTable.plan: first-match semantics, the plan shapes, matching rules, and the indexes.

The property test compares the compiled table (indexes + closures) with NaiveTable, a
plain top-to-bottom reading of the AST, on random rule files and messages.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import routedsl
from routedsl.api import analyse
from routedsl.naive import NaiveTable

ENGINES = """\
engine isp      = smtp://smtp.someisp.com:587 user "me@someisp.com" password env:ISP_PASSWORD
engine direct   = direct
engine somehost = smtps://smtp.somehost.com:465
engine provider = smtp://smtp.someprovider.com:587 user "you@someprovider.com" password env:PROVIDER_PASSWORD
"""


def table(rules: str) -> routedsl.RouteTable:
    return routedsl.compile_text(ENGINES + rules)


def test_spec_section_1_file_gives_the_spec_plans():
    t = table("if destination is aol.com then try somehost first\n"
              "if from is youraccount@someprovider.com then try provider first\n"
              "if size is larger than 2000kb then try isp first\n")
    assert t.plan("friend@aol.com").engines == ("somehost", "isp", "direct", "provider")
    d = t.plan("bob@example.org", "youraccount@someprovider.com", 10_000)
    assert d.engines == ("provider", "isp", "direct", "somehost")
    assert (d.rule.line, d.rule.text) == (6, "if from is youraccount@someprovider.com then try provider first")
    assert d.rule.file == "routes.rules"
    assert t.plan("bob@example.org", "me@home.net", 2_000_000).rule is None      # strictly larger
    assert t.plan("bob@example.org", "me@home.net", 2_000_001).rule.line == 7
    assert t.plan("x@example.org") == routedsl.Decision(("isp", "direct", "somehost", "provider"), None)


def test_first_matching_rule_decides_even_when_a_later_one_is_more_specific():
    t = table("if destination is *.example.com then use only direct\n"
              "if destination is mx.example.com then use only isp\n")
    assert t.plan("a@mx.example.com").engines == ("direct",)


def test_use_only_has_no_fallback_and_try_first_appends_the_rest_once():
    t = table("if destination is a.org then use only provider, isp\n"
              "if destination is b.org then try direct, isp first\n")
    assert t.plan("x@a.org").engines == ("provider", "isp")
    assert t.plan("x@b.org").engines == ("direct", "isp", "somehost", "provider")


@pytest.mark.parametrize("recipient,hit", [
    ("a@aol.com", True), ("A@AOL.COM", True), ("a@aol.com.", True), ("a@mx.aol.com", False),
    ("a@notaol.com", False), ("aol.com", False),
])
def test_destination_is_exact_and_case_insensitive(recipient, hit):
    t = table("if destination is AOL.com then use only direct\n")
    assert (t.plan(recipient).engines == ("direct",)) is hit


@pytest.mark.parametrize("recipient,hit", [
    ("a@mx.aol.com", True), ("a@a.b.aol.com", True), ("a@aol.com", False), ("a@xaol.com", False),
])
def test_wildcard_matches_subdomains_only(recipient, hit):
    t = table("if destination is *.aol.com then use only direct\n")
    assert (t.plan(recipient).engines == ("direct",)) is hit


def test_address_fields_sender_domain_and_bounces():
    t = table("if from is <> then use only direct\n"
              "if recipient is *@lists.example.org then use only somehost\n"
              "if from domain is home.net then use only provider\n"
              "if recipient is Boss@Example.org then use only isp\n")
    assert t.plan("a@b.c", sender="").engines == ("direct",)
    assert t.plan("a@b.c", sender="<>").engines == ("direct",)
    assert t.plan("x@lists.example.org", sender="me@home.net").engines == ("somehost",)
    assert t.plan("x@b.c", sender="Me@HOME.net").engines == ("provider",)
    assert t.plan("boss@example.org", sender="z@y.x").engines == ("isp",)


def test_regex_is_searched_case_insensitively():
    t = table('if recipient matches "^postmaster@" then use only direct\n')
    assert t.plan("PostMaster@example.org").engines == ("direct",)
    assert t.plan("x.postmaster@example.org").rule is None


def test_mx_rules_match_any_mx_host_and_need_mx():
    t = table("if mx is *.mail.protection.outlook.com then use only isp\n")
    assert t.needs_mx
    assert not table("if size is larger than 1mb then use only isp\n").needs_mx
    assert t.plan("a@contoso.com", mx=("backup.contoso.com", "contoso-com.mail.protection.outlook.com.")).engines == ("isp",)
    assert t.plan("a@contoso.com").rule is None


def test_size_thresholds_keep_first_match_order():
    t = table("if size is larger than 10mb then use only isp\n"
              "if size is larger than 1mb then use only direct\n"
              "if size is smaller than 1kb then use only provider\n"
              "if size is smaller than 100kb then use only somehost\n")
    assert t.plan("a@b.c", size=20_000_000).engines == ("isp",)
    assert t.plan("a@b.c", size=2_000_000).engines == ("direct",)
    assert t.plan("a@b.c", size=500).engines == ("provider",)
    assert t.plan("a@b.c", size=50_000).engines == ("somehost",)
    assert t.plan("a@b.c", size=500_000).rule is None


def test_table_is_immutable_and_versioned():
    t = table("")
    with pytest.raises(AttributeError):
        t.needs_mx = True  # type: ignore[misc]
    assert t.version == table("").version != table("# changed\n").version
    assert (t.rule_count, t.expect_count, t.source) == (0, 0, "routes.rules")
    assert t.engine("SomeHost").tls == "implicit"
    with pytest.raises(KeyError):
        t.engine("nope")


def test_compile_text_raises_rules_error_with_diagnostics():
    with pytest.raises(routedsl.RulesError) as err:
        routedsl.compile_text(ENGINES + "if destination is aol.com then try somehst first\n", "r.rules")
    assert [d.code for d in err.value.diagnostics] == ["unknown-engine"]
    assert "r.rules:5:36" in str(err.value)


# ---- compiled table == naive top-to-bottom evaluator

DOMAINS = ["x.com", "a.x.com", "b.a.x.com", "z.org", "X.COM"]
WILD = ["*.x.com", "*.a.x.com", "*.org", "*x.com", "b.*.com"]
ADDRS = ["u@x.com", "v@y.com", "U@X.com", "w@a.x.com", "p@z.org", "*@x.com", "*@*.com"]
SIZES = ["0b", "1kb", "2kb", "5kb", "1kib"]


def atom():
    dom_field = st.sampled_from(["destination", "from domain", "mx"])
    addr_field = st.sampled_from(["recipient", "from"])
    dom_val = st.sampled_from(DOMAINS + WILD)
    addr_val = st.sampled_from(ADDRS)
    simple = st.builds(lambda f, v: f"{f} is {v}", dom_field, dom_val)
    return st.one_of(
        simple, simple, simple,      # the indexed shapes, often, so index bugs surface quickly
        st.builds(lambda v: f"destination is {v}", st.sampled_from(WILD)),
        st.builds(lambda f, v, n: f"{f} is {'not ' if n else ''}{v}", dom_field, dom_val, st.booleans()),
        st.builds(lambda f, vs, n: f"{f} is {'not ' if n else ''}one of {', '.join(vs)}",
                  dom_field, st.lists(dom_val, min_size=1, max_size=3), st.booleans()),
        st.builds(lambda f, v: f"{f} is {v}", addr_field, addr_val),
        st.builds(lambda v: f"from is {v}", st.sampled_from(["<>", "u@x.com"])),
        st.builds(lambda f, vs: f"{f} is one of {', '.join(vs)}", addr_field, st.lists(addr_val, min_size=1, max_size=3)),
        st.builds(lambda op, v: f"size is {op} than {v}", st.sampled_from(["larger", "smaller"]), st.sampled_from(SIZES)),
        st.builds(lambda f, r: f'{f} matches "{r}"', st.sampled_from(["recipient", "destination", "mx", "from"]),
                  st.sampled_from(["x", "^u@", r"\.org$", "a.x"])),
    )


conditions = st.recursive(
    atom(),
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"({a} and {b})", inner, inner),
        st.builds(lambda a, b: f"({a} or {b})", inner, inner),
        st.builds(lambda a: f"not ({a})", inner),
    ),
    max_leaves=3,
)
actions = st.builds(
    lambda mode, names: f"try {', '.join(names)} first" if mode else f"use only {', '.join(names)}",
    st.booleans(), st.lists(st.sampled_from(["isp", "direct", "somehost", "provider"]), min_size=1, max_size=3, unique=True))
rules_files = st.lists(st.builds(lambda c, a: f"if {c} then {a}", conditions, actions), max_size=12)
queries = st.tuples(
    st.builds(lambda l, d: f"{l}@{d}", st.sampled_from(["u", "U", "w", "p"]), st.sampled_from(DOMAINS + ["q.a.x.com", "org"])),
    st.sampled_from(["", "u@x.com", "V@Y.com", "w@a.x.com", "p@z.org", "u@b.a.x.com"]),
    st.sampled_from([0, 999, 1000, 1001, 1024, 1500, 2000, 5001]),
    st.lists(st.sampled_from(DOMAINS + ["m.z.org"]), max_size=2).map(tuple),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules_files, st.lists(queries, min_size=1, max_size=8))
def test_compiled_table_agrees_with_naive_evaluator(rules, qs):
    text = ENGINES + "\n".join(rules) + "\n"
    compiled, diags, rf = analyse(text)
    assert compiled is not None, [d.message for d in diags if d.is_error]
    naive = NaiveTable(rf, compiled.engines)
    for q in qs:
        assert compiled.plan(*q) == naive.plan(*q), (text, q)


def test_internationalized_domains_match_in_either_form():
    t = table("if destination is bücher.de then use only direct\n"
              "if from domain is xn--mnchen-3ya.de then use only isp\n")
    assert t.plan("a@xn--bcher-kva.de").engines == ("direct",)
    assert t.plan("a@BÜCHER.de").engines == ("direct",)
    assert t.plan("a@x.org", sender="b@münchen.de").engines == ("isp",)


def test_engine_names_may_be_quoted():
    t = routedsl.compile_text('engine "Big ISP" = smtp://smtp.big.example\nengine direct = direct\n'
                              'if destination is a.org then try "big isp" first\n')
    assert t.plan("x@a.org").engines == ("big isp", "direct")
    assert t.plan("x@a.org").rule.text == 'if destination is a.org then try "big isp" first'


def test_one_mx_host_may_be_given_bare():
    t = table("if mx is mx1.contoso.com then use only isp\n")
    assert t.plan("a@contoso.com", mx="MX1.contoso.com.").engines == ("isp",)
