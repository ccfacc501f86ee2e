"""routedsl: the routes language (parse, lint, compile) as a pure library.

    table = routedsl.load("routes.rules")          # RulesError(.diagnostics) if invalid
    table.plan("friend@aol.com", sender="me@home.net", size=3_000_000).engines

Nothing here opens a socket, writes a file or imports the relay.
"""
from routedsl.api import RulesError, check_text, compile_text, load
from routedsl.diagnostics import Diagnostic, render_human, render_json
from routedsl.table import Decision, EngineSpec, RouteTable, RuleRef, SecretRef

__all__ = [
    "Decision", "Diagnostic", "EngineSpec", "RouteTable", "RuleRef", "RulesError", "SecretRef",
    "check_text", "compile_text", "load", "render_human", "render_json",
]
