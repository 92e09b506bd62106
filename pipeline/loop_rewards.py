"""Reward models refreshed by the closed loop: the `rewards:` entries of a loop file.

    loop:
      rewards:
        - {kind: plove, from: reactions, min_records: 20, with: {max_steps: 40}}

In every round in which at least `min_records` new records of the entry's signal arrived, a
`reward_<i>_<kind>` stage (train_reward) trains the reward model on ALL records of that signal
the loop has pulled so far, this round's and every earlier round's, each record once (minus
those whose answers people withdrew in Argilla since: `pooled_rows`), and
continues the previous round's model (train_reward's `init`): a refresh on everything users
said, not a model of one round's sliver, and not a restart. A round with fewer new records
keeps the previous model. The model in use scores `eval_current` and `eval_candidate`
(`reward/<kind>` in their summaries), so a gate rule can read it.

Why the loop writes the pooled records itself (`round-NNN/reward_data/<signal>.jsonl`) instead
of a stage reading them: the earlier pulls belong to other round runs, which a round's pipeline
cannot name as stage outputs; as a file input the pool is content-hashed into the stage's
fingerprint, so a resumed round skips the finished stage and a changed pool reruns it.

What a round decided (trained or kept, from which records, which init) is saved in `loop.json`
once, after the pull (`plan`), so a resumed round runs the same stages; after training the
model's held-out metrics are added (`record_metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from .errors import HeedfulError

#: the pulled signals each trainable kind learns from (fine_grained needs span annotations,
#: which `heedful serve` does not collect); human_<kind>: what annotators said in Argilla (`loop.argilla:`)
REWARD_SIGNALS: dict[str, tuple[str, ...]] = {
    "plove": ("reactions", "human_reactions"),
    "followup": ("preferences", "followups", "verbal_feedback", "human_preferences"),
}
DATA_FOLDER = "reward_data"


class RewardStep(BaseModel):
    """Refresh a `kind` reward model on all `signal` records so far, when `min_records` new ones arrived."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    kind: str = Field(
        description="a train_reward kind: plove (reactions, human_reactions) or followup (preferences, followups, "
        "verbal_feedback, human_preferences)"
    )
    signal: str = Field(alias="from", description="the pulled signal it learns from")
    min_records: int = Field(default=1, ge=1, description="new records of the signal in this round (after quarantine)")
    settings: dict[str, Any] = Field(default_factory=dict, alias="with", description="train_reward settings (kind is set)")
    score: bool = Field(default=True, description="score eval_current and eval_candidate with it (metric reward/<kind>)")


def check_rewards(path: Path, steps: list[RewardStep], evaluate_inputs: dict[str, Any]) -> None:
    """Errors a loop file's `rewards:` can have, before any round runs."""
    if not steps:
        return
    from stages.evaluate import RM_INPUTS

    where = f"{path}: loop.rewards"
    for i, step in enumerate(steps):
        if step.kind not in REWARD_SIGNALS:
            known = ", ".join(f"{k} from {'/'.join(s)}" for k, s in REWARD_SIGNALS.items())
            why = " (it needs span annotations, which heedful serve does not collect)" if step.kind == "fine_grained" else ""
            raise HeedfulError(f"{where}.{i}: kind '{step.kind}' cannot be refreshed from served feedback{why} (known: {known})")
        if step.signal not in REWARD_SIGNALS[step.kind]:
            raise HeedfulError(
                f"{where}.{i}: {step.kind} cannot train from {step.signal} (from: {'/'.join(REWARD_SIGNALS[step.kind])})"
            )
        if "kind" in step.settings:
            raise HeedfulError(f"{where}.{i}: set the kind as `kind:`, not inside `with:`")
        if step.kind == "followup" and not (step.settings.get("followup") or {}).get("finetune"):
            raise HeedfulError(
                f"{where}.{i}: a followup reward model learns only when fine-tuned: with: {{followup: {{finetune: true}}}}"
            )
    scoring = [s.kind for s in steps if s.score]
    if len(set(scoring)) < len(scoring):
        raise HeedfulError(f"{where}: two scoring models of one kind would both report reward/<kind>; set score: false on one")
    free = [name for name in RM_INPUTS if name not in evaluate_inputs]
    if len(scoring) > len(free):
        raise HeedfulError(
            f"{where}: {len(scoring)} scoring reward models, but evaluate has {len(free)} free reward_model input(s)"
        )


# ----------------------------------------------------------------------------- a round's plan


def plan(steps: list[RewardStep], root: Path, rounds: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """What each `rewards:` entry does in the round `entry` (after its pull): trained on the
    pooled records (written now) from the previous model, or the previous model kept.

    One dict per entry: step, kind, signal, stage, new (this round's records), trained, init
    (the model continued, or None), path (the model in use after the round, or None), and for
    a trained one `data` (the pooled file), `records` (its rows) and `withdrawn` (rows pulled so
    far whose answers were withdrawn in Argilla since, left out: `pooled_rows`); for a kept one `why`.
    """
    earlier = [e for e in rounds if e["round"] < entry["round"]]
    out = []
    for number, step in enumerate(steps, 1):
        stage = f"reward_{number}_{step.kind}"
        previous = previous_model(earlier, stage)
        new = int((entry.get("counts") or {}).get(step.signal, 0))
        item: dict[str, Any] = {
            "step": number,
            "kind": step.kind,
            "signal": step.signal,
            "stage": stage,
            "new": new,
            "score": step.score,
            "init": previous,
        }
        why = f"{new} new {step.signal} record(s) < min_records {step.min_records}" if new < step.min_records else None
        rows: list[dict[str, Any]] = []
        if why is None:
            from .loop import signal_output

            pool = pooled_rows([root.joinpath(e["run"], *signal_output(step.signal)) for e in [*earlier, entry]])
            rows, item["withdrawn"] = pool.rows, pool.left_out
            why = untrainable(step, rows)
        if why is not None:
            out.append({**item, "init": None, "trained": False, "path": previous, "why": why})
            continue
        from .records import write_jsonl

        data = root / entry["run"] / DATA_FOLDER / f"{step.signal}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(rows, data)
        path = str(root / entry["run"] / stage / "reward_model")
        out.append({**item, "trained": True, "path": path, "data": str(data), "records": len(rows)})
    return out


def validation_plan(steps: list[RewardStep]) -> list[dict[str, Any]]:
    """Every entry trained from this round's pull, no init: what `heedful validate` checks."""
    from .loop import signal_output

    return [
        {"step": n, "kind": s.kind, "stage": f"reward_{n}_{s.kind}", "trained": True, "score": s.score, "init": None}
        | {"data": ".".join(signal_output(s.signal)), "path": None}
        for n, s in enumerate(steps, 1)
    ]


def previous_model(earlier: list[dict[str, Any]], stage: str) -> str | None:
    """The newest model of this entry (same stage name: same position and kind) an earlier round left."""
    for entry in reversed(earlier):
        for item in entry.get("rewards") or []:
            if item.get("stage") == stage and item.get("path") and Path(item["path"], "reward_model.json").is_file():
                return str(item["path"])
    return None


class Pool(NamedTuple):
    """What `pooled_rows` pooled: the rows, per folder how many earlier rows its pull withdrew,
    and how many rows pulled so far are left out as withdrawn (answered again: back in)."""

    rows: list[dict[str, Any]]
    withdrawn: list[int]
    left_out: int


def pooled_rows(folders: list[Path]) -> Pool:
    """The records of these pulls (one folder per round, oldest first) that still stand, each id
    once (a round that trained nothing did not advance the cursor, so the next round pulled its
    records again); a record pulled again with other content (an annotator who changed an answer
    in Argilla) counts in its newest version.

    Withdrawn: a `human` (argilla_pull) folder comes with what its pull saw standing
    (`cursor/answers.json` beside it): an earlier round's row whose answer was since changed to a
    tie (or emptied), discarded, sent back to draft, or whose response, record or dataset was
    deleted leaves the pool from that round on, by argilla_pull's own rule (`standing`); answered
    again later, it comes back as that round's record. Served records are never withdrawn. Each
    round's folder and answers are committed stage outputs, so a resumed round pools the same."""
    from feedback.argilla_sync import standing
    from stages.argilla_pull import read_answers

    from .records import load_rows

    rows: dict[str, dict[str, Any]] = {}
    withdrawn: list[int] = []
    seen: set[str] = set()
    for folder in folders:
        new = load_rows(folder) if folder.exists() else []
        answers = read_answers(folder.parent / "cursor")
        dropped = 0
        if answers is not None and rows:
            new_ids = {str(row.get("id")) for row in new}
            kept, _ = standing(list(rows.values()), answers["dataset"], answers["live"], answers["reread"], new_ids)
            gone = set(rows) - {str(row.get("id")) for row in kept} - new_ids
            for rid in gone:
                del rows[rid]
            dropped = len(gone)
        for row in new:
            rows[str(row.get("id"))] = row  # a dict keeps the first insertion's place
        seen |= set(rows)
        withdrawn.append(dropped)
    return Pool(list(rows.values()), withdrawn, len(seen) - len(rows))


def withdrawn_counts(root: Path, runs: list[str]) -> dict[str, int]:
    """`{"human_<kind>": n}`: the rows of earlier rounds (`runs`, oldest first, this round last)
    that this round's `human` pull withdrew (none: {})."""
    from .loop import HUMAN_SIGNALS, signal_output

    out = {}
    for signal in HUMAN_SIGNALS:
        folders = [root.joinpath(run, *signal_output(signal)) for run in runs]
        if any(folder.exists() for folder in folders[:-1]):
            n = pooled_rows(folders).withdrawn[-1]
            if n:
                out[signal] = n
    return out


def untrainable(step: RewardStep, rows: list[dict[str, Any]]) -> str | None:
    """Why the pooled records cannot train the kind (the entry is then kept, not failed), or None."""
    if not rows:
        return "no records"
    if step.kind == "plove":
        positive = set((step.settings.get("plove") or {}).get("positive") or ["love"]) | {"love"}
        labels = {row.get("reaction") in positive for row in rows}
        if len(labels) < 2:
            return f"all {len(rows)} pooled reactions are {'positive' if True in labels else 'not positive'}"
    return None


# ----------------------------------------------------------------------------- stages and results


def reward_stages(steps: list[RewardStep], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The round's train_reward stages: one per trained entry."""
    out = []
    for item in items:
        if not item["trained"]:
            continue
        inputs = {"feedback": item["data"], **({"init": item["init"]} if item.get("init") else {})}
        settings = dict(steps[item["step"] - 1].settings)
        out.append({"name": item["stage"], "uses": "train_reward", "inputs": inputs, "with": {"kind": item["kind"], **settings}})
    return out


def scoring_inputs(items: list[dict[str, Any]], taken: dict[str, Any]) -> dict[str, str]:
    """evaluate's reward_model inputs for the models in use: this round's stage output, or the
    earlier model kept (a folder), in the reward_model slots `taken` (the evaluate block's) leaves."""
    from stages.evaluate import RM_INPUTS

    free = [name for name in RM_INPUTS if name not in taken]
    used = [i for i in items if i.get("score") and (i["trained"] or i.get("path"))]
    return {slot: f"{i['stage']}.reward_model" if i["trained"] else str(i["path"]) for slot, i in zip(free, used)}


def scoring_models(items: list[dict[str, Any]] | None) -> list[str]:
    """The folders of the models that score this round's evaluations (for the evaluation key)."""
    return sorted(str(i["path"]) for i in items or [] if i.get("score") and i.get("path"))


def record_metrics(items: list[dict[str, Any]]) -> None:
    """Add each trained model's held-out metrics (what its kind reports in reward_model.json)."""
    from reward_models.base import read_descriptor

    from .stats import clean

    for item in items:
        if item["trained"] and item.get("path") and Path(item["path"], "reward_model.json").is_file():
            item["metrics"] = clean(read_descriptor(item["path"]).get("metrics") or {})  # NaN (one class held out): null


def headline(metrics: dict[str, Any] | None) -> str:
    """The one held-out number a status line shows: AUROC (plove), pairwise accuracy (followup)."""
    metrics = metrics or {}
    keys = ["auroc", "pairwise_accuracy"] + [k for k in metrics if k.endswith("accuracy") and "baseline" not in k]
    for key in keys:
        if isinstance(metrics.get(key), (int, float)):
            return f"{key} {metrics[key]:.3g}"
    return ""


def summary(items: list[dict[str, Any]] | None) -> str | None:
    """Per entry: `plove: trained on 6 (auroc 0.7)` (from scratch), `plove: refreshed on 12 from
    round-001 (auroc 0.81)`, `plove: kept round-002 (2 new reactions record(s) < min_records 4)`."""
    parts = []
    for item in items or []:
        if item["trained"]:
            score = headline(item.get("metrics"))
            how = f"refreshed on {item.get('records')} from {Path(item['init']).parts[-3]}" if item.get("init") else ""
            how = how or f"trained on {item.get('records')}"
            how += f", {item['withdrawn']} withdrawn left out" if item.get("withdrawn") else ""
            parts.append(f"{item['kind']}: {how}" + (f" ({score})" if score else ""))
        else:
            kept = f"kept {Path(item['path']).parts[-3]}" if item.get("path") else "none yet"
            parts.append(f"{item['kind']}: {kept} ({item.get('why')})")
    return "; ".join(parts) or None
