"""recurring_critique: a critique several users gave the deployment -> C3PO's feedback and prompts.

Why a stage: the loop's `c3po from critiques` step must train on a critique the deployment's
users share, not on one user's words. This stage groups the pulled critiques
(feedback/critiques.py `group_critiques` and `ranked`: the functions the loop counts with
before its train phase), ranks the groups at least `min_users` distinct users gave (most users
first) and keeps the one of rank `rank`, then writes what `c3po_data` reads: `feedback` (the
group's own records, ids, users and times kept, each with the representative wording as its
critique and its own wording in provenance.extra, so `c3po_data` sees one feedback and
`heedful trace` names exactly these records) and `prompts` (in scope: the requests those
replies answered; near and out of scope: see `scoped_prompts`). `critique` is a JSON summary:
the wording, the rank, the users count, the source record ids, every wording, the other groups.

Why one stage per rank (the loop plans `rank: 1`, `rank: 2`, ... for the critiques a round
learns) rather than one stage writing every group: C3PO learns one feedback per adapter, so each
critique is its own c3po_data -> c3po chain, and a stage whose `feedback` output is exactly one
group's records keeps the lineage exact (`selects_records`): each adapter names its own
critique's records, the next adapter in the chain adds the next critique's.

With `generator` (an LLM, e.g. an OpenAI-compatible endpoint) near-scope requests are written
by it from the in-scope ones and the feedback (C3PO's own prompt); without one they are the
pulled requests closest to the in-scope ones.
"""

from __future__ import annotations

import json

from pydantic import Field

from feedback.critiques import CritiqueGrouping, critique_rows, group_critiques, ranked, scoped_prompts
from pipeline.llm import LLMSettings
from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig

SERVED = ("reactions", "preferences", "followups")


class RecurringCritiqueConfig(StageConfig):
    min_users: int = Field(default=2, ge=1, description="distinct users who must have given the critique")
    rank: int = Field(default=1, ge=1, description="which recurring critique: 1 the one most users gave, 2 the next, ...")
    grouping: CritiqueGrouping = Field(default_factory=CritiqueGrouping)
    generator: LLMSettings | None = Field(default=None, description="writes near-scope requests (else: nearest pulled ones)")
    near_scope_prompts: int = Field(default=6, ge=1, description="near-scope requests to ask the generator for")


class RecurringCritiqueStage(Stage):
    uses = "recurring_critique"
    summary = "The critique of rank `rank` by distinct users (grouped near-identical wordings) -> feedback + scoped prompts for c3po_data."
    Config = RecurringCritiqueConfig
    #: the `feedback` output is the subset of the input records this stage used (ids kept): the
    #: lineage of what it feeds is those records, not every record it read (pipeline/lineage.py)
    selects_records = True
    inputs = {
        "feedback": Input(("verbal_feedback",), doc="pulled verbal feedback (critiques; clarifications are ignored)"),
        **{
            name: Input((name,), required=False, doc=f"pulled {name}: their requests are out-of-scope prompts") for name in SERVED
        },
    }
    outputs = {
        "feedback": Output("verbal_feedback", doc="the group's records, critique = the representative wording"),
        "prompts": Output("prompts", doc="prompt, scope (in/near/out_of_scope), category"),
        "critique": Output("critique", doc="JSON: feedback, users, records, source_ids, wordings"),
    }
    config: RecurringCritiqueConfig

    def run(self):
        from pipeline.artifacts import atomic_write_json

        cfg = self.config
        ctx = self.ctx
        verbal = load_rows(ctx.input("feedback"), what="verbal feedback")
        groups = group_critiques(critique_rows(verbal), cfg.grouping)
        recurring = ranked(groups, cfg.min_users)
        if len(recurring) < cfg.rank:
            users = [len(g.users) for g in groups]
            raise ValueError(
                f"rank {cfg.rank}: only {len(recurring)} critique(s) recur across {cfg.min_users} distinct users "
                f"(users per critique: {users or 'no critiques'}); the loop skips this step"
            )
        group = recurring[cfg.rank - 1]
        groups = [group, *(g for g in groups if g is not group)]
        ctx.log.info(
            "recurring critique %d (%d users, %d records): %s",
            cfg.rank,
            len(group.users),
            len(group.members),
            group.representative,
        )
        served = [row for name in SERVED if ctx.input(name) for row in load_rows(ctx.input(name), what=f"pulled {name}")]
        served += [row for row in verbal if str(row["id"]) not in set(group.ids)]
        prompts = scoped_prompts(group, served, self.near_scope(group) if cfg.generator else None)
        records = []
        for member in group.members:
            record = dict(member["record"])
            provenance = dict(record["provenance"])
            extra = {**json.loads(provenance.get("extra") or "{}"), "original_critique": member["critique"]}
            records.append({**record, "critique": group.representative, "provenance": {**provenance, "extra": json.dumps(extra)}})
        save_rows(records, ctx.output("feedback"))
        save_rows(prompts, ctx.output("prompts"))
        out = ctx.output("critique")
        out.mkdir(parents=True, exist_ok=True)
        summary = {**group.summary(), "rank": cfg.rank, "other_groups": [g.summary() for g in groups[1:]]}
        atomic_write_json(out / "critique.json", summary)
        scopes = {s: sum(p["scope"] == s for p in prompts) for s in ("in_scope", "near_scope", "out_of_scope")}
        return {"users": len(group.users), "records": len(group.members), "groups": len(groups), **scopes}

    def near_scope(self, group) -> list[str]:
        """Near-scope requests from the generator: related to the critiqued ones, where the feedback must not apply."""
        from feedback.critiques import request_text
        from pipeline.llm import build_client
        from trainers.c3po_data import NEAR_SCOPE_PROMPT, dedupe, parse_list

        cfg = self.config
        assert cfg.generator is not None
        examples = "; ".join(dict.fromkeys(request_text(m["prompt"]) for m in group.members))
        ask = NEAR_SCOPE_PROMPT.format(
            topic=f"requests like these: {examples}",
            category="the same subjects",
            count=cfg.near_scope_prompts,
            feedback=group.representative,
        )
        client = build_client(cfg.generator, self.ctx.model)
        items = dedupe(parse_list(client.complete([[{"role": "user", "content": ask}]], self.ctx.seed)[0]))
        self.ctx.log.info("generator %s wrote %d near-scope requests", client.name, len(items))
        return items[: cfg.near_scope_prompts]
