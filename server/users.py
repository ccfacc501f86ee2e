"""The submission users file and `routedsl users add|remove|list FILE [LOGIN]`.

This module owns the file format and password checking. One user per line:

    login:$scrypt$n=16384,r=8,p=1$<salt, base64>$<key, base64>

The hash string names its algorithm and parameters, so stronger parameters can be
introduced later without breaking existing lines. `$argon2id$...` lines (argon2-cffi)
are verified too when that library is installed. Blank lines and `#` comments are kept.

Passwords are checked in constant time, and a login that does not exist costs the same
as a wrong password (no user oracle). The file is rewritten atomically (temp file,
fsync, rename) with mode 0600. It never logs a password, and never reads one from
the command line: it is typed without echo, or read as one line from a non-tty stdin.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import secrets
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from server.files import replace_file

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_KEY_LEN = 32
_MAXMEM = 64 * 1024 * 1024


class UsersError(ValueError):
    """A users file or login that cannot be used; the message says why."""


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted, self-describing scrypt hash of `password`."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=_KEY_LEN, maxmem=_MAXMEM)
    b64 = lambda b: base64.b64encode(b).decode("ascii").rstrip("=")   # noqa: E731
    return f"$scrypt$n={n},r={r},p={p}${b64(salt)}${b64(key)}"


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def check_password(password: str, stored: str) -> bool:
    """True when `password` matches the stored hash string; False for any malformed hash."""
    try:
        if stored.startswith("$scrypt$"):
            _, _, params, salt, key = stored.split("$")
            values = dict(item.split("=") for item in params.split(","))
            n, r, p = int(values["n"]), int(values["r"]), int(values["p"])
            expected = _unb64(key)
            actual = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt), n=n, r=r, p=p,
                                    dklen=len(expected), maxmem=_MAXMEM)
            return hmac.compare_digest(actual, expected)
        if stored.startswith("$argon2"):
            from argon2 import PasswordHasher
            from argon2.exceptions import Argon2Error
            try:
                return PasswordHasher().verify(stored, password)
            except Argon2Error:
                return False
    except (ValueError, KeyError, ImportError):
        return False
    return False


# A hash to check unknown logins against, so that they cost as much as known ones.
_DUMMY = hash_password(secrets.token_hex(16))


def check_login(login: str) -> Optional[str]:
    """None when `login` can be stored, else what is wrong with it."""
    if not login:
        return "the login is empty"
    if len(login) > 255:
        return "the login is longer than 255 characters"
    if ":" in login or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in login):
        return "the login may not contain ':', spaces or control characters"
    return None


def read_users(path: str | Path) -> dict[str, str]:
    """login -> hash string. Raises UsersError for an unreadable file or a malformed line."""
    return _read(path)[0]


def _read(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """The users of the file and its comment lines (kept when the file is rewritten)."""
    users: dict[str, str] = {}
    comments: list[str] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersError(f"cannot read users file {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            comments.append(line)
            continue
        if not line.strip():
            continue
        login, sep, stored = line.partition(":")
        if not sep or check_login(login) or not stored.startswith("$"):
            raise UsersError(f"{path}:{number}: expected 'login:hash'")
        users[login] = stored
    return users, comments


class UserStore:
    """The users of a file, re-read when the file changes; `verify` is safe to call from threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: Optional[tuple[int, int, int]] = None
        self._users: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise UsersError(f"cannot read users file {self.path}: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._users = read_users(self.path)
            self._stamp = stamp

    def verify(self, login: str, password: str) -> bool:
        """True when the login exists and the password matches (constant time, no oracle)."""
        with self._lock:
            try:
                self._load()
            except UsersError:
                pass   # keep the users read last; a half-written edit must not lock everyone out
            stored = self._users.get(login)
        ok = check_password(password, stored or _DUMMY)
        return ok and stored is not None


def write_users(path: str | Path, users: dict[str, str], header: Sequence[str] = ()) -> None:
    """Replace the file atomically (server/files.py), readable by its owner only (0600)."""
    lines = [*header, *(f"{login}:{stored}" for login, stored in users.items())]
    replace_file(path, "".join(line + "\n" for line in lines).encode("utf-8"), mode=0o600)


def _read_password(stdin=None) -> Optional[str]:
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            print("routedsl users: the passwords differ", file=sys.stderr)
            return None
        return first
    line = stdin.readline()
    return line[:-1] if line.endswith("\n") else line


USAGE = "usage: routedsl users add FILE LOGIN | users remove FILE LOGIN | users list FILE"


def main(argv: Sequence[str]) -> int:
    """`routedsl users ...`; returns the exit code (0 ok, 1 failed, 2 usage)."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    action, rest = args[0], args[1:]
    if action not in ("add", "remove", "list") or len(rest) != (1 if action == "list" else 2):
        print(USAGE, file=sys.stderr)
        return 2
    path = Path(rest[0])
    try:
        users, comments = _read(path) if path.exists() else ({}, [])
    except UsersError as exc:
        print(f"routedsl users: {exc}", file=sys.stderr)
        return 1
    if action == "list":
        for login in users:
            print(login)
        return 0
    login = rest[1]
    problem = check_login(login)
    if problem:
        print(f"routedsl users: {problem}", file=sys.stderr)
        return 2
    if action == "remove":
        if users.pop(login, None) is None:
            print(f"routedsl users: no user '{login}' in {path}", file=sys.stderr)
            return 1
    else:
        password = _read_password()
        if password is None:
            return 1
        if not password:
            print("routedsl users: the password is empty", file=sys.stderr)
            return 1
        existed = login in users
        users[login] = hash_password(password)
    try:
        write_users(path, users, comments)
    except OSError as exc:
        print(f"routedsl users: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    done = "removed" if action == "remove" else "changed the password of" if existed else "added"
    print(f"{done} {login} in {path}", file=sys.stderr)
    return 0
