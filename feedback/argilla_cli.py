"""`heedful argilla ...`: run the local Argilla stack and move feedback in and out of it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="Feedback collection in Argilla: the local stack, users, imports and pulls.", no_args_is_help=True)
console = Console(highlight=False)


@app.command()
def up(port: int | None = typer.Option(None, help="UI/API port on 127.0.0.1 (default 6900 when free)")):
    """Start Redis, osmem and argilla-server on 127.0.0.1 (harmless if already running)."""
    from .argilla_stack import up as stack_up

    info = stack_up(port=port)
    verb = "already running" if info.already_running else f"started in {info.startup_seconds:.1f}s"
    console.print(f"[green]Argilla {verb}[/]: [bold]{info.url}[/]")
    console.print(
        f"log in as [bold]{info.username}[/]; `heedful argilla login` prints the password "
        f"(kept in {info.home / 'credentials.json'}, mode 0600)"
    )
    console.print(f"API key file for the SDK / stages: {info.api_key_file}")


@app.command()
def down(purge: bool = typer.Option(False, help="also delete the database and credentials")):
    """Stop exactly the processes `up` started."""
    from .argilla_stack import down as stack_down

    stopped = stack_down(purge=purge)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status():
    """Is the stack up? Processes, ports, logs."""
    from .argilla_stack import status as stack_status

    st = stack_status()
    if not st.get("url"):
        console.print("not running (`heedful argilla up`)")
        raise typer.Exit(1)
    console.print(
        f"{'[green]running[/]' if st['running'] else '[red]not healthy[/]'}: {st['url']} "
        f"(started {st.get('started')}, start-up {st.get('startup_seconds')}s)"
    )
    for name, proc in st["processes"].items():
        console.print(f"  {name:7s} pid {proc['pid']:<7d} {'alive' if proc['alive'] else 'DEAD'}  log {proc['log']}")
    if not st["running"]:
        raise typer.Exit(1)


@app.command()
def url():
    """Print the UI URL of the local stack."""
    from .argilla_stack import local_url

    found = local_url()
    if not found:
        console.print("not running (`heedful argilla up`)")
        raise typer.Exit(1)
    print(found)


@app.command()
def login(user: str = typer.Option("owner", help="owner or a user made with add-user")):
    """Print the URL, username and password to log in to the local UI (you asked: it is printed)."""
    from .argilla_stack import load_credentials, local_url

    creds = load_credentials()
    entry = creds.get("owner") if user == creds.get("owner", {}).get("username") else creds.get("users", {}).get(user)
    if not entry or "password" not in entry:
        console.print(f"no stored password for '{user}' (users: {', '.join(['owner', *creds.get('users', {})])})")
        raise typer.Exit(1)
    console.print(f"url:      {local_url() or '(stack not running)'}\nusername: {user}\npassword: {entry['password']}")


@app.command("add-user")
def add_user(
    username: str,
    role: str = typer.Option("annotator", help="annotator | admin | owner"),
    workspace: str = typer.Option("heedful", help="workspace the user joins (created if missing)"),
):
    """Create a user (password generated; stored 0600 for the local stack, printed once otherwise)."""
    from .argilla_client import api, connect
    from .argilla_stack import local_url, remember_users
    from .argilla_sync import ensure_user

    client = connect()
    user_id, password = ensure_user(client, username, workspace, role)
    key = api(client, "GET", f"/api/v1/users/{user_id}", f"read user {username}").get("api_key")
    if password is None:
        console.print(f"user {username} exists; it is a member of {workspace}")
        return
    remember_users(client.api_url, {username: password}, {username: key} if key else None)
    if (local_url() or "").rstrip("/") == client.api_url.rstrip("/"):
        console.print(f"created {role} {username} in {workspace}; `heedful argilla login --user {username}` shows the password")
    else:
        console.print(f"created {role} {username} in {workspace}; password (shown once): {password}")


@app.command("import-qa")
def import_qa(
    path: Path = typer.Argument(..., help="FineGrainedRLHF qa-feedback json (e.g. ../shared/data/qa_feedback/feedback_400.json)"),
    dataset: str = typer.Option("qa-feedback", help="dataset name prefix: NAME-spans and NAME-preferences"),
    workspace: str = typer.Option("heedful"),
    limit: int | None = typer.Option(None, help="first N questions only"),
):
    """Import human fine-grained feedback and preferences as submitted responses."""
    from pipeline.records import load_rows

    from .argilla_client import ArgillaConnection, connect
    from .argilla_items import to_items
    from .argilla_stack import remember_users
    from .argilla_sync import push_items
    from .argilla_templates import TemplateKind, TemplateOptions

    rows = load_rows(path, what="qa-feedback")[:limit]
    client = connect(ArgillaConnection(workspace=workspace))
    imports: tuple[tuple[TemplateKind, str], ...] = (("fine_grained", "spans"), ("preference", "preferences"))
    for kind, suffix in imports:
        items = to_items(rows, kind, "qa_feedback", {}, where=str(path))
        res = push_items(client, f"{dataset}-{suffix}", workspace, TemplateOptions(kind=kind), items)
        remember_users(client.api_url, res.new_users)
        console.print(
            f"{workspace}/{dataset}-{suffix}: {res.created} created, {res.updated} updated "
            f"({res.records_per_s:.0f} records/s) {res.url}"
        )


@app.command()
def pull(
    dataset: str,
    out: Path = typer.Option(..., "--out", help=".jsonl file for the normalized records"),
    workspace: str = typer.Option("heedful"),
    drafts: bool = typer.Option(False, help="include draft responses"),
):
    """Pull every submitted response of a dataset into a JSONL file (no cursor: all of them)."""
    from pipeline.records import write_jsonl
    from pipeline.schema import records_to_rows

    from .argilla_client import ArgillaConnection, connect
    from .argilla_sync import pull as do_pull

    client = connect(ArgillaConnection(workspace=workspace))
    res = do_pull(client, dataset, workspace, ["submitted", "draft"] if drafts else ["submitted"])
    write_jsonl(records_to_rows(res.records), out)
    console.print(
        f"{len(res.records)} {res.kind} records from {len(res.annotators)} annotator(s) -> {out}"
        + (f"; {res.ties} tie(s) not written" if res.ties else "")
    )
