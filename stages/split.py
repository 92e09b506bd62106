"""split: rows (prompts, information needs) into a training part and a held-out part.

Held-out rows never train: the evaluate stage measures on them what the training did for
requests it has not seen. Rows with a `split` column (train / eval / held_out) keep it; the
others are split at random, seeded, `held_out_fraction` of them held out.
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
    summary = "Rows into train and held-out parts (seeded, or by their `split` column)."
    Config = SplitConfig
    inputs = {"rows": Input(("prompts", "needs"), doc="any rows: prompts or information needs")}
    outputs = {
        "train": Output("prompts", doc="rows for training"),
        "held_out": Output("prompts", doc="rows for evaluation only"),
    }

    def run(self):
        from pipeline.records import load_rows, save_rows

        path = self.ctx.input("rows")
        rows = load_rows(path, what="rows to split")
        train, held_out = split_rows(rows, self.config, self.ctx.seed, str(path))
        save_rows(train, self.ctx.output("train"))
        save_rows(held_out, self.ctx.output("held_out"))
        self.ctx.log.info("%d rows: %d train, %d held out", len(rows), len(train), len(held_out))
        return {"train": len(train), "held_out": len(held_out)}


def split_rows(rows: list[dict], cfg: SplitConfig, seed: int, where: str = "rows") -> tuple[list[dict], list[dict]]:
    import random

    train, held_out, free = [], [], []
    for i, row in enumerate(rows):
        split = row.get("split")
        if split in (None, ""):
            free.append(row)
        elif split == "train":
            train.append(row)
        elif split in HELD_OUT_NAMES:
            held_out.append(row)
        else:
            raise ValueError(f"{where} row {i}: field 'split': {split!r} is not train or one of {', '.join(HELD_OUT_NAMES)}")
    order = list(range(len(free)))
    random.Random(seed).shuffle(order)
    n = max(cfg.min_held_out, round(len(free) * cfg.held_out_fraction)) if free else 0
    if free and n >= len(free) and not train:
        raise ValueError(f"{where}: {len(free)} rows cannot be split with {n} held out and some left to train on")
    picked = set(order[:n])
    held_out += [row for k, row in enumerate(free) if k in picked]
    train += [row for k, row in enumerate(free) if k not in picked]
    if not train or not held_out:
        raise ValueError(f"{where}: the split leaves {len(train)} rows to train and {len(held_out)} held out; both need rows")
    return train, held_out
