"""c3po_data: from one verbal feedback to C3PO's training data (Stephan et al., 2024).

1. A generator LLM (local or OpenAI-compatible) proposes categories of situations around the
   feedback's topic, then per category *in-scope* prompts (the feedback applies) and
   *near-scope* prompts (related, it must not apply), plus *out-of-scope* general prompts.
   Prompts can also come ready-made from the `prompts` input (columns prompt, scope[, split]).
2. The current model (the pipeline's model, plus `adapter` if given) answers every prompt:
   the baseline replies, written by the generation engine (`engine: auto`: CTranslate2 with the
   adapter merged on a CPU where it is faster, else HF generate; `engine: hf` insists on HF).
   A local generator (`generator.kind: hf`, no other model or adapter named) is that same
   current model by default: with `generator_adapter: false` it is the base model instead,
   so the adapter being trained further does not write its own prompts and revisions. It writes
   on the engine `generator.engine` picks (CTranslate2 where faster, as the baselines).
3. In-scope baselines are revised to apply the feedback, by the generator LLM or, for a
   feedback whose application is mechanical, by `revision_template` (e.g. "Chef's tip: {response}"),
   or for a length feedback (`metric: max_words`) by `reviser: shorten`: the baseline's leading whole
   sentences within the limit (offline; a generator LLM writes better short answers).
   With a programmatic metric, revisions that still fail it are dropped. With `trim_cut_off`,
   a baseline cut off at the sampling limit is cut back to its last whole sentence before the
   template applies, so the revision is a reply that ends (what a suffix feedback needs).
A share of each scope is held out (`eval_prompts`) for `evaluate_feedback`, by prompt as the
`split` stage splits (`pipeline.prompt_groups`): rows with the same last user turn (a repeated
prompt) are held out together or not at all, and a row's `split` column pulls its copies to its
side, so no held-out prompt is also trained on (`assign_splits`). Exact repeats among the held-out
prompts (the same id, prompt, scope and category) are dropped, the first kept, so no prompt is
scored twice (`pipeline.prompt_groups.distinct_items`; the count is the `eval_duplicates_dropped`
metric). The prompt templates and list parsing are C3PO's data library, trainers/c3po_data.py.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field

from pipeline.chat import as_messages
from pipeline.generation import ENGINE_BATCH, EngineSetting, SamplingSettings, pick_engine
from pipeline.llm import LLMSettings
from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig
from trainers.c3po_data import (
    CATEGORIES_PROMPT,
    GENERAL_CATEGORIES,
    IN_SCOPE_PROMPT,
    NEAR_SCOPE_PROMPT,
    OUT_OF_SCOPE_PROMPT,
    REVISE_PROMPT,
    TOPIC_PROMPT,
    dedupe,
    leading_sentences,
    parse_list,
    row_id,
    template_revision,
)
from trainers.feedback_eval import SCOPES, MetricSpec


class C3poDataConfig(StageConfig):
    feedback: str | None = Field(default=None, description="the verbal feedback; else from the `feedback` input")
    feedback_id: str | None = Field(default=None, description="which record of the `feedback` input (default: the only one)")
    topic: str | None = Field(default=None, description="where the feedback applies; else the record's scope, else asked")
    metric: MetricSpec | None = Field(
        default=None, description="programmatic check or judge; filters revisions, used by evaluation"
    )
    generator: LLMSettings = Field(default_factory=LLMSettings)
    generator_adapter: bool = Field(
        default=True,
        description=(
            "a local generator that is the pipeline's model runs with the `adapter` input (true: the current policy "
            "writes prompts and revisions) or without it (false: the base model does)"
        ),
    )
    num_categories: int = Field(default=4, ge=1)
    prompts_per_category: int = Field(default=5, ge=1)
    out_of_scope_categories: list[str] = Field(default_factory=lambda: list(GENERAL_CATEGORIES[:4]))
    eval_fraction: float = Field(default=0.3, ge=0, lt=1, description="held out per scope when prompts have no split")
    baseline_sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(max_new_tokens=128, temperature=0.7))
    reviser: Literal["generator", "template", "shorten"] = Field(
        default="generator",
        description=(
            "generator: an LLM rewrites the reply; template: `revision_template` around it; shorten (a max_words "
            "metric): the reply's leading whole sentences within the limit"
        ),
    )
    revision_template: str | None = Field(default=None, description='reviser template: e.g. "Chef\'s tip: {response}"')
    trim_cut_off: bool = Field(
        default=False,
        description=(
            "template reviser: a baseline cut off at the sampling limit is cut back to its last complete sentence "
            "before the template applies, so the revision is a reply that ends (a suffix then closes it); a "
            "baseline with no complete sentence stays cut off"
        ),
    )
    filter_revisions: bool = Field(default=True, description="drop revisions that fail a programmatic metric")
    batch_size: int = Field(
        default=8,
        ge=1,
        description=f"HF generate: baselines at a time (the engine takes {ENGINE_BATCH} per call); each batch is "
        "seeded, so sampled baselines depend on it (part of the fingerprint)",
    )
    engine: EngineSetting = "auto"
    device: str | None = None


def pick_feedback(cfg: C3poDataConfig, path) -> tuple[str, str | None]:
    """(feedback, topic) from the config or a VerbalFeedback / JSONL input."""
    if cfg.feedback:
        return cfg.feedback, cfg.topic
    if path is None:
        raise ValueError("c3po_data needs a feedback: set `feedback:` or give a `feedback` input")
    rows = load_rows(path, what="verbal feedback")
    if cfg.feedback_id is not None:
        rows = [r for r in rows if str(r.get("id")) == cfg.feedback_id]
        if not rows:
            raise ValueError(f"{path}: no record with id '{cfg.feedback_id}'")
    texts = {str(r.get("critique") or r.get("feedback") or "") for r in rows} - {""}
    if not texts:
        raise ValueError(f"{path}: no record has a 'critique' (or 'feedback') field")
    if len(texts) > 1:
        raise ValueError(f"{path}: {len(texts)} different feedbacks; C3PO learns one at a time: set feedback_id")
    return texts.pop(), cfg.topic or next((r.get("scope") for r in rows if r.get("scope")), None)


def local_generator_model(cfg: C3poDataConfig, adapter, policy_model):
    """The loaded policy model a local generator may reuse, or None (it loads its own model:
    the base when `generator_adapter` is false and an adapter is wired)."""
    return policy_model if adapter is None or cfg.generator_adapter else None


def own_generator_engine(cfg: C3poDataConfig, model_name: str, device: str | None, baselines_engine: str) -> str | None:
    """'ct2' or 'hf' when the generator is the pipeline's own model run locally (the default), else
    None (an endpoint, or another local model or adapter: `build_client` as configured). On 'ct2' the
    generator writes from the same files (the base, plus the adapter merged unless
    `generator_adapter` is false) on CTranslate2, where the host measured it faster than HF generate:
    the language-feedback e2e test's data stage (SmolLM2, 1 thread) took 47 s reusing the loaded HF
    model, 35 s on CTranslate2. With `engine: auto` and baselines on HF the generator stays on HF: it
    shares the loaded model rather than hold a second copy of the weights (with `generator_adapter:
    false` and an adapter it loads the base; `build_client` then picks its engine itself)."""
    from pipeline.generation import pick_local_engine

    g = cfg.generator
    if g.kind != "hf" or g.model not in (None, model_name) or g.adapter is not None:
        return None
    if g.engine == "auto" and baselines_engine == "hf":
        return "hf"
    return pick_local_engine(g.engine, device, model_name)


def assign_splits(
    rows: list[dict[str, Any]],
    eval_fraction: float,
    seed: int,
    keys: list[str] | None = None,
    places: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Each row's `split` (train / eval), set in place: a row's own `split` stays, and the rows of
    its prompt go with it; of the rest, per scope, a seeded `eval_fraction` of the rows without a
    split is held out, in whole groups of rows with the same prompt (`keys`, by default
    `pipeline.prompt_groups.group_key`: the request's last user turn), as close to that count as
    they allow. Else a copy of a held-out prompt would be trained on and the evaluation would
    measure it as unseen. A prompt in two scopes goes where the first scope (in_scope, near_scope,
    out_of_scope) sent it; its rows in a later scope count towards that scope's share. With one
    row per prompt the rows held out are the ones version 4's per-row shuffle held out (one
    `random.Random(seed)` drawn from scope after scope); a scope whose draw would hold out all its
    rows keeps one to train on. Rows of one prompt marked for both sides are a DataError naming
    them (`places[i]`, else `prompt row <i>`)."""
    from pipeline.prompt_groups import group_key, marked_sides, pick_groups

    keys = keys or [group_key(row, i) for i, row in enumerate(rows)]
    place = places or [f"prompt row {i}" for i in range(len(rows))]
    side = marked_sides(keys, [row["split"] or None for row in rows], place)  # and, below, each drawn prompt's
    rng = random.Random(seed)
    for scope in SCOPES:
        mine = [i for i, row in enumerate(rows) if row["scope"] == scope]
        unmarked = [i for i in mine if not rows[i]["split"]]
        groups: dict[str, list[int]] = {}
        for i in unmarked:
            groups.setdefault(keys[i], []).append(i)
        free = [key for key in groups if key not in side]
        held = sum(len(groups[key]) for key in groups if side.get(key) == "eval")  # pulled by a mark, an earlier scope
        n = max(0, round(len(unmarked) * eval_fraction) - held)
        trains = any(side.get(keys[i]) == "train" for i in mine)
        picked = pick_groups([len(groups[key]) for key in free], n, rng, min_rows=0, keep_one=not trains)
        side.update({key: "eval" if k in picked else "train" for k, key in enumerate(free)})
    for key, row in zip(keys, rows):
        row["split"] = row["split"] or side[key]
    return rows


class C3poDataStage(Stage):
    uses = "c3po_data"
    summary = "C3PO data: scoped prompts, baseline replies, feedback-applying revisions."
    Config = C3poDataConfig
    inputs = {
        "feedback": Input(("verbal_feedback",), required=False, doc="VerbalFeedback records (or JSONL with critique)"),
        "prompts": Input(("prompts",), required=False, doc="ready-made prompts: prompt, scope[, split, category]"),
        "adapter": Input(("adapter",), required=False, doc="the current policy's adapter (baselines come from it)"),
    }
    outputs = {
        "train": Output("c3po_data", doc="rows: scope, prompt, baseline, revised (in-scope)"),
        "eval_prompts": Output("prompts", doc="held-out prompts with scope, feedback and metric"),
    }
    default_num_cpus = float("inf")
    # not batch_size: HF generate seeds each batch of baselines (seed + b), sampled (temperature 0.7 by default),
    # so they change with it (as the simulate and evaluate stages' turns)
    non_semantic_fields = frozenset({"device", "engine"})
    # 2: baselines from the generation engine (CTranslate2 where faster): samples can differ from HF's;
    # 3: so can a local generator's prompts and revisions (`own_generator_engine`); 4: a Chain-of-Hindsight
    # adapter's baselines (and its generator's writing) come after its phrase (pipeline/hindsight.py);
    # 5: a prompt's rows are held out together (no eval prompt also trained on), batch_size is fingerprinted;
    # 6: exact repeats among the held-out prompts are dropped (a prompt is scored once)
    version = "6"
    config: C3poDataConfig

    def run(self):
        from pipeline.llm import HFClient, build_client
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer
        from pipeline.prompt_groups import distinct_items

        cfg: C3poDataConfig = self.config
        ctx = self.ctx
        feedback, topic = pick_feedback(cfg, ctx.input("feedback"))
        ctx.log.info("feedback: %s", feedback)
        engine = pick_engine(cfg.engine, cfg.device, ctx.model)
        needs_generator = ctx.input("prompts") is None or cfg.reviser == "generator"
        own = own_generator_engine(cfg, ctx.model, cfg.device, engine) if needs_generator else None
        adapter = ctx.input("adapter")
        is_policy = adapter is None or cfg.generator_adapter  # the generator is the policy itself
        tokenizer, model = load_tokenizer(ctx.model), None
        if engine == "hf" or (own == "hf" and is_policy):  # HF baselines, or a generator that shares the HF model
            model = load_causal_lm(ctx.model, device_policy(cfg.device), adapter=adapter).eval()
        generator, shared_ct2 = None, None
        if own == "ct2":  # the policy's own weights (or the base: generator_adapter false) on CTranslate2
            g = cfg.generator
            generator_adapter = adapter if cfg.generator_adapter else None
            generator = HFClient(ctx.model, cfg.device, g.batch_size, generator_adapter, None, tokenizer, g.sampling, "ct2")
            shared_ct2 = generator.ct2 if is_policy and engine == "ct2" else None  # baselines: the same weights
        elif needs_generator:
            shared = local_generator_model(cfg, adapter, model)
            generator = build_client(
                cfg.generator, ctx.model, cfg.device, shared, tokenizer, model_adapter=adapter if shared is not None else None
            )

        if ctx.input("prompts") is not None:
            prompts = self.given_prompts()
        else:
            prompts = self.generated_prompts(generator, feedback, topic)
        train = [p for p in prompts if p["split"] == "train"]
        held_out, repeats = distinct_items(p for p in prompts if p["split"] == "eval")
        if repeats:
            ctx.log.info("held-out prompts: %d exact repeats dropped (each prompt is scored once)", repeats)
        for scope in SCOPES:
            if not any(p["scope"] == scope for p in train):
                raise ValueError(f"no training prompts of scope {scope}; give more prompts or lower eval_fraction")

        ctx.log.info("baseline replies for %d prompts from %s (%s)", len(train), ctx.model, engine)
        replies = self.baselines(engine, model, tokenizer, [as_messages(p["prompt"]) for p in train], shared_ct2)
        for row, reply in zip(train, replies):
            row["baseline"], row["baseline_finished"] = reply[0].text, reply[0].finished

        in_scope = [p for p in train if p["scope"] == "in_scope"]
        revised = self.revise(generator, feedback, in_scope)
        dropped = 0
        for row, (text, ended) in zip(in_scope, revised):
            row["revised"], row["revised_finished"] = text, ended
        for row in train:
            row.setdefault("revised", "")
            row.setdefault("revised_finished", True)
        if cfg.filter_revisions and cfg.metric is not None and cfg.metric.kind != "judge":
            from trainers.feedback_eval import applies

            keep = [
                r
                for r in train
                if r["scope"] != "in_scope" or (applies(cfg.metric, r["revised"]) and r["revised"] != r["baseline"])
            ]
            dropped = len(train) - len(keep)
            train = keep
        if not any(r["scope"] == "in_scope" for r in train):
            raise ValueError("every revision failed the metric: no in-scope pair is left (check reviser / metric)")

        metric_json = cfg.metric.model_dump_json(exclude_none=True) if cfg.metric else ""
        for row in train + held_out:
            row["feedback"], row["metric"] = feedback, metric_json
        save_rows(train, ctx.output("train"))
        save_rows(
            [{k: r[k] for k in ("id", "prompt", "scope", "category", "feedback", "metric")} for r in held_out],
            ctx.output("eval_prompts"),
        )
        counts = {f"train_{s}": sum(r["scope"] == s for r in train) for s in SCOPES}
        counts.update({f"eval_{s}": sum(r["scope"] == s for r in held_out) for s in SCOPES})
        return {**counts, "eval_duplicates_dropped": repeats, "revisions_dropped": dropped}

    # ------------------------------------------------------------------ prompts

    def given_prompts(self) -> list[dict[str, Any]]:
        from pipeline.prompt_groups import group_key

        path = self.ctx.inputs["prompts"]
        rows = load_rows(path, required=["prompt", "scope"], what="scoped prompts")
        out = []
        keys = [group_key(row, i) for i, row in enumerate(rows)]  # the request's last user turn, before `str`
        for i, row in enumerate(rows):
            if row["scope"] not in SCOPES:
                raise ValueError(f"{path} row {i}: field 'scope': '{row['scope']}' is not one of {', '.join(SCOPES)}")
            split = row.get("split")
            if split not in (None, "", "train", "eval"):
                raise ValueError(f"{path} row {i}: field 'split': '{split}' is not train or eval")
            out.append(
                {
                    "id": str(row.get("id") or row_id(row["scope"], row["prompt"])),
                    "prompt": str(row["prompt"]),
                    "scope": row["scope"],
                    "category": str(row.get("category") or ""),
                    "split": split or "",
                }
            )
        return assign_splits(out, self.config.eval_fraction, self.ctx.seed, keys, [f"{path} row {i}" for i in range(len(out))])

    def generated_prompts(self, generator, feedback: str, topic: str | None) -> list[dict[str, Any]]:
        cfg: C3poDataConfig = self.config
        log, seed = self.ctx.log, self.ctx.seed
        if not topic:
            topic = generator.complete([[{"role": "user", "content": TOPIC_PROMPT.format(feedback=feedback)}]], seed)[0]
            topic = topic.strip().splitlines()[0].strip(' ."') if topic.strip() else feedback
        log.info("topic: %s", topic)
        ask = CATEGORIES_PROMPT.format(topic=topic, count=cfg.num_categories)
        categories = dedupe(parse_list(generator.complete([[{"role": "user", "content": ask}]], seed)[0]))[: cfg.num_categories]
        if not categories:
            raise ValueError(f"the generator ({generator.name}) proposed no categories for topic '{topic}'")
        log.info("categories: %s", "; ".join(categories))
        jobs: list[tuple[str, str, str]] = []
        for category in categories:
            jobs.append(
                (
                    "in_scope",
                    category,
                    IN_SCOPE_PROMPT.format(topic=topic, category=category, count=cfg.prompts_per_category, feedback=feedback),
                )
            )
            jobs.append(
                (
                    "near_scope",
                    category,
                    NEAR_SCOPE_PROMPT.format(topic=topic, category=category, count=cfg.prompts_per_category, feedback=feedback),
                )
            )
        for category in cfg.out_of_scope_categories:
            jobs.append(("out_of_scope", category, OUT_OF_SCOPE_PROMPT.format(category=category, count=cfg.prompts_per_category)))
        answers = generator.complete([[{"role": "user", "content": j[2]}] for j in jobs], seed + 1)
        rows, seen = [], set()
        for (scope, category, _), answer in zip(jobs, answers):
            for prompt in parse_list(answer)[: cfg.prompts_per_category]:
                key = re.sub(r"\W+", " ", prompt.lower()).strip()
                if key in seen:
                    continue
                seen.add(key)
                rows.append({"id": row_id(scope, prompt), "prompt": prompt, "scope": scope, "category": category, "split": ""})
        log.info("generated prompts: %s", ", ".join(f"{s}={sum(r['scope'] == s for r in rows)}" for s in SCOPES))
        return assign_splits(rows, cfg.eval_fraction, seed)

    def baselines(self, engine: str, model, tokenizer, conversations, ct2=None) -> list[list[Any]]:
        """The current model's replies: HF generate on the loaded model, or the generation engine
        on the same weights (the adapter merged; ENGINE_BATCH prompts per call), on `ct2` when the
        generator already holds that CTranslate2 model (the same call `generate_chat` makes). A
        Chain-of-Hindsight adapter answers after its phrase on each (pipeline/hindsight.py)."""
        from pipeline.generation import chat_generate, generate_chat
        from pipeline.hindsight import adapter_phrase, answered_after

        cfg, ctx = self.config, self.ctx

        def progress(done: int, total: int) -> None:
            ctx.log.info("baselines: batch %d/%d", done, total)

        def sample(suffix: str) -> list[list[Any]]:
            if engine == "hf":
                return chat_generate(
                    model, tokenizer, conversations, cfg.baseline_sampling, 1, cfg.batch_size, ctx.seed, progress, suffix
                )
            return ct2.generate(
                conversations,
                cfg.baseline_sampling,
                num_samples=1,
                seed=ctx.seed,
                batch_size=ENGINE_BATCH,
                on_batch=progress,
                prompt_suffix=suffix,
            )

        if engine == "hf" or (engine == "ct2" and ct2 is not None):
            return answered_after(adapter_phrase(ctx.input("adapter")), sample, tokenizer)
        return generate_chat(
            ctx.model,
            conversations,
            cfg.baseline_sampling,
            adapter=ctx.input("adapter"),
            batch_size=ENGINE_BATCH,
            seed=ctx.seed,
            engine=engine,
            device=cfg.device,
            on_batch=progress,
        )

    # ------------------------------------------------------------------ revisions

    def revise(self, generator, feedback: str, rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        """(revision, whether it ends) per in-scope row."""
        cfg: C3poDataConfig = self.config
        if cfg.reviser == "shorten":
            if cfg.metric is None or cfg.metric.kind != "max_words":
                raise ValueError("reviser: shorten needs a length metric: metric: {kind: max_words, value: N}")
            heads = [leading_sentences(r["baseline"], float(cfg.metric.value or 0)) for r in rows]
            kept = sum(h is not None for h in heads)
            self.ctx.log.info("shorten: %d of %d in-scope baselines open with whole sentences within the limit", kept, len(rows))
            return [(h, True) if h is not None else (r["baseline"], bool(r["baseline_finished"])) for r, h in zip(rows, heads)]
        if cfg.reviser == "template":
            if not cfg.revision_template or "{response}" not in cfg.revision_template:
                raise ValueError("reviser: template needs revision_template containing {response}")
            out = [
                template_revision(
                    cfg.revision_template, r["prompt"], r["baseline"], bool(r["baseline_finished"]), cfg.trim_cut_off
                )
                for r in rows
            ]
            if cfg.trim_cut_off:
                trimmed = sum(ended and not r["baseline_finished"] for r, (_, ended) in zip(rows, out))
                self.ctx.log.info("trim_cut_off: %d of %d in-scope baselines cut back to a whole sentence", trimmed, len(rows))
            return out
        asks = [
            [{"role": "user", "content": REVISE_PROMPT.format(feedback=feedback, prompt=r["prompt"], response=r["baseline"])}]
            for r in rows
        ]
        self.ctx.log.info("revising %d in-scope replies with %s", len(rows), generator.name)
        return [(text, True) for text in generator.complete(asks, self.ctx.seed + 2)]
