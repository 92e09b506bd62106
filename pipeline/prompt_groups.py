"""Rows grouped by the prompt they ask, and whole groups set aside: the one way a stage splits
rows without a prompt landing on both sides.

A split measured on one side (held out, validation) must not contain a request the other side
trained on. So its unit is the *prompt*, not the row: rows whose request has the same last user
turn (`pipeline.chat.last_user_text`, the key the reward models split by: a repeated question,
several pairs of one prompt, ClariQ's facets of one `initial_request`) form a group, and a group
lands whole on one side. `split` (train / held out), `validation_split` (fit / validation) and
`c3po_data` (train / eval_prompts) all split this way.

A held-out side is then measured item by item, so an item written twice would weigh double in
every rate: `distinct_items` drops exact repeats (every field equal) from it, keeping the first.

No heavy imports: stage modules import this one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence

#: the row fields holding the user's request, looked for in this order: a prompt row's, a need
#: row's alternative (`feedback.simulator.needs.load_users` reads `request` too), ClariQ's
REQUEST_FIELDS = ("prompt", "request", "initial_request")


def group_key(row: dict, i: int) -> str:
    """The prompt that groups `row` with its copies: its request's last user turn, whitespace
    trimmed; a row without a request field is a group of its own (`i`: its index)."""
    from pipeline.chat import last_user_text

    for field in REQUEST_FIELDS:
        value = row.get(field)
        if value not in (None, "", []):
            return last_user_text(value).strip()
    return f"\0row {i}"  # no request's text starts with NUL


def marked_sides(keys: Sequence[str], sides: Sequence[str | None], place: Sequence[str], where: str = "") -> dict[str, str]:
    """Prompt group -> the side its rows' own split marks (`sides[i]`: 'train', the held-out
    side's name, or None for a row to be drawn), for the groups any row marks. A row pulls its
    copies to its side; copies marked for both sides are a DataError naming the rows (`place[i]`):
    a held-out prompt would be trained on."""
    from pipeline.errors import DataError

    marked: dict[str, dict[str, list[int]]] = {}  # group -> the side its rows name -> those rows
    for i, (key, side) in enumerate(zip(keys, sides)):
        if side:
            marked.setdefault(key, {}).setdefault(side, []).append(i)
    for key, named in marked.items():
        if len(named) > 1:
            (train, ours), (held, theirs) = sorted(named.items(), key=lambda item: item[0] != "train")
            raise DataError(
                f"{where + ': ' if where else ''}rows with the same prompt {key[:80]!r} are marked for both sides: "
                f"{train} at {', '.join(place[i] for i in ours)}; {held.replace('_', ' ')} at "
                f"{', '.join(place[i] for i in theirs)}. A held-out prompt must never be trained on: give its rows one split"
            )
    return {key: next(iter(named)) for key, named in marked.items()}


def pick_groups(
    sizes: Sequence[int], n: int, seed: int | str | random.Random, min_rows: int = 1, keep_one: bool = True
) -> set[int]:
    """Which groups to set aside (indices into `sizes`, each a group's number of rows) so that
    as close to `n` rows as whole groups allow are set aside.

    In an order shuffled by `seed`, each group is taken when it brings the rows set aside closer
    to `n` (with one row per group: the first `n` of that order); then, while fewer than
    `min_rows` are set aside, the smallest groups left (groups too big to bring the count
    closer). With `keep_one` never every group: nothing else is left on the other side.
    `seed` may be a `random.Random` a caller draws several splits from in turn (its state moves
    on by one shuffle of the groups: with one row per group, the shuffle of the rows it had)."""
    order = list(range(len(sizes)))
    (seed if isinstance(seed, random.Random) else random.Random(seed)).shuffle(order)
    picked: set[int] = set()
    rows = 0

    def may_take() -> bool:
        return not keep_one or len(picked) + 1 < len(sizes)

    for k in order:
        if abs(rows + sizes[k] - n) < abs(rows - n) and may_take():
            picked.add(k)
            rows += sizes[k]
    for k in sorted(order, key=lambda k: sizes[k]):
        if rows >= min_rows or not may_take():
            break
        if k not in picked:
            picked.add(k)
            rows += sizes[k]
    return picked


def distinct_items(rows: Iterable[dict], ignore: Iterable[str] = ("split",)) -> tuple[list[dict], int]:
    """(`rows` without exact repeats, how many repeats went): a row whose every field, `ignore`d
    ones aside, equals an earlier row's is dropped; the first of each stays, in order.

    Why: a held-out side (`split`'s held_out, `validation_split`'s validation, `c3po_data`'s
    eval_prompts, evaluate's prompts and needs) is scored item by item, so a copy of an item
    would count twice in its rates. Only *exact* repeats go: rows that share a request but
    differ in anything else (ClariQ's facets of one `initial_request`, another need, id, scope or
    sample of the same prompt) are distinct items. `split` is ignored by default: it says where
    a row goes, not what it is (an `eval` and a `test` copy are one held-out item)."""
    skip = frozenset(ignore)
    seen: set[str] = set()
    kept: list[dict] = []
    repeats = 0
    for row in rows:
        key = json.dumps({k: v for k, v in row.items() if k not in skip}, sort_keys=True, default=repr)
        if key in seen:
            repeats += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept, repeats
