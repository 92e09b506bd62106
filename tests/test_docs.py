"""The README is a front door (issue 12): small, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), re.M)}
            if anchor not in headings:
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    return broken


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 15_000, f"README.md is {len(readme):,} bytes: move long sections to docs/<topic>.md"
    text = readme.decode()
    for must in ("make demo", "make test", "## The quickstart", "## The CLI", "## Layout", "docs/README.md"):
        assert must in text, must


def test_every_cli_command_is_in_the_readme():
    from pipeline import cli

    cli._register_subcommands()
    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    names |= {g.name for g in cli.app.registered_groups}
    table = (ROOT / "README.md").read_text(encoding="utf-8").split("## The CLI", 1)[1].split("\n## ", 1)[0]
    missing = sorted(n for n in names if f"`heedful {n}" not in table)
    assert not missing, f"commands without a row in the README's CLI table: {missing}"


def test_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [b for page in pages for b in _broken_links(page)]
    assert not broken, "\n".join(broken)


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    unlisted = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and f"]({p.name})" not in index)
    assert not unlisted, f"pages missing from docs/README.md: {unlisted}"
