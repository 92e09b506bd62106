"""split: rows (prompts, information needs) into a training part and a held-out part.

Held-out rows never train: the evaluate stage measures on them what the training did for
requests it has not seen. So the unit of the split is the *prompt*, not the row: rows whose
request has the same last user turn (`pipeline.prompt_groups.group_key`, the key the reward
models split by: a repeated question, ClariQ's facets of one `initial_request`) form a group,
and a group lands whole on one side -- else one copy would be trained on and the other measured
as unseen. Rows with a `split` column (train / eval / held_out / test) keep it and pull the rest
of their group to their side (a group marked for both sides is an error naming its rows); the
other groups are split at random, seeded, holding out as close to `held_out_fraction` of their
rows as whole groups allow (`pipeline.prompt_groups.pick_groups`). Exact repeats of a held-out
row (every field but `split` equal) are then dropped, the first kept, so no item is scored twice
(`pipeline.prompt_groups.distinct_items`; the count is the `held_out_duplicates_dropped` metric).
"""

from __future__ import annotations

from pydantic import Field

from pipeline.stage import Input, Output, Stage, StageConfig

HELD_OUT_NAMES = ("eval", "held_out", "test")


class SplitConfig(StageConfig):
    held_out_fraction: float = Field(default=0.25, gt=0, lt=1, description="share held out of rows without a `split` column")
    min_held_out: int = Field(default=1, ge=1)


class SplitStage(Stage):
    uses = "split"
    # 2: rows with the same prompt stay on one side (no held-out leak); explicit splits pull their group;
    # 3: exact repeats of a held-out row are dropped (an item is scored once)
    version = "3"
    summary = "Rows into train and held-out parts (seeded, or by their `split` column); one prompt's rows stay together."
    Config = SplitConfig
    inputs = {"rows": Input(("prompts", "needs"), doc="any rows: prompts or information needs")}
    outputs = {
        "train": Output("prompts", doc="rows for training"),
        "held_out": Output("prompts", doc="rows for evaluation only"),
    }

    def run(self):
        from pipeline.prompt_groups import distinct_items
        from pipeline.records import load_located_rows, save_rows

        path = self.ctx.input("rows")
        located = load_located_rows(path, what="rows to split")
        rows = [row for _, row in located]
        train, held_out = split_rows(rows, self.config, self.ctx.seed, str(path), [where for where, _ in located])
        held_out, repeats = distinct_items(held_out)
        save_rows(train, self.ctx.output("train"))
        save_rows(held_out, self.ctx.output("held_out"))
        self.ctx.log.info(
            "%d rows: %d train, %d held out (%d exact repeats of a held-out row dropped)",
            len(rows),
            len(train),
            len(held_out),
            repeats,
        )
        return {"train": len(train), "held_out": len(held_out), "held_out_duplicates_dropped": repeats}


def split_rows(
    rows: list[dict], cfg: SplitConfig, seed: int, where: str = "rows", places: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """(train, held_out), each in input order, every group of rows with the same prompt
    (`group_key`) on one side. `places` names each row in messages (`file:line` as
    `load_located_rows` gives it); without it a row is `<where> row <n>`, counted from 1."""
    from pipeline.errors import DataError
    from pipeline.prompt_groups import group_key, marked_sides, pick_groups

    place = places or [f"{where} row {i + 1}" for i in range(len(rows))]
    keys = [group_key(row, i) for i, row in enumerate(rows)]
    groups: dict[str, list[int]] = {}
    sides: list[str | None] = []  # the side each row's `split` column names
    for i, (key, row) in enumerate(zip(keys, rows)):
        groups.setdefault(key, []).append(i)
        split = row.get("split")
        if split not in (None, "", "train") and split not in HELD_OUT_NAMES:
            raise DataError(f"{place[i]}: field 'split': {split!r} is not train or one of {', '.join(HELD_OUT_NAMES)}")
        sides.append(None if split in (None, "") else "train" if split == "train" else "held_out")
    marked = marked_sides(keys, sides, place, where)
    held_keys = {key for key, side in marked.items() if side == "held_out"}
    has_train = "train" in marked.values()
    free = [key for key in groups if key not in marked]
    free_rows = sum(len(groups[key]) for key in free)
    n = max(cfg.min_held_out, round(free_rows * cfg.held_out_fraction)) if free else 0
    if free and n >= free_rows and not has_train:
        raise DataError(f"{where}: {free_rows} rows cannot be split with {n} held out and some left to train on")
    # whole groups, as close to n rows as they allow; never the last one when nothing else is left to train on
    picked = pick_groups([len(groups[key]) for key in free], n, seed, cfg.min_held_out, keep_one=not has_train)
    held_keys.update(free[k] for k in picked)
    train = [row for key, row in zip(keys, rows) if key not in held_keys]
    held_out = [row for key, row in zip(keys, rows) if key in held_keys]
    if not train or not held_out:
        raise DataError(
            f"{where}: the split leaves {len(train)} rows to train and {len(held_out)} held out; both need rows "
            f"(rows with the same prompt stay on one side: {len(groups)} different prompts)"
        )
    return train, held_out
