"""Who is calling: identities bound to bearer tokens, with a role.

Why: the memory is per user, so the server must know the caller from a credential it
checks, never from a field the caller fills in (OpenAI's `user`). Two modes:

- **Several users** (`heedful serve --users-file users.yaml`): each user has a token; the
  file holds only the tokens' SHA-256 hashes (tokens are long random strings, so a fast
  hash is enough: nothing to brute-force), a name and a role (`user` or `admin`). The file
  must be mode 0600. `heedful users add NAME --users-file F` writes an entry and prints
  the token once.
- **One user** (`--token-file`, or no token on loopback): every caller is the same
  principal, `default`, with the admin role: the whole memory is theirs.

Users file (YAML or JSON)::

    users:
      - name: alice
        role: user            # user | admin
        token_sha256: 3f1c...  # sha256 hex of alice's token
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["user", "admin"]
SINGLE_USER = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


class IdentityError(RuntimeError):
    """The token or users file cannot be used (missing, readable by others, malformed)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `verified`: a credential proved it (False only without auth)."""

    name: str
    role: Role = "user"
    verified: bool = True
    auth: Literal["users_file", "token", "none"] = "users_file"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "hf-" + secrets.token_urlsafe(32)


def check_private_file(path: Path, what: str) -> None:
    """A secrets file must be a regular file only its owner can read or write (0600 or stricter)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} not found") from None
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise IdentityError(f"{what} {path} is readable by others (mode {mode:04o}); run: chmod 600 {path}")


def _parse(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text or "{}")
        except ValueError as exc:
            raise IdentityError(f"{path}: not valid JSON ({exc})") from None
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise IdentityError(f"{path}: not valid YAML ({exc})") from None


def _line_of(path: Path, name: str) -> str:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.search(rf"\b{re.escape(str(name))}\b", line):
            return f"{path}:{number}"
    return str(path)


@dataclass(frozen=True)
class UserEntry:
    name: str
    role: Role
    token_sha256: str


def read_users(path: str | Path) -> list[UserEntry]:
    """The users file's entries, checked: 0600, unique names and hashes, known roles."""
    path = Path(path).expanduser()
    check_private_file(path, "users file")
    data = _parse(path)
    rows = data.get("users") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise IdentityError(f"{path}: expected a mapping with a 'users' list")
    entries, names, hashes = [], set(), set()
    for i, row in enumerate(rows):
        where = f"{path}: users[{i}]"
        if not isinstance(row, dict):
            raise IdentityError(f"{where}: expected a mapping with name, role, token_sha256")
        name, role, digest = row.get("name"), row.get("role", "user"), str(row.get("token_sha256", "")).lower()
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise IdentityError(f"{where}: field 'name' must be 1-128 letters, digits, '.', '_', '@' or '-'")
        where = _line_of(path, name) + f": user '{name}'"
        if role not in ("user", "admin"):
            raise IdentityError(f"{where}: field 'role' must be 'user' or 'admin', got {role!r}")
        if not _HEX.match(digest):
            raise IdentityError(
                f"{where}: field 'token_sha256' must be 64 hex digits, quoted (sha256 of the "
                "token; `heedful users add` writes it)"
            )
        if name in names or name == SINGLE_USER:
            raise IdentityError(f"{where}: field 'name' is a duplicate or reserved ('{SINGLE_USER}')")
        if digest in hashes:
            raise IdentityError(f"{where}: field 'token_sha256' is shared with another user")
        names.add(name)
        hashes.add(digest)
        entries.append(UserEntry(name, role, digest))
    if not entries:
        raise IdentityError(f"{path}: no users")
    return entries


def write_users(path: str | Path, entries: list[UserEntry]) -> None:
    """Replace the users file atomically; created 0600 before anything is written into it."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    rows = [{"name": e.name, "role": e.role, "token_sha256": e.token_sha256} for e in entries]
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        if path.suffix == ".json":
            json.dump({"users": rows}, f, indent=2)
        else:
            import yaml

            yaml.safe_dump({"users": rows}, f, sort_keys=False)
    os.replace(tmp, path)


class Authenticator:
    """Maps a bearer token to a Principal; `None` means: refuse (401)."""

    def __init__(self, users_file: str | Path | None = None, token_file: str | Path | None = None):
        if users_file and token_file:
            raise IdentityError("give either --users-file (several users) or --token-file (one user), not both")
        self.multi_user = users_file is not None
        self._users: list[UserEntry] = read_users(users_file) if users_file else []
        self._token = load_token(token_file) if token_file else None

    @property
    def open(self) -> bool:
        """No credential is asked for (one user, loopback)."""
        return not self.multi_user and self._token is None

    def single(self) -> Principal:
        """The one principal of single-user mode."""
        if self._token is not None:
            return Principal(SINGLE_USER, "admin", True, "token")
        return Principal(SINGLE_USER, "admin", False, "none")

    def authenticate(self, given: str | None) -> Principal | None:
        if self.open:
            return self.single()
        if not given:
            return None
        if self._token is not None:
            return self.single() if hmac.compare_digest(given.encode(), self._token.encode()) else None
        digest = hash_token(given)
        found = None
        for entry in self._users:  # compare against every entry: the time does not say which one matched
            if hmac.compare_digest(digest, entry.token_sha256):
                found = entry
        return Principal(found.name, found.role, True, "users_file") if found else None


def load_token(path: str | Path) -> str:
    """The bearer token from a file only its owner can read (mode 0600 or stricter)."""
    path = Path(path).expanduser()
    check_private_file(path, "token file")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise IdentityError(f"token file {path} holds a token shorter than 16 characters")
    return token
