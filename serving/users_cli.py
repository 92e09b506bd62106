"""`heedful users add | list | remove`: the users file of a several-user `heedful serve --users-file`.

The file holds names, roles and the SHA-256 of each token, never a token; `add` prints the
new token once (give it to the user; it cannot be shown again, only replaced with `add
--replace`). The file is written 0600, atomically. Restart the server to apply changes.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Users of `heedful serve --users-file`: tokens (stored hashed) and roles.", no_args_is_help=True)
console = Console(highlight=False)
UsersFileOpt = typer.Option(..., "--users-file", "-f", help="the users file (YAML or .json), mode 0600")


def _read(path: Path, must_exist: bool):
    from pipeline.errors import HeedfulError

    from .identity import IdentityError, read_users

    if not path.exists() and not must_exist:
        return []
    try:
        return read_users(path)
    except IdentityError as exc:
        raise HeedfulError(str(exc)) from None


@app.command()
def add(
    name: str = typer.Argument(..., help="user name (letters, digits, . _ @ -)"),
    users_file: Path = UsersFileOpt,
    role: str = typer.Option("user", "--role", help="user | admin"),
    replace: bool = typer.Option(False, "--replace", help="give an existing user a new token (and this role)"),
):
    """Add a user with a new random token, printed once."""
    from pipeline.errors import HeedfulError

    from .identity import NAME_PATTERN, SINGLE_USER, UserEntry, hash_token, new_token, write_users

    if role not in ("user", "admin"):
        raise HeedfulError(f"--role must be 'user' or 'admin', got {role!r}")
    if not NAME_PATTERN.match(name) or name == SINGLE_USER:
        raise HeedfulError(f"user name {name!r}: use 1-128 letters, digits, '.', '_', '@' or '-' (not '{SINGLE_USER}')")
    entries = _read(users_file, must_exist=False)
    if any(e.name == name for e in entries) and not replace:
        raise HeedfulError(f"{users_file}: user '{name}' exists (use --replace to issue a new token)")
    token = new_token()
    entries = [e for e in entries if e.name != name] + [UserEntry(name, role, hash_token(token))]  # type: ignore[arg-type]
    write_users(users_file, entries)
    console.print(f"{'replaced' if replace else 'added'} {role} '{name}' in {users_file}; token (shown once):")
    print(token)


@app.command("list")
def list_users(users_file: Path = UsersFileOpt):
    """Names and roles (no tokens: the file has only their hashes)."""
    table = Table(title=str(users_file), title_justify="left")
    table.add_column("name")
    table.add_column("role")
    for entry in _read(users_file, must_exist=True):
        table.add_row(entry.name, entry.role)
    console.print(table)


@app.command()
def remove(name: str = typer.Argument(...), users_file: Path = UsersFileOpt):
    """Remove a user (their token stops working when the server restarts)."""
    from pipeline.errors import HeedfulError

    from .identity import write_users

    entries = _read(users_file, must_exist=True)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        raise HeedfulError(f"{users_file}: no user '{name}'")
    if not kept:
        raise HeedfulError(f"{users_file}: '{name}' is the last user; a users file needs at least one")
    write_users(users_file, kept)
    console.print(f"removed '{name}' from {users_file}")
