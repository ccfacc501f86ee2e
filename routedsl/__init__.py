"""routedsl: the routes language (parse, lint, compile) as a pure library."""
from routedsl.table import Decision, EngineSpec, RuleRef, SecretRef

__all__ = ["Decision", "EngineSpec", "RuleRef", "SecretRef"]
