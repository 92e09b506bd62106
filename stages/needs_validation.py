"""needs_validation: simulated users' feedback into a part to train on and validation needs.

The arena tunes a small grid per method on a validation split (docs/arena.md, "Tuning grid").
For simulated users the unit is the information need: a grid point trains on the feedback of
some needs and is scored by simulated users on others that no method trains on. This stage
reads the needs the `simulate` stage talked about (its `conversations` input: the training
needs, never the held-out ones) and that stage's records, keeps a seeded share of the needs for
validation, and passes on only the records of the rest.

    preferences, verbal_feedback, reactions   the simulate stage's records of the fit needs
    validation                                the validation needs' rows, as evaluate's `needs`
                                              (one row per need, without generate's fields)

A need's samples (generate's `sample_index`) stay together. Records find their need through
their provenance (`dataset`: the simulated user's id, as `feedback.simulator.needs.load_users`
makes it), else through their id (`<user id>:t<k>`, `<user id>:pair<a>-<b>`); a record of no
listed need is an error naming it, so feedback never leaks into validation unnoticed.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from pipeline.errors import DataError
from pipeline.stage import Input, Output, Stage, StageConfig

#: the simulate stage's record outputs this stage filters (and passes on under the same names)
RECORDS = ("preferences", "verbal_feedback", "reactions")
#: fields the generate stage adds to a need's row (a validation need is the need, not a sample of it)
GENERATED = ("prompt_id", "system_prompt", "sample_index", "response", "num_tokens", "finished", "model", "adapter", "seed")


class NeedsValidationConfig(StageConfig):
    fraction: float = Field(default=0.25, gt=0, lt=1, description="share of the needs kept for validation")
    need_field: str = Field(default="need", description="row field holding the information need (as the simulate stage's)")


class NeedsValidationStage(Stage):
    uses = "needs_validation"
    summary = "Simulated users' records into fit needs' records + validation needs (seeded): tuning never sees held-out needs."
    Config = NeedsValidationConfig
    inputs = {
        "conversations": Input(("responses", "prompts", "needs"), doc="the needs the simulate stage read (its conversations)"),
        **{name: Input((name,), doc=f"the simulate stage's {name}") for name in RECORDS},
    }
    outputs = {
        **{name: Output(name, doc=f"{name} of the fit needs only") for name in RECORDS},
        "validation": Output("prompts", doc="validation needs (need + prompt rows) for evaluate's `needs`"),
    }
    config: NeedsValidationConfig

    def run(self):
        from feedback.simulator.needs import is_clariq
        from feedback.simulator.records import save_dataset
        from pipeline.records import load_rows, save_rows
        from pipeline.schema import KINDS

        ctx = self.ctx
        path = ctx.input("conversations")
        rows = load_rows(path, required=[self.config.need_field], what="information needs")
        if is_clariq(rows):
            raise DataError(f"{path}: ClariQ rows; a validation split of needs reads need + prompt rows (not yet ClariQ's)")
        need_of = {user_id(row, i): need_key(row, i) for i, row in enumerate(rows)}
        validation_needs = pick_validation(sorted(set(need_of.values())), self.config.fraction, ctx.seed, str(path))
        counts: dict[str, int] = {}
        for name in RECORDS:
            records = load_rows(ctx.input(name), what=name)
            fit = [
                r
                for k, r in enumerate(records)
                if need_of_record(r, need_of, f"{ctx.input(name)} row {k + 1}") not in validation_needs
            ]
            save_dataset(fit, list(KINDS[name].model_fields), ctx.output(name))
            counts[f"fit_{name}"] = len(fit)
            counts[f"validation_{name}_left_out"] = len(records) - len(fit)
        save_rows(validation_rows(rows, validation_needs), ctx.output("validation"))
        counts.update(fit_needs=len(set(need_of.values())) - len(validation_needs), validation_needs=len(validation_needs))
        ctx.log.info("%s", ", ".join(f"{k}={v}" for k, v in counts.items()))
        return counts


def need_key(row: dict[str, Any], index: int) -> str:
    """The need a row belongs to: its id (generate's prompt_id first), as load_users names users."""
    return str(row.get("prompt_id") or row.get("id") or f"row{index}")


def user_id(row: dict[str, Any], index: int) -> str:
    """The simulated user's id for a row (a need's sample gets its own user)."""
    base = need_key(row, index)
    return f"{base}:{row['sample_index']}" if "sample_index" in row else base


def need_of_record(record: dict[str, Any], need_of: dict[str, str], where: str) -> str:
    """The need behind one simulate record: provenance's user id, else its id's prefix."""
    provenance = record.get("provenance") or {}
    candidates = [provenance.get("dataset") if isinstance(provenance, dict) else None]
    record_id = str(record.get("id") or "")
    for marker in (":pair", ":t"):
        if marker in record_id:
            candidates.append(record_id.rsplit(marker, 1)[0])
    for candidate in candidates:
        if candidate in need_of:
            return need_of[candidate]
    raise DataError(
        f"{where}: field 'id' {record_id!r} names no need of the conversations input (its provenance "
        f"dataset: {candidates[0]!r}); give needs_validation the simulate stage's own conversations"
    )


def validation_rows(rows: list[dict[str, Any]], needs: set[str]) -> list[dict[str, Any]]:
    """One row per validation need (its first sample's), without what generate added, named by the need."""
    chosen: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        key = need_key(row, i)
        if key in needs and key not in chosen:
            chosen[key] = {"id": key, **{k: v for k, v in row.items() if k not in GENERATED and k != "id"}}
    return list(chosen.values())


def pick_validation(needs: list[str], fraction: float, seed: int, where: str) -> set[str]:
    """A seeded `fraction` of the needs (at least one, never all)."""
    if len(needs) < 2:
        raise DataError(f"{where}: {len(needs)} information needs; a validation split needs at least 2: give more needs")
    order = list(needs)
    random.Random(f"{seed}:needs").shuffle(order)
    n = min(len(needs) - 1, max(1, round(len(needs) * fraction)))
    return set(order[:n])
