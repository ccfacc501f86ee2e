"""Resolve an engine's password reference (`env:VAR`, `file:PATH`, `"literal"`) to its value.

Used by `serve` at start and by every reload, so a missing secret refuses the start or the
reload instead of failing at the first delivery. It never logs or echoes a secret value,
and never reads anything for `routedsl check` (the language checks the form only).
"""
from __future__ import annotations

import os
from typing import Optional

from routedsl.table import SecretRef


class SecretError(Exception):
    """A referenced secret cannot be read; `.message` says which and why (never the value)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def resolve_secret(ref: Optional[SecretRef]) -> Optional[str]:
    """Return the secret `ref` points at, None when there is no reference.

    Raises SecretError when the variable is unset, the file is missing or unreadable, or
    the value is empty. `file:` values lose one trailing newline (as `echo pw > file`
    writes), nothing else.
    """
    if ref is None:
        return None
    if ref.kind == "literal":
        value = ref.value
        where = "the literal password"
    elif ref.kind == "env":
        if ref.value not in os.environ:
            raise SecretError(f"environment variable {ref.value} is not set")
        value = os.environ[ref.value]
        where = f"environment variable {ref.value}"
    elif ref.kind == "file":
        try:
            with open(ref.value, "rb") as fh:
                raw = fh.read(64 * 1024 + 1)
        except FileNotFoundError:
            raise SecretError(f"password file {ref.value} does not exist") from None
        except IsADirectoryError:
            raise SecretError(f"password file {ref.value} is a directory") from None
        except OSError as exc:
            raise SecretError(f"cannot read password file {ref.value}: {exc.strerror}") from None
        if len(raw) > 64 * 1024:
            raise SecretError(f"password file {ref.value} is too large to be a password")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"password file {ref.value} is not UTF-8 text") from None
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
        where = f"password file {ref.value}"
    else:
        raise SecretError(f"unknown password source {ref.kind!r}")
    if value == "":
        raise SecretError(f"{where} is empty")
    return value
