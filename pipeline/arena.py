"""The method arena: one feedback source through every method that can use it, with a matched
budget, then one `evaluate` stage per method and seed, side by side with the no-training
conditions (base, feedback in the prompt, MemPrompt memory).

An arena file is an ordinary pipeline file (its `stages:` produce the feedback) plus an
`arena:` block. `expand` turns it into an ordinary pipeline, adding

    views                feedback_views over the c3po_data stage (verbal), span_views over the
                         qa-feedback file (spans): the same examples for every method
    <method>_s<seed>     one training stage per method (or variant) and seed: budget + settings
    eval_base            evaluate: base / in_context / memory (their replies are reused below)
    eval_<method>_s<seed>  evaluate: that adapter, on the held-out prompts

A variant with `after: <arm>` trains on from that arm's adapter of the same seed (SFT then PPO,
InstructGPT's recipe: `sft_ppo: {method: ppo, after: sft}`); its row's cost is its own stage's.

and, when `arena.grid` tunes a method, in place of its `<method>_s<seed>`:

    validation           (verbal) validation_split: c3po_data's training rows into fit + validation;
                         (users) needs_validation: the simulated users' records of the fit needs,
                         and validation needs; (spans) span_views keeps the validation questions
                         out of the views itself
    <m>_g<k>_s<seed>     grid point k trained on the fit part
    val_<m>_g<k>_s<seed> evaluate: point k on the validation prompts only
    select_<m>_s<seed>   arena_select: the best point by validation score; its adapter goes on to
                         eval_<m>_s<seed>, the only stage of the method that sees held-out prompts

Selection is a stage rather than a choice made between two runs so that the run stays one static
graph: skipping, resuming, Ray scheduling, `heedful status` and lineage work unchanged, and the
choice is on disk beside the adapter (stages/arena_select.py has the rule). With a grid every
method, tuned or not, trains on the same fit part (the same examples), and the memory condition
remembers that part too (the same feedback). A failing method (or grid
point) blocks only its own evaluation. `collect` reads the finished run into the arena table
(`arena.json`, `arena.csv`; with a grid, `grid` lists every point's validation scores; with
several seeds, `aggregates` has each method's mean over seeds): pipeline/arena_table.py.
`report_section` draws it in report.html: pipeline/arena_report.py. With `arena.report_to`
(tensorboard, wandb, mlflow) every training and evaluate stage reports to those trackers (unless
its own settings say otherwise) and `heedful arena` logs the table and its Pareto plots there at
the end, once per content (pipeline/tracking.py; TensorBoard: `runs/<run>/arena/tensorboard`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# the table and its views live apart (module docstring); re-exported for callers of pipeline.arena
from .arena_report import print_table, report_section
from .arena_table import PLAN_FILE, collect, write_outputs
from .evaluation.summary import FLAT_ORDER
from .tracking import Trackers, installed, report_to_field

__all__ = [
    "PLAN_FILE",
    "ArenaSpec",
    "collect",
    "expand",
    "load_arena",
    "report_section",
    "run_arena",
    "save_plan",
    "write_outputs",
]

SOURCES = ("verbal", "users", "spans", "custom")
#: how each method reads each feedback source: input name -> reference ({train}/{views}/{users} filled in;
#: {train} is the c3po_data rows trained on: `<data>.train`, or its fit part when a grid is tuned)
WIRING: dict[str, dict[str, dict[str, str]]] = {
    "verbal": {
        "dpo": {"preferences": "{views}.preferences"},
        "coh": {"preferences": "{views}.preferences"},
        "cut": {"judgments": "{views}.judgments"},
        "kto": {"feedback": "{views}.unpaired"},
        "c3po": {"data": "{train}"},
        "sft": {"data": "{train}"},
        "ppo": {"prompts": "{views}.preferences", "reward_model": "reward.reward_model"},
    },
    "users": {
        "dpo": {"preferences": "{users}.preferences"},
        "coh": {"preferences": "{users}.preferences"},
        "cut": {"feedback": "{users}.verbal_feedback"},
        # the users' good / needs-work judgments of each reply: both labels whenever a user was unsatisfied
        # (their reactions hold loves and neutrals unless the judge was sure a reply was bad)
        "kto": {"feedback": "{users}.verbal_feedback"},
        "sft": {"preferences": "{users}.preferences"},
        "ppo": {"prompts": "{users}.preferences", "reward_model": "reward.reward_model"},
    },
    "spans": {
        "dpo": {"preferences": "{views}.preferences"},
        "coh": {"preferences": "{views}.preferences"},
        "cut": {"judgments": "{views}.judgments"},
        "kto": {"feedback": "{views}.unpaired"},
        "sft": {"preferences": "{views}.preferences"},
        "ppo": {"prompts": "{views}.preferences", "reward_model": "reward.reward_model"},
    },
    "custom": {},
}
#: every method that can use the source (those whose stage is not installed are left out)
DEFAULT_METHODS = {
    "verbal": ["dpo", "kto", "c3po", "cut", "coh", "sft", "ppo"],
    "users": ["dpo", "kto", "cut", "coh", "sft", "ppo"],
    "spans": ["dpo", "kto", "cut", "coh", "sft", "ppo"],
    "custom": [],
}
#: PPO learns from a reward model: the arena trains one on the preferences PPO takes its prompts from
#: (WIRING's ppo.prompts, those the pairwise methods read; FLR, fine-tuned: a preferred reply followed by
#: a satisfied user, the other by a complaint), in a stage of this name; `arena.reward` changes its
#: settings, `arena.inputs.ppo.reward_model` replaces it
REWARD_STAGE = "reward"
DEFAULT_REWARD_KIND = "followup"
DEFAULT_REWARD: dict[str, Any] = {"kind": DEFAULT_REWARD_KIND, DEFAULT_REWARD_KIND: {"finetune": True}}
#: budget keys a method spells otherwise: PPO's unit of training is a rollout of `prompts_per_step` prompts
BUDGET_ALIASES = {"ppo": {"max_steps": "steps", "per_device_train_batch_size": "prompts_per_step"}}
#: the validation metric a grid is tuned on, per source (arena.select_by changes it)
SELECT_BY = {"verbal": "adherence", "users": "first_reply_satisfied", "spans": "ref_loglik"}
#: metrics the evaluate stage measures only with drift on (teacher-forced on reference answers)
DRIFT_METRICS = ("kl_to_base", "ref_loglik")


class Variant(BaseModel):
    """A method under its own name with settings of its own, e.g. dpo_rpo: {method: dpo, settings: {rpo_alpha: 1.0}};
    with `after`, trained on from another arm's adapter of the same seed (sft_ppo: {method: ppo, after: sft})."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="the stage type it trains with")
    settings: dict[str, Any] = Field(default_factory=dict, description="on top of the budget and the method's settings")
    after: str | None = Field(
        default=None,
        description="start from this arm's adapter, same seed (its `adapter` input; the arm must be in the run too)",
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="its own inputs, over arena.inputs and the source's wiring: {seed}, {train}, {views}, {users}, {data} filled in",
    )


class ArenaSpec(BaseModel):
    """The `arena:` block of an arena file."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["verbal", "users", "spans", "custom"] = Field(
        default="verbal",
        description="verbal: a c3po_data stage; users: a simulate stage; spans: a qa-feedback file; custom: give every input",
    )
    data: str | None = Field(default=None, description="verbal: the c3po_data stage's name")
    users: str | None = Field(default=None, description="users: the simulate stage's name")
    spans: str | None = Field(default=None, description="spans: the qa-feedback file (a path or data:...)")
    methods: list[str] | None = Field(default=None, description="default: every method that can use the source, and the variants")
    variants: dict[str, Variant] = Field(default_factory=dict, description="more rows: a method under another name and settings")
    seeds: list[int] = Field(default_factory=lambda: [0])
    budget: dict[str, Any] = Field(default_factory=dict, description="training settings every method gets (max_steps, lora, ...)")
    method_settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per method: its own settings")
    grid: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="per method or variant: setting -> values to tune on the validation split"
    )
    validation: float = Field(
        default=0.25, gt=0, lt=1, description="with a grid: share of the training prompts kept out of training to tune on"
    )
    select_by: str | None = Field(
        default=None,
        description="validation metric a grid is tuned on (verbal: adherence; scoped_adherence also penalises firing "
        "near and out of scope)",
    )
    inputs: dict[str, dict[str, str]] = Field(default_factory=dict, description="per method: extra or replaced inputs")
    prompts: str | None = Field(default=None, description="held-out prompts (verbal default: <data>.eval_prompts)")
    needs: str | None = Field(default=None, description="held-out information needs for simulated users")
    memory: str | None = Field(
        default=None,
        description="prompts the feedback was given on, or critiques (default: what the methods train on: verbal <data>.train, "
        "users <users>.verbal_feedback; with a grid validation.fit, validation.verbal_feedback)",
    )
    views: dict[str, Any] = Field(default_factory=dict, description="verbal/spans: the views stage's `with`")
    conditions: list[str] = Field(default_factory=lambda: ["base", "in_context", "memory"])
    evaluate: dict[str, Any] = Field(default_factory=dict, description="every evaluate stage's `with`")
    reward: dict[str, Any] = Field(
        default_factory=dict,
        description="ppo: the `with` of the reward model stage it trains against (default FLR fine-tuned on the preferences)",
    )
    evaluate_inputs: dict[str, str] = Field(
        default_factory=dict, description="extra evaluate inputs (reward models, general set)"
    )
    report_to: Trackers = report_to_field("<stage>/tensorboard; the arena table and plots under arena/tensorboard")


def stage_name(method: str, seed: int) -> str:
    return f"{method}_s{seed}"


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest (the listed order)."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(
    data: dict[str, Any], methods: list[str] | None = None, seeds: list[int] | None = None, file: str = "<arena>"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline dict, plan) from an arena file's dict; `methods`/`seeds` override the file's.

    Stages added (see the module docstring): `views` (verbal, spans), `validation` (verbal with a
    grid), `eval_base`, and per method (or variant) and seed either `<m>_s<seed>` or, with a grid,
    `<m>_g<k>_s<seed>` + `val_<m>_g<k>_s<seed>` per point and `select_<m>_s<seed>`; then
    `eval_<m>_s<seed>` on the held-out prompts.
    """
    from stages.arena_select import MAX_POINTS

    from . import registry
    from .errors import ConfigError, Problem

    data = copy.deepcopy(data)
    raw = data.pop("arena", None)
    if not isinstance(raw, dict):
        raise ConfigError([Problem(file, None, "arena", "an arena file needs an `arena:` block (source, methods, budget, ...)")])
    try:
        spec = ArenaSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            [Problem(file, None, "arena." + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        ) from None
    if methods:
        spec.methods = methods
    if seeds:
        spec.seeds = seeds

    def problem(path: str, message: str) -> ConfigError:
        return ConfigError([Problem(file, None, f"arena.{path}", message)])

    stages: list[dict[str, Any]] = list(data.get("stages") or [])
    names = {s.get("name") for s in stages if isinstance(s, dict)}
    listed = ", ".join(sorted(map(str, names))) or "none"
    tuned = bool(spec.grid)
    if tuned and spec.source not in SELECT_BY:
        raise problem(
            "grid",
            f"a grid is tuned on a validation split of the training prompts, which the arena makes for sources "
            f"{', '.join(SELECT_BY)}; source '{spec.source}' has none (drop arena.grid)",
        )
    select_by = spec.select_by or SELECT_BY.get(spec.source, "adherence")
    from stages.arena_select import DERIVED

    if select_by not in FLAT_ORDER and select_by not in DERIVED and not select_by.startswith("reward/"):
        known = ", ".join([*FLAT_ORDER, *DERIVED])
        raise problem("select_by", f"unknown metric '{select_by}': one of {known} or reward/<kind>")
    from pipeline.evaluation.summary import NEUTRAL

    if select_by in NEUTRAL | {"rounds"}:
        # length has no better direction (the report reads it as "closer to the base"), and rounds are
        # averaged over the satisfied users only: a point that satisfies one user in one round would beat
        # one that satisfies every user in two
        why = "has no better direction" if select_by in NEUTRAL else "counts only the users it satisfied"
        raise problem("select_by", f"'{select_by}' {why}: select by a rate (satisfied, adherence, ...) instead")
    fill: dict[str, str | None] = {}  # None only when some stage has no name (None is then in `names`)
    validation_inputs: dict[str, str] = {}
    added: list[dict[str, Any]] = []
    if spec.source == "verbal":
        if spec.data not in names:
            raise problem("data", f"source verbal needs `data:` naming the c3po_data stage (stages: {listed})")
        train = f"{spec.data}.train"
        if tuned:  # held out by c3po_data; validation taken from its training rows only
            added.append(
                {
                    "name": "validation",
                    "uses": "validation_split",
                    "inputs": {"data": train},
                    "with": {"fraction": spec.validation},
                }
            )
            train = "validation.fit"
            validation_inputs = {"prompts": "validation.validation"}
        fill = {"data": spec.data, "views": "views", "train": train}
        added.append({"name": "views", "uses": "feedback_views", "inputs": {"data": train}, "with": spec.views})
    elif spec.source == "users":
        if spec.users not in names:
            raise problem("users", f"source users needs `users:` naming the simulate stage (stages: {listed})")
        fill = {"users": spec.users}
        if tuned:  # the needs the users talked about (never the held-out ones), a share kept for validation
            simulate = next(s for s in stages if isinstance(s, dict) and s.get("name") == spec.users)
            conversations = (simulate.get("inputs") or {}).get("conversations")
            if not conversations:
                raise problem("users", f"a grid needs the simulate stage '{spec.users}' to name its `conversations` input")
            records = {name: f"{spec.users}.{name}" for name in ("preferences", "verbal_feedback", "reactions")}
            added.append(
                {
                    "name": "validation",
                    "uses": "needs_validation",
                    "inputs": {"conversations": conversations, **records},
                    "with": {"fraction": spec.validation, "need_field": (simulate.get("with") or {}).get("need_field", "need")},
                }
            )
            fill = {"users": "validation"}
            validation_inputs = {"needs": "validation.validation", "prompts": "validation.validation"}
    elif spec.source == "spans":
        if not spec.spans:
            raise problem("spans", "source spans needs `spans:` naming the qa-feedback file (e.g. data/qa_feedback.json)")
        if "validation_fraction" in spec.views:
            raise problem("views.validation_fraction", "set arena.validation instead (used only with a grid)")
        views_with = {**spec.views, "validation_fraction": spec.validation if tuned else 0.0}
        added.append({"name": "views", "uses": "span_views", "inputs": {"qa_feedback": spec.spans}, "with": views_with})
        fill = {"views": "views"}
        validation_inputs = {"prompts": "views.validation_prompts", "general": "views.validation_answers"}
    tracked = [t for t in spec.report_to if t != "none"]
    if tracked and "arena" in names:
        raise problem("report_to", "the arena logs its table under the folder `arena`: rename your stage of that name")
    # report_to reaches every evaluate and training stage unless their own settings set it
    evaluate_with = {"report_to": tracked, **spec.evaluate} if tracked else spec.evaluate
    for stage in added:
        if stage["name"] in names:
            raise problem("source", f"the arena adds a stage named '{stage['name']}': rename your stage of that name")
    stages += added

    def variant_of(arm: str) -> Variant:
        """An arm as a variant: a method's own name is the method with nothing of its own."""
        return spec.variants.get(arm) or Variant(method=arm)

    def uses_of(arm: str) -> str:
        return variant_of(arm).method

    for name, variant in spec.variants.items():
        if registry.get(name) is not None:
            raise problem(f"variants.{name}", f"'{name}' is a method's own name: give the variant another (e.g. {name}_v2)")
        if registry.get(variant.method) is None:
            raise problem(
                f"variants.{name}.method", f"unknown method '{variant.method}' (stage types: {', '.join(registry.names())})"
            )
    if spec.methods:
        chosen = spec.methods
    else:  # every installed method that can use the source, then the variants
        chosen = [m for m in DEFAULT_METHODS[spec.source] if registry.get(m) is not None] + list(spec.variants)
    if not chosen:
        raise problem("methods", "no methods: list them (e.g. [dpo, kto])")
    for arm in chosen:
        method = uses_of(arm)
        if registry.get(method) is None:
            raise problem(
                "methods",
                f"unknown method '{arm}' (stage types: {', '.join(registry.names())}; variants: {', '.join(spec.variants) or 'none'})",
            )
        if method not in WIRING[spec.source] and method not in spec.inputs:
            raise problem(
                "methods",
                f"method '{method}' cannot use source '{spec.source}' on its own: give its inputs under arena.inputs.{method}",
            )
    for arm in chosen:  # a chained arm: its predecessor runs too, takes no adapter of its own, and no cycle
        first, seen = variant_of(arm).after, [arm]
        if first is None:
            continue
        method_cls = registry.get(uses_of(arm))
        if method_cls is None or "adapter" not in method_cls.inputs:
            raise problem(
                f"variants.{arm}.after", f"method '{uses_of(arm)}' cannot continue an adapter (it has no adapter input)"
            )
        if first not in chosen:
            raise problem(f"variants.{arm}.after", f"{arm} starts from {first}'s adapter: list {first} among the methods too")
        link: str | None = first
        while link is not None:
            if link in seen:
                raise problem(f"variants.{arm}.after", f"a loop: {' -> '.join([*seen, link])}")
            seen.append(link)
            link = variant_of(link).after
    for method in list(spec.method_settings) + list(spec.inputs):  # settings of methods left out by --methods are kept idle
        if registry.get(method) is None:
            raise problem(f"method_settings.{method}", f"unknown method '{method}'")
    points_of: dict[str, list[dict[str, Any]]] = {}
    for arm, grid in spec.grid.items():
        cls = registry.get(uses_of(arm))
        if cls is None:
            raise problem(f"grid.{arm}", f"unknown method or variant '{arm}'")
        for key, values in grid.items():
            if key not in cls.Config.model_fields:
                raise problem(f"grid.{arm}.{key}", f"{uses_of(arm)} has no setting '{key}'")
            if not values:
                raise problem(f"grid.{arm}.{key}", "list at least one value")
        points_of[arm] = grid_points(grid)
        if len(points_of[arm]) > MAX_POINTS:
            raise problem(f"grid.{arm}", f"{len(points_of[arm])} points; at most {MAX_POINTS} per method")

    def rule_rewarded(arm: str) -> bool:
        """A ppo arm whose objectives are all inline rules (e.g. the feedback's own metric,
        reward_models/rules.py `feedback_metric`) reads no reward model: none is trained for it."""
        settings = {**spec.method_settings.get("ppo", {}), **variant_of(arm).settings}
        tried = spec.grid.get(arm, {}).get("objectives") or [settings.get("objectives")]  # every grid point's
        return all(
            bool(objectives) and all(isinstance(o, dict) and o.get("rule") is not None for o in objectives)
            for objectives in tried
        )

    ppo_arms = [
        arm
        for arm in chosen
        if uses_of(arm) == "ppo"
        and "reward_model" not in {**spec.inputs.get("ppo", {}), **variant_of(arm).inputs}
        and not rule_rewarded(arm)
    ]
    trains_reward = bool(ppo_arms and "ppo" in WIRING[spec.source])
    if spec.reward and not trains_reward and any(uses_of(arm) == "ppo" for arm in chosen):
        raise problem(
            "reward",
            "no reward model is trained by the arena in this run (every ppo arm reads arena.inputs.ppo.reward_model, "
            "its own inputs or rules): drop arena.reward, or set the settings on the stage that trains yours",
        )
    if trains_reward:
        if REWARD_STAGE in names:
            raise problem("methods", f"ppo's reward model is trained in a stage named '{REWARD_STAGE}': rename your stage")
        reward_cls = registry.get("train_reward")
        if reward_cls is None:
            raise problem("methods", "ppo's reward model needs the train_reward stage, which is not installed")
        if spec.reward.get("kind", DEFAULT_REWARD_KIND) != DEFAULT_REWARD_KIND:
            raise problem(
                "reward.kind",
                f"the arena trains ppo's reward model on the preferences, which only FLR (kind: {DEFAULT_REWARD_KIND}) "
                "reads; train another kind in a stage of your own and give it as arena.inputs.ppo.reward_model",
            )
        # the reward model gets the arena's training budget too (steps, batch, LoRA), then its own settings;
        # not the policy's max_length: FLR reads the whole conversation before the follow-up it scores
        trained_alike = {
            k: copy.deepcopy(v) for k, v in spec.budget.items() if k in reward_cls.Config.model_fields and k != "max_length"
        }
        reward_with = {**copy.deepcopy(DEFAULT_REWARD), **trained_alike, **copy.deepcopy(spec.reward)}
        reward_with[DEFAULT_REWARD_KIND] = {  # FLR's own block merged key by key: fine-tuning stays on unless turned off
            **DEFAULT_REWARD[DEFAULT_REWARD_KIND],
            **(spec.reward.get(DEFAULT_REWARD_KIND) or {}),
        }
        feedback = WIRING[spec.source]["ppo"]["prompts"].format(**fill)
        stages.append({"name": REWARD_STAGE, "uses": "train_reward", "inputs": {"feedback": feedback}, "with": reward_with})
    for key, reference in spec.evaluate_inputs.items():
        if reference.split(".")[0] == REWARD_STAGE and not trains_reward and REWARD_STAGE not in names:
            raise problem(
                f"evaluate_inputs.{key}",
                f"{reference!r}: the arena trains its '{REWARD_STAGE}' stage only for a ppo arm that reads a reward "
                "model, and none in this run does (rule-rewarded or no ppo arm): train one in a stage of your own",
            )
    prompts = spec.prompts or {"verbal": f"{spec.data}.eval_prompts", "spans": "views.eval_prompts"}.get(spec.source)
    # MemPrompt's memory: the same feedback the methods train on -- the prompts the verbal feedback was given on
    # ({train}: validation's fit part when a grid is tuned, not the whole of <data>.train, a third more prompts
    # at the default 0.25), or the users' critiques (of the fit needs with a grid)
    memory = spec.memory or {"verbal": fill.get("train"), "users": f"{fill.get('users')}.verbal_feedback"}.get(spec.source)
    eval_inputs = {k: v for k, v in {"prompts": prompts, "needs": spec.needs}.items() if v}
    if spec.source == "spans":
        eval_inputs["general"] = "views.eval_answers"  # ref_loglik: the corrected answers to held-out questions
    eval_inputs.update(spec.evaluate_inputs)
    base_inputs = dict(eval_inputs)
    # the users source's in-context feedback is the most recurring of the remembered critiques
    if memory and ("memory" in spec.conditions or (spec.source == "users" and "in_context" in spec.conditions)):
        base_inputs["memory"] = memory
    stages.append(
        {
            "name": "eval_base",
            "uses": "evaluate",
            "inputs": base_inputs,
            "with": {**evaluate_with, "conditions": list(spec.conditions)},
        }
    )
    # a grid point is scored on the validation prompts only: the held-out ones are not among its inputs
    rm_inputs = {k: v for k, v in spec.evaluate_inputs.items() if k not in ("prompts", "needs", "general", "memory")}
    validation_with = {**evaluate_with, "conditions": ["adapter"], "drift": select_by in DRIFT_METRICS}

    def adapter_of(arm: str, seed: int) -> str:
        """The adapter an arm's evaluation reads: its own stage's, or its selected grid point's."""
        name = stage_name(arm, seed)
        return f"select_{name}.adapter" if arm in points_of else f"{name}.adapter"

    def fill_inputs(arm: str, inputs: dict[str, str], values: dict[str, str | None]) -> dict[str, str]:
        out = {}
        for key, reference in inputs.items():
            try:
                out[key] = reference.format(**values)
            except (KeyError, IndexError, ValueError) as exc:
                known = ", ".join("{" + k + "}" for k, v in values.items() if v is not None)
                raise problem(
                    f"variants.{arm}.inputs.{key}", f"cannot fill {reference!r} ({exc}): placeholders {known}"
                ) from None
        return out

    plan_methods = []
    for arm in chosen:
        method = uses_of(arm)
        cls = registry.get(method)
        assert cls is not None  # every chosen method was checked against the registry above
        fields = set(cls.Config.model_fields)
        wiring = {k: v.format(**fill) for k, v in WIRING[spec.source].get(method, {}).items()}
        wiring.update(spec.inputs.get(method, {}))
        variant = variant_of(arm)
        if method == "ppo" and rule_rewarded(arm) and "reward_model" not in variant.inputs:
            wiring.pop("reward_model", None)
        base_settings: dict[str, Any] = {"report_to": tracked} if tracked and "report_to" in fields else {}
        aliases = BUDGET_ALIASES.get(method, {})
        budget = {aliases.get(k, k): v for k, v in spec.budget.items()}
        base_settings.update({k: copy.deepcopy(v) for k, v in budget.items() if k in fields})
        base_settings.update(copy.deepcopy(spec.method_settings.get(method, {})))
        base_settings.update(copy.deepcopy(variant.settings))
        for seed in spec.seeds:
            name = stage_name(arm, seed)
            seed_wiring = {**wiring, **fill_inputs(arm, variant.inputs, {**fill, "seed": str(seed)})}
            if variant.after is not None:
                seed_wiring["adapter"] = adapter_of(variant.after, seed)
            settings = copy.deepcopy(base_settings)
            if "trainer_args" in fields:  # the seed of this arm (initialisation, data order)
                settings["trainer_args"] = {**settings.get("trainer_args", {}), "seed": seed, "data_seed": seed}
            elif "seed" in fields:  # a method with a seed of its own (ppo)
                settings["seed"] = seed
            arm_plan: dict[str, Any] = {"method": arm, "uses": method, "seed": seed, "label": name}
            if variant.after is not None:
                arm_plan["after"] = stage_name(variant.after, seed)
            if arm in points_of:
                select = f"select_{name}"
                select_inputs: dict[str, str] = {}
                grid_plan = []
                for k, point in enumerate(points_of[arm]):
                    point_name = f"{arm}_g{k}_s{seed}"
                    stages.append({"name": point_name, "uses": method, "inputs": seed_wiring, "with": {**settings, **point}})
                    stages.append(
                        {
                            "name": f"val_{point_name}",
                            "uses": "evaluate",
                            "inputs": {**validation_inputs, **rm_inputs, "adapter": f"{point_name}.adapter"},
                            "with": {**validation_with, "label": point_name},
                        }
                    )
                    select_inputs[f"validation_{k}"] = f"val_{point_name}.summary"
                    select_inputs[f"adapter_{k}"] = f"{point_name}.adapter"
                    grid_plan.append({"point": k, "settings": point, "stage": point_name, "validation": f"val_{point_name}"})
                stages.append(
                    {
                        "name": select,
                        "uses": "arena_select",
                        "inputs": select_inputs,
                        "with": {"metric": select_by, "settings": points_of[arm]},
                    }
                )
                adapter = f"{select}.adapter"
                arm_plan.update(stage=select, grid=grid_plan)
            else:
                stages.append({"name": name, "uses": method, "inputs": seed_wiring, "with": settings})
                adapter = f"{name}.adapter"
                arm_plan["stage"] = name
            stages.append(
                {
                    "name": f"eval_{name}",
                    "uses": "evaluate",
                    "inputs": {**eval_inputs, "adapter": adapter, "reference": "eval_base.evaluation"},
                    "with": {**evaluate_with, "conditions": ["adapter"], "label": name},
                }
            )
            arm_plan["evaluation"] = f"eval_{name}"
            plan_methods.append(arm_plan)
    data["stages"] = stages
    plan = {
        "source": spec.source,
        "methods": plan_methods,
        "baseline": "eval_base",
        "conditions": list(spec.conditions),
        "budget": spec.budget,
        "seeds": spec.seeds,
        "variants": {k: v.model_dump() for k, v in spec.variants.items()},
        "tuning": {"validation": spec.validation, "select_by": select_by} if tuned else None,
        "report_to": tracked,
    }
    return data, plan


def load_arena(
    path: str | Path, methods: list[str] | None = None, seeds: list[int] | None = None, overrides: list[str] | None = None
):
    """The arena file at `path` as a validated Pipeline plus its plan. `--set arena.X=...`
    changes the arena block; other overrides apply to the expanded pipeline (e.g. stages.dpo_s0.with.beta)."""
    from .config import apply_override, build_pipeline
    from .yaml_source import YamlSource

    source = YamlSource.load(path)
    if not isinstance(source.data, dict):
        from .errors import ConfigError

        raise ConfigError([source.problem((), "expected a mapping with run_name, model, stages and arena")])
    arena_sets = [o for o in overrides or [] if o.startswith("arena.")]
    for assignment in arena_sets:
        apply_override(source.data, assignment)
    expanded, plan = expand(source.data, methods, seeds, str(path))
    pipeline = build_pipeline(
        YamlSource(expanded, source.lines, str(path)),
        Path(path).resolve().parent,
        [o for o in overrides or [] if o not in arena_sets],
        Path(path),
    )
    return pipeline, plan


def save_plan(run_root: Path, plan: dict[str, Any]) -> None:
    from .artifacts import atomic_write_json

    run_root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_root / PLAN_FILE, plan)


# ----------------------------------------------------------------------------- command line


def parse_list(text: str | None, what: str, as_int: bool = False) -> list | None:
    from .errors import HeedfulError

    if not text:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if as_int:
        try:
            return [int(t) for t in items]
        except ValueError:
            raise HeedfulError(f"--{what} {text!r}: expected comma-separated integers, e.g. 0,1") from None
    return items


def run_arena(
    arena_file: Path,
    methods: str | None,
    seeds: str | None,
    overrides: list[str],
    runs_dir: Path,
    address: str | None,
    no_ray: bool,
    force: list[str],
) -> None:
    """`heedful arena`: expand, run as an ordinary pipeline, then write and print the arena table
    (also when a method failed: its row says so, the exit status is 1) and log it to `arena.report_to`."""
    from .cli import _run, console

    pipeline, plan = load_arena(arena_file, parse_list(methods, "methods"), parse_list(seeds, "seeds", as_int=True), overrides)
    trackers = installed(plan["report_to"])  # a tracker that is not installed fails before any stage runs
    run_root = Path(runs_dir).resolve() / pipeline.config.run_name
    save_plan(run_root, plan)
    try:
        _run(pipeline, runs_dir, no_ray, address, force)
    finally:
        table = write_outputs(run_root)
        if table is not None:
            print_table(console, table)
            console.print(f"arena:   {run_root / 'arena.csv'} and arena.json")
            log_new_table(trackers, run_root, f"{pipeline.config.run_name}/arena", table)


#: which arena table each tracker last received (a digest per tracker), beside the arena's TensorBoard folder
LOGGED_FILE = Path("arena") / "logged.json"


def log_new_table(trackers: Sequence[str], run_root: Path, run_name: str, table: dict[str, Any]) -> None:
    """Log the arena table to each tracker that has not received this very table. A rerun in which
    every stage was up to date rebuilds the same table; logged again, it would add a second copy of
    every point and figure to the tracker (a second TensorBoard events file, a second W&B/MLflow
    run). A table that changed (a stage rerun, a method added) is logged, to every tracker. Keyed by
    tracker name: pointing `wandb` at another project (WANDB_PROJECT) does not log there again until
    the table changes or runs/<run>/arena/logged.json is removed."""
    from .artifacts import atomic_write_json, hash_json, read_json
    from .cli import console
    from .tracking import log_arena

    ledger = Path(run_root) / LOGGED_FILE
    digest = hash_json(table)
    try:
        logged = read_json(ledger)
    except (OSError, ValueError):
        logged = {}
    if not isinstance(logged, dict):
        logged = {}
    trackers = [t for t in trackers if t != "none"]
    todo = [t for t in trackers if logged.get(t) != digest]
    if trackers and not todo:
        console.print(f"arena:   the table is unchanged, not logged to {', '.join(trackers)} again")
        return
    for tracker in todo:  # each recorded once it has the table: one that fails is tried again next time
        log_arena([tracker], Path(run_root) / "arena" / "tensorboard", run_name, table)
        logged[tracker] = digest
        atomic_write_json(ledger, logged)
