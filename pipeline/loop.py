"""The closed loop: a deployed model's feedback becomes its next adapter, gated and hot-deployed.

`heedful loop configs/loop.yaml` runs rounds beside a running `heedful serve`. A round is an
ordinary heedful pipeline run (`runs/<loop>/round-NNN`), run phase by phase so the state file
can say where it is:

    pull      serve_pull from the previous round's cursor (quarantined, exactly once); with
              `argilla:` also argilla_pull (`human`): what annotators submitted in Argilla since
              the previous round's own cursor, as the signals human_reactions, human_preferences,
              human_verbal_feedback
    train     one stage per `train:` step whose signal brought enough records, chained:
              the deployed adapter -> step 1 -> step 2 ... (the candidate); a `c3po from
              critiques` step is three per critique it learns that round (every one that
              `min_records` users gave, up to `critique.max_per_round`, most users first):
              recurring_critique -> c3po_data -> c3po, the critiques' adapters chained; beside them
              one train_reward stage per `rewards:` entry whose signal brought enough records,
              refreshing that reward model on all its records so far (pipeline/loop_rewards.py)
    evaluate  evaluate the deployed version (unless an earlier round already did, with the
              same settings: `reusable_evaluation`) and the candidate on the held-out set,
              scored by the reward models in use; gate
    deploy    export the candidate; deploy it only if the gate passed (optionally as a canary)

Each phase is the same pipeline extended by that phase's stages, so the stages already done
are skipped by fingerprint; a loop killed in any phase resumes the same round on rerun: the
pull is committed with its cursor or not at all (no record lost or taken twice), training
resumes from its checkpoints, and the server is on the old or the new version (it swaps only
after loading). The loop's own state (rounds, cursor, deployed versions, gate results) is one
JSON file written atomically after every phase: `runs/<loop>/loop.json`. One process runs a
loop at a time (`loop_lock`): a second `heedful loop` on the same loop folder is refused, since
it would resume the round the first is running, into the same stage folders and state file.

Why train from the deployed adapter on the new records only: each record then trains exactly
one adapter version, and `heedful trace` can name the records that shaped a version (its
lineage plus its ancestors'). Why the server is asked which version is active rather than
trusting the state file: a human may have rolled back or deployed by hand between rounds.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import HeedfulError
from .loop_rewards import RewardStep
from .paths import CONFIG_DIR, ConfigPath

STATE_FILE = "loop.json"
PHASES = ("pull", "train", "evaluate", "deploy")
#: which input of each method reads which pulled signal
SIGNAL_INPUTS: dict[str, dict[str, str]] = {
    "kto": {
        "reactions": "feedback",
        "verbal_feedback": "feedback",
        "human_reactions": "feedback",
        "human_verbal_feedback": "feedback",
    },
    "dpo": {"preferences": "preferences", "human_preferences": "preferences"},
    "coh": {
        "preferences": "preferences",
        "verbal_feedback": "feedback",
        "human_preferences": "preferences",
        "human_verbal_feedback": "feedback",
    },
    "cut": {"verbal_feedback": "feedback", "human_verbal_feedback": "feedback"},
    "sft": {"preferences": "preferences", "human_preferences": "preferences"},
    # C3PO learns one feedback per adapter: each recurring critique of the round (stages/recurring_critique.py)
    "c3po": {"critiques": "feedback"},
}
#: the most critiques a `c3po from critiques` step learns in one round (`critique.max_per_round`)
MAX_CRITIQUES_PER_ROUND = 3
#: the pulled signals whose requests a recurring critique uses as out-of-scope prompts
SERVED_SIGNALS = ("reactions", "preferences", "followups")
#: the signals people gave in Argilla (`loop.argilla:`) -> the `human` stage's output they are read from
HUMAN_SIGNALS = {"human_reactions": "reactions", "human_preferences": "preferences", "human_verbal_feedback": "verbal_feedback"}
#: the stage that pulls them (argilla_pull), beside `pull` (serve_pull)
HUMAN_STAGE = "human"


def signal_output(signal: str) -> tuple[str, str]:
    """(stage, output) a signal's records come from in a round: ("pull", "reactions"), ("human", "preferences")."""
    if signal in HUMAN_SIGNALS:
        return HUMAN_STAGE, HUMAN_SIGNALS[signal]
    return "pull", signal


class TrainStep(BaseModel):
    """Train `method` on the round's new `signal` records, when at least `min_records` arrived."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: str
    signal: str = Field(
        alias="from", description="reactions, preferences, verbal_feedback, critiques; human_<kind> with `argilla:`"
    )
    min_records: int = Field(
        default=1, ge=1, description="records of the signal; for critiques: distinct users who gave the same critique"
    )
    settings: dict[str, Any] = Field(default_factory=dict, alias="with")
    data: dict[str, Any] = Field(
        default_factory=dict, description="c3po only: c3po_data settings (generator, reviser, revision_template, ...)"
    )
    critique: dict[str, Any] = Field(
        default_factory=dict,
        description="c3po only: recurring_critique settings (grouping, generator, near_scope_prompts) and "
        f"max_per_round (critiques learned per round, default {MAX_CRITIQUES_PER_ROUND})",
    )

    def grouping(self):
        """How this step groups critiques (the same settings in the loop's count and in the stage)."""
        from feedback.critiques import CritiqueGrouping

        return CritiqueGrouping.model_validate(self.critique.get("grouping") or {})

    def max_per_round(self) -> int:
        """`critique.max_per_round`: the most critiques this step learns in one round (the loop's
        setting, not the stage's: it decides how many recurring_critique stages the round has)."""
        value = self.critique.get("max_per_round", MAX_CRITIQUES_PER_ROUND)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_per_round must be an integer >= 1, got {value!r}")
        return value


class LoopSpec(BaseModel):
    """The `loop:` block of a loop file."""

    model_config = ConfigDict(extra="forbid")
    server: str = Field(description="the heedful serve URL, e.g. http://127.0.0.1:8000")
    token_file: ConfigPath | None = Field(
        default=None, description="admin token file, mode 0600 (else $HEEDFUL_TOKEN); relative: beside the loop file"
    )
    rounds: int | None = Field(default=None, ge=1, description="stop after this many rounds (default: 1 without --every)")
    min_new_feedback: int = Field(default=1, ge=1, description="a round starts when this many new records arrived")
    every: str | None = Field(default=None, description="wait between checks for new feedback, e.g. 30s, 10m, 1h")
    pull: dict[str, Any] = Field(default_factory=dict, description="serve_pull settings (quarantine, page)")
    argilla: dict[str, Any] | None = Field(
        default=None, description="argilla_pull settings (dataset, argilla, include_drafts): people's reviews each round"
    )
    train: list[TrainStep] = Field(min_length=1)
    rewards: list[RewardStep] = Field(
        default_factory=list, description="reward models refreshed on all feedback so far (docs/loop.md)"
    )
    evaluate: dict[str, Any] = Field(default_factory=dict, description="{inputs: {prompts, needs, ...}, with: {...}}")
    gate: dict[str, Any] = Field(default_factory=dict, description="gate settings: rules")
    canary: dict[str, Any] | None = Field(default=None, description="deploy as a canary first: share, min_reactions, ...")
    export: dict[str, Any] = Field(default_factory=dict, description="export settings")


def parse_duration(text: str | None) -> float | None:
    """'90', '30s', '10m', '1h' -> seconds."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match:
        raise HeedfulError(f"every: {text!r} is not a duration (e.g. 30s, 10m, 1h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


class LoopFile:
    """A loop file: `run_name`, `model`, `seed` and the other pipeline keys, plus `loop:`."""

    def __init__(self, path: Path, overrides: list[str] | None = None):
        from .config import apply_override
        from .yaml_source import YamlSource

        self.path = Path(path).resolve()
        source = YamlSource.load(self.path)
        data = source.data
        if not isinstance(data, dict) or "loop" not in data:
            raise HeedfulError(f"{self.path}: expected a mapping with run_name, model and a `loop:` block")
        for assignment in overrides or []:
            apply_override(data, assignment)
        self.base = {k: v for k, v in data.items() if k not in ("loop", "stages")}
        #: the file's own `stages:` run in every round after the pull (they may read pull.<signal>),
        #: e.g. score + argilla_push with `select:` to send what the reward models are unsure about to people
        self.extra: list[dict[str, Any]] = list(data.get("stages") or [])
        self.name = str(data.get("run_name") or self.path.stem)
        try:
            # its paths (token_file) are read beside the loop file, as its stages' are (pipeline.paths)
            self.spec = LoopSpec.model_validate(data["loop"], context={CONFIG_DIR: self.path.parent})
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            line = source.lines.get(("loop", *first["loc"][:1])) if hasattr(source, "lines") else None
            where = f"{self.path}:{line}" if line else str(self.path)
            raise HeedfulError(f"{where}: field 'loop.{field}': {first['msg']}") from None
        for step in self.spec.train:
            if step.signal not in SIGNAL_INPUTS.get(step.method, {}):
                known = ", ".join(f"{m} from {'/'.join(s)}" for m, s in SIGNAL_INPUTS.items())
                raise HeedfulError(f"{self.path}: loop.train: {step.method} cannot train from {step.signal} (known: {known})")
            if (step.data or step.critique) and step.signal != "critiques":
                raise HeedfulError(f"{self.path}: loop.train: `data:` and `critique:` belong to a c3po step from critiques")
            try:
                step.grouping()
            except ValidationError as exc:
                raise HeedfulError(
                    f"{self.path}: loop.train: {step.method}: critique.grouping: {exc.errors()[0]['msg']}"
                ) from None
            try:
                step.max_per_round()
            except ValueError as exc:
                raise HeedfulError(f"{self.path}: field 'loop.train: {step.method}: critique.max_per_round': {exc}") from None
        from .loop_rewards import check_rewards

        check_rewards(self.path, self.spec.rewards, self.spec.evaluate.get("inputs") or {})
        self.check_argilla()

    def check_argilla(self) -> None:
        """`argilla:` must be a dataset's argilla_pull settings minus what the loop sets itself
        (the cursor); a human_<kind> signal needs it."""
        spec = self.spec
        human = [f"loop.train: {s.method}" for s in spec.train if s.signal in HUMAN_SIGNALS]
        human += [f"loop.rewards: {r.kind}" for r in spec.rewards if r.signal in HUMAN_SIGNALS]
        if spec.argilla is None:
            if human:
                raise HeedfulError(f"{self.path}: {human[0]} learns from Argilla: set `loop.argilla: {{dataset: ...}}`")
            return
        from stages.argilla_pull import ArgillaPullConfig

        owned = sorted(set(spec.argilla) & {"cursor_file", "write_cursor_file", "incremental", "accumulate", "if_missing"})
        if owned:
            raise HeedfulError(
                f"{self.path}: field 'loop.argilla.{owned[0]}': the loop sets it (it chains the cursor across rounds)"
            )
        try:
            config = ArgillaPullConfig.model_validate(spec.argilla, context={CONFIG_DIR: self.path.parent})
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise HeedfulError(f"{self.path}: field 'loop.argilla.{field}': {first['msg']}") from None
        if not config.dataset:
            raise HeedfulError(f"{self.path}: field 'loop.argilla.dataset': the Argilla dataset to pull is required")


# ----------------------------------------------------------------------------- state


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_state(root: Path) -> dict[str, Any]:
    import json

    path = root / STATE_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"rounds": []}


def save_state(root: Path, state: dict[str, Any]) -> None:
    from .artifacts import atomic_write_json

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / STATE_FILE, state)


# ----------------------------------------------------------------------------- one round as a pipeline


def round_stages(
    loop: LoopFile,
    phase: str,
    cursor: str | None,
    current: str | None,
    counts: dict[str, int],
    reuse_current: dict[str, str] | None = None,
    rewards: list[dict[str, Any]] | None = None,
    human_cursor: str | None = None,
) -> list[dict]:
    """The round's stages up to and including `phase`. `current`: the deployed adapter folder
    (None: the base model); `counts`: new records per signal (decides the train steps);
    `reuse_current`: an earlier evaluation summary of the deployed version (see `reusable_evaluation`)
    that the gate reads instead of evaluating it again; `rewards`: the round's reward-model plan
    (`loop_rewards.plan`): its trained entries' stages, and the models that score the evaluations;
    `human_cursor`: the `human` (argilla_pull) stage's previous cursor, as `cursor` is serve_pull's."""
    from .loop_rewards import reward_stages, scoring_inputs

    spec = loop.spec
    rewards = rewards or []
    stages: list[dict] = [
        {
            "name": "pull",
            "uses": "serve_pull",
            "with": {"url": spec.server, "token_file": spec.token_file, "cursor_file": cursor, **spec.pull},
        }
    ]
    if spec.argilla is not None:
        # read the previous round's committed cursor, never write it: the new one is this stage's output
        human = {**spec.argilla, "cursor_file": human_cursor, "write_cursor_file": False, "if_missing": "empty"}
        stages.append({"name": HUMAN_STAGE, "uses": "argilla_pull", "with": human})
    if phase == "pull":
        return stages
    stages += copy.deepcopy(loop.extra)
    previous = current
    for i, step in enumerate(spec.train):
        if counts.get(step.signal, 0) < step.min_records:
            continue
        if step.signal == "critiques":  # one C3PO adapter per critique learned, chained in rank order
            for rank in range(1, counts.get("critique_groups", 1) + 1):
                stages += critique_stages(i + 1, step, previous, counts, rank)
                # rank 1 keeps the one-critique names (train_2_c3po), rank 2 is train_2_c3po_2
                name = f"train_{i + 1}_{step.method}" + (f"_{rank}" if rank > 1 else "")
                inputs = {"data": f"c3po_data_{critique_suffix(i + 1, rank)}.train"}
                stages.append(train_stage(name, step, inputs, previous))
                previous = f"{name}.adapter"
            continue
        name = f"train_{i + 1}_{step.method}"
        inputs = {SIGNAL_INPUTS[step.method][step.signal]: ".".join(signal_output(step.signal))}
        stages.append(train_stage(name, step, inputs, previous))
        previous = f"{name}.adapter"
    stages += reward_stages(spec.rewards, rewards)  # independent of the policy steps, in the same phase
    if not any(s["name"].startswith("train_") for s in stages) or phase == "train":
        return stages
    candidate = previous
    ev = spec.evaluate
    scorers = scoring_inputs(rewards, ev.get("inputs", {}))
    current_inputs = {**ev.get("inputs", {}), **scorers, **({"adapter": current} if current else {})}
    current_summary, current_condition = "eval_current.summary", ("current" if current else "base")
    if reuse_current is not None:  # an earlier round evaluated this very version with these settings
        current_summary, current_condition = reuse_current["summary"], reuse_current["condition"]
    else:
        stages.append(
            {
                "name": "eval_current",
                "uses": "evaluate",
                "inputs": current_inputs,
                "with": {**ev.get("with", {}), "conditions": ["adapter" if current else "base"], "label": "current"},
            }
        )
    stages += [
        {
            "name": "eval_candidate",
            "uses": "evaluate",
            "inputs": {**ev.get("inputs", {}), **scorers, "adapter": candidate},
            "with": {**ev.get("with", {}), "conditions": ["adapter"], "label": "candidate"},
        },
        {
            "name": "gate",
            "uses": "gate",
            "inputs": {"candidate": "eval_candidate.summary", "current": current_summary},
            "with": {**spec.gate, "current_condition": current_condition},
        },
    ]
    if phase == "evaluate":
        return stages
    deploy_with: dict[str, Any] = {"url": spec.server, "token_file": spec.token_file}
    if spec.canary:
        deploy_with["canary"] = spec.canary
    return stages + [
        {"name": "export", "uses": "export", "inputs": {"adapter": candidate}, "with": copy.deepcopy(spec.export)},
        {
            "name": "deploy",
            "uses": "deploy",
            "inputs": {"package": "export.package", "decision": "gate.decision"},
            "with": deploy_with,
        },
    ]


def train_stage(name: str, step: TrainStep, inputs: dict[str, str], adapter: str | None) -> dict:
    """A train step's stage, continuing `adapter` (None: from the base model)."""
    inputs = {**inputs, **({"adapter": adapter} if adapter is not None else {})}
    return {"name": name, "uses": step.method, "inputs": inputs, "with": copy.deepcopy(step.settings)}


def critique_suffix(number: int, rank: int) -> str:
    """`2` for step 2's first critique (critique_2, c3po_data_2), `2_3` for its third (critique_2_3)."""
    return str(number) if rank == 1 else f"{number}_{rank}"


def critique_stages(number: int, step: TrainStep, adapter: str | None, counts: dict[str, int], rank: int = 1) -> list[dict]:
    """A `c3po from critiques` step's data stages for the round's critique of rank `rank`: that
    recurring critique of the pull, then c3po_data (baselines from the adapter this C3PO continues,
    the previous critique's for rank > 1; revisions by the step's `data:` settings)."""
    served = {name: f"pull.{name}" for name in SERVED_SIGNALS if counts.get(name, 0) > 0}
    suffix = critique_suffix(number, rank)
    data_inputs = {"feedback": f"critique_{suffix}.feedback", "prompts": f"critique_{suffix}.prompts"}
    if adapter is not None:
        data_inputs["adapter"] = adapter
    settings = {k: v for k, v in copy.deepcopy(step.critique).items() if k != "max_per_round"}
    settings = {**settings, "min_users": step.min_records, **({"rank": rank} if rank > 1 else {})}
    return [
        {
            "name": f"critique_{suffix}",
            "uses": "recurring_critique",
            "inputs": {"feedback": "pull.verbal_feedback", **served},
            "with": settings,
        },
        {"name": f"c3po_data_{suffix}", "uses": "c3po_data", "inputs": data_inputs, "with": copy.deepcopy(step.data)},
    ]


def round_pipeline(loop: LoopFile, run_name: str, stages: list[dict]):
    from .config import pipeline_from_dict

    data = {**copy.deepcopy(loop.base), "run_name": run_name, "stages": stages}
    return pipeline_from_dict(data, loop.path.parent, str(loop.path))


def full_round(loop: LoopFile):
    """A first round as it runs when every train step has its records (for `heedful validate`:
    every stage, input and setting checked without a server)."""
    from .loop_rewards import validation_plan

    counts = {step.signal: step.min_records for step in loop.spec.train}
    rewards = validation_plan(loop.spec.rewards)
    return round_pipeline(loop, "round-000", round_stages(loop, "deploy", None, None, counts, rewards=rewards))


def evaluation_key(loop: LoopFile, reward_models: list[str] | None = None) -> str:
    """What an evaluation's result depends on besides the adapter: the `evaluate:` block, the model,
    the seed, the content of its local input files and the refreshed reward models that score it
    (`reward_models`: their folders; each round's refresh is a new folder, so an evaluation scored by
    an older model is not reused), and the evaluate stage's version. Equal keys: the same version
    scores the same."""
    import hashlib
    import json

    from .artifacts import hash_path

    files = {}
    for name, ref in sorted((loop.spec.evaluate.get("inputs") or {}).items()):
        if ":" in str(ref):  # data:... (shipped with heedful) or a stage's output: no file of the user's
            continue
        path = Path(str(ref)).expanduser()  # resolved as the round's pipeline resolves it (pipeline/config.py)
        path = path if path.is_absolute() else loop.path.parent / path
        if path.exists():  # a file or a dataset folder: its content
            files[name] = hash_path(path)
    from stages.evaluate import EvaluateStage

    evaluate = dict(loop.spec.evaluate)
    if isinstance(evaluate.get("with"), dict):  # settings that do not change the result (report_to, device) are left out
        evaluate["with"] = {k: v for k, v in evaluate["with"].items() if k not in EvaluateStage.non_semantic_fields}
    model = loop.base.get("model")
    if isinstance(
        model, str
    ):  # a local folder by its content, as the round's stages fingerprint it (retrained in place: measured again)
        from .models import local_model, model_fingerprint

        model = model_fingerprint(local_model(model, loop.path.parent))
    body = {"evaluate": evaluate, "model": model, "seed": loop.base.get("seed"), "files": files}
    body["evaluate_version"] = EvaluateStage.version  # an upgrade that measures differently measures again
    if reward_models:
        body["reward_models"] = sorted(reward_models)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reusable_evaluation(root: Path, earlier: list[dict[str, Any]], version: str | None, key: str) -> dict[str, str] | None:
    """An earlier round's evaluation of the deployed `version` under the same `evaluation_key`, or None.

    Why: a round evaluates the deployed version as `eval_current`, and that version is, after a
    deploy, the previous round's candidate, which that round already evaluated as
    `eval_candidate`: the same adapter, settings and seed give the same summary, so the gate reads
    that one (condition `candidate`) instead of spending an evaluation on it again. A round whose
    candidate was rejected left the deployed version's own evaluation (`eval_current`, or what it
    reused), which the next round reuses the same way.
    """
    for entry in reversed(earlier):
        if version is None or entry.get("evaluation_key") != key or entry.get("phase") != "done":
            continue
        if entry.get("deployed") and entry.get("version_after") == version:
            found = {"summary": str(root / entry["run"] / "eval_candidate" / "summary"), "condition": "candidate"}
        elif entry.get("current_version") == version and entry.get("gate"):
            found = entry.get("reuse_current") or {
                "summary": str(root / entry["run"] / "eval_current" / "summary"),
                "condition": "current" if entry.get("current_adapter") else "base",
            }
        else:
            continue
        return found if Path(found["summary"]).is_file() else None
    return None


# ----------------------------------------------------------------------------- the server side


def served(spec: LoopSpec, token: str | None) -> tuple[str | None, str | None]:
    """(active version id, its adapter folder or None for the base model), asked of the server."""
    from serving.deploy_cli import active_version

    return active_version(spec.server, token)


def live_stats(spec: LoopSpec, token: str | None) -> dict[str, dict]:
    """The server's live per-version counts (completions, reactions, love rate); {} if it cannot say."""
    from serving.deploy_cli import version_stats

    try:
        return {row["version"]: row for row in version_stats(spec.server, token)}
    except (HeedfulError, KeyError, TypeError):
        return {}


def count_new(
    spec: LoopSpec,
    token: str | None,
    cursor_file: str | None,
    human_cursor: str | None = None,
    base_dir: Path | None = None,
) -> dict[str, int]:
    """New feedback rows on the server after the cursor, per heedful signal (read only: nothing is taken).
    `critiques`: distinct users behind the most recurrent critique (before quarantine: an upper bound;
    how many critiques the round learns is counted after the pull, `trainable_counts`).
    With `argilla:`, also the records annotators submitted after `human_cursor` (`human_<kind>`);
    `base_dir`: the loop file's folder, which its relative paths are read against."""
    import json

    from stages.serve_pull import OUTPUT_OF, fetch_new

    watermark, seen = 0, set()
    if cursor_file and Path(cursor_file).is_file():
        cursor = json.loads(Path(cursor_file).read_text(encoding="utf-8"))
        watermark, seen = int(cursor.get("watermark", 0)), set(cursor.get("ids", []))
    rows, _ = fetch_new(spec.server, token, watermark, seen, page=int(spec.pull.get("page", 1000)))
    counts: dict[str, int] = {}
    for row in rows:
        signal = OUTPUT_OF.get(row.get("kind", ""), "other")
        counts[signal] = counts.get(signal, 0) + 1
    verbal = [row.get("record") or {} for row in rows if OUTPUT_OF.get(row.get("kind", "")) == "verbal_feedback"]
    counts.update({k: v for k, v in critique_counts(spec, verbal).items() if k == "critiques"})
    counts.update(count_human(spec, human_cursor, base_dir))
    return counts


def new_records(counts: dict[str, int]) -> int:
    """How many new feedback records `counts` (as `count_new` returns them) holds, the number
    `min_new_feedback` is compared with: not `critiques` (a count of users, derived from the
    verbal records already counted) and not `other` (kinds no training step reads)."""
    return sum(n for kind, n in counts.items() if kind not in ("critiques", "other"))


def count_human(spec: LoopSpec, cursor_file: str | None, base_dir: Path | None = None) -> dict[str, int]:
    """`{"human_<kind>": n}`: what the round's `human` stage would pull now (read only; one pass
    over the dataset's submitted responses, as the pull itself makes); {} without `argilla:`.
    `argilla:` read as the round's stage reads it: its relative paths beside the loop file (`base_dir`)."""
    if spec.argilla is None:
        return {}
    from stages.argilla_pull import ArgillaPullConfig
    from stages.argilla_pull import count_new as count_argilla

    context = {CONFIG_DIR: base_dir} if base_dir is not None else None
    found = count_argilla(ArgillaPullConfig.model_validate(spec.argilla, context=context), cursor_file)
    return {f"human_{kind}": n for kind, n in found.items()}


def critique_counts(spec: LoopSpec, verbal: list[dict[str, Any]]) -> dict[str, int]:
    """When a step trains from critiques, `{"critiques": distinct users of the most recurrent
    critique, "critique_groups": how many critiques the step learns}` (the groups `min_records`
    users gave, at most `critique.max_per_round`), grouped and ranked by the function that step's
    recurring_critique stages pick with (`feedback.critiques.ranked`); else {}."""
    from feedback.critiques import critique_rows, group_critiques, ranked

    step = next((s for s in spec.train if s.signal == "critiques"), None)
    if step is None:
        return {}
    groups = group_critiques(critique_rows(verbal), step.grouping())
    learned = ranked(groups, step.min_records, step.max_per_round())
    return {"critiques": len(groups[0].users) if groups else 0, "critique_groups": len(learned)}


def trainable_counts(pull_dir: Path, counts: dict[str, int], spec: LoopSpec | None = None) -> dict[str, int]:
    """`counts` as the train steps may use them: reactions that are all love (or all dislike) cannot
    train KTO, which needs both labels; they count as 0, so the step is skipped, not failed.
    `critiques` and `critique_groups` (with `spec`): distinct users behind the most recurrent pulled
    critique and how many critiques the step learns, counted by the functions the recurring_critique
    stages group and rank with, so the decision (and each stage's rank) is made before training."""
    from .records import load_rows

    out = dict(counts)
    for signal in ("reactions", "human_reactions"):  # the human stage's folder is beside the pull's
        folder = pull_dir.parent.joinpath(*signal_output(signal))
        if counts.get(signal) and folder.exists():
            from trainers.kto import reaction_label

            labels = {reaction_label(r.get("reaction"), f"pulled reaction ({signal})") for r in load_rows(folder)}
            if not {True, False} <= labels:
                out[signal] = 0
    if spec is not None:
        verbal = load_rows(pull_dir / "verbal_feedback") if (pull_dir / "verbal_feedback").exists() else []
        out.update(critique_counts(spec, verbal))
    return out


def trainable(spec: LoopSpec, counts: dict[str, int]) -> bool:
    """Would at least one train step run on these counts?"""
    return any(counts.get(step.signal, 0) >= step.min_records for step in spec.train)


# ----------------------------------------------------------------------------- driving rounds


def fault_point(point: str) -> None:
    """Fault injection for the kill -9 tests: with HEEDFUL_FAULT_PAUSE naming this point (e.g.
    `train`, `after-pull`; comma-separated), print `PAUSED <point>` and wait to be killed."""
    import os
    import sys

    if point in os.environ.get("HEEDFUL_FAULT_PAUSE", "").split(","):
        print(f"PAUSED {point}", flush=True)
        sys.stdout.flush()
        time.sleep(3600)


LOCK_FILE = ".loop.lock"


@contextlib.contextmanager
def loop_lock(root: Path) -> Iterator[None]:
    """Hold `root`'s loop lock (an exclusive `flock` on `<root>/.loop.lock`) or refuse at once.

    Why refuse rather than wait: a second process on the same loop would resume the round the first
    is running (the state file says it is unfinished), training into the same staging folders, and
    the two would overwrite each other's `loop.json` (a lost round entry loses its cursor, so its
    records would be pulled and trained again). The lock goes with the process, so a killed loop
    never leaves it held. The file keeps the holder's pid, for the message."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise HeedfulError(
                f"loop {root.name}: another process (pid {holder}) is running it ({root / LOCK_FILE}); "
                "wait for it to end, or stop it first (a stopped loop resumes its round on the next run)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Loop:
    """Runs rounds of a loop file; `runs_dir/<name>/` holds the rounds and `loop.json`."""

    def __init__(self, loop: LoopFile, runs_dir: Path, use_ray: bool = True, address: str | None = None, on_event=None):
        self.loop = loop
        self.root = Path(runs_dir).resolve() / loop.name
        self.use_ray, self.address = use_ray, address
        self.on_event = on_event or (lambda kind, record, text: None)
        self.log = lambda text: None  # `run`'s log
        self.state = load_state(self.root)
        self.state.setdefault("loop", loop.name)
        self.state.setdefault("server", loop.spec.server)

    def token(self) -> str | None:
        from serving.deploy_cli import read_token

        return read_token(Path(self.loop.spec.token_file).expanduser() if self.loop.spec.token_file else None)

    def cursor(self, key: str = "cursor") -> str | None:
        """The cursor of the last round whose pull committed and trained (None before the first);
        `human_cursor`: the `human` (Argilla) stage's."""
        for entry in reversed(self.state["rounds"]):
            if entry.get(key):
                return entry[key]
        return None

    def save(self) -> None:
        save_state(self.root, self.state)

    def execute(self, run_name: str, stages: list[dict]):
        from .runner import Runner

        pipeline = round_pipeline(self.loop, run_name, stages)
        result = Runner(pipeline, self.root, use_ray=self.use_ray, address=self.address, on_event=self.on_event).execute()
        if not result.ok:
            failed = [f"{r.name}: {r.error or r.status}" for r in result.records if r.status not in ("done", "skipped")]
            raise HeedfulError(f"loop round {run_name} failed in " + "; ".join(failed) + " (rerun to resume)")
        return result

    def pending_round(self) -> dict[str, Any] | None:
        last = self.state["rounds"][-1] if self.state["rounds"] else None
        return last if last is not None and last.get("phase") != "done" else None

    def run_round(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Run (or resume) one round through its phases; `entry` is its record in the state."""
        import json

        run_name, token = entry["run"], self.token()
        if entry.get("current_version") is None:
            entry["current_version"], entry["current_adapter"] = served(self.loop.spec, token)
            entry["live"] = live_stats(self.loop.spec, token)
        current = entry.get("current_adapter")
        cursor = entry.get("cursor_in")
        for phase in PHASES:
            if PHASES.index(phase) < PHASES.index(entry.get("phase", "pull")):
                continue
            entry["phase"] = phase
            counts = entry.get("trainable", entry.get("counts", {}))
            if phase != "pull":
                self.decide(entry, counts)
            self.save()
            fault_point(phase)
            stages = round_stages(
                self.loop,
                phase,
                cursor,
                current,
                counts,
                entry.get("reuse_current"),
                rewards=entry.get("rewards"),
                human_cursor=entry.get("human_cursor_in"),
            )
            if phase != "pull" and not any(s["name"].startswith("train_") for s in stages):
                entry.pop("cursor", None)  # not trained on: the next round pulls these records again
                entry.pop("human_cursor", None)
                entry.update(
                    phase="done", finished=now(), outcome="nothing to train (too few records per signal after quarantine)"
                )
                break
            result = self.execute(run_name, stages)
            fault_point("after-" + phase)
            if phase == "pull":
                metrics = result.record("pull").metrics
                entry["counts"] = {
                    k: int(metrics.get(k, 0)) for k in ("reactions", "verbal_feedback", "preferences", "followups")
                }
                entry["quarantined"] = int(metrics.get("quarantined", 0) or 0)
                entry["cursor"] = str(self.root / run_name / "pull" / "cursor" / "cursor.json")
                if self.loop.spec.argilla is not None:  # committed with its records by the runner, like pull's
                    human = result.record(HUMAN_STAGE).metrics
                    if human.get("output"):
                        entry["counts"][f"human_{human['output']}"] = int(human.get("records", 0))
                    entry["human_cursor"] = str(self.root / run_name / HUMAN_STAGE / "cursor" / "cursor.json")
                    self.count_withdrawn(entry)
                entry["trainable"] = trainable_counts(self.root / run_name / "pull", entry["counts"], self.loop.spec)
            elif phase == "train":
                from .loop_rewards import record_metrics

                entry["trained"] = [s["name"].split("_", 2)[2] for s in stages if s["name"].startswith("train_")]
                entry["critiques"] = critique_summary(self.root / run_name)
                record_metrics(entry.get("rewards") or [])
            else:
                # evaluate, and deploy again: a round resumed there with other evaluation settings re-ran the gate (`decide`)
                entry["gate"] = json.loads((self.root / run_name / "gate" / "decision").read_text(encoding="utf-8"))
            if phase == "deploy":
                deployment = json.loads((self.root / run_name / "deploy" / "deployment" / "deployment.json").read_text())
                entry.update(deployed=deployment["deployed"], version_after=deployment.get("version"), why=deployment["why"])
                entry["candidate_adapter"] = str(self.root / run_name / "export" / "package")
                entry.update(phase="done", finished=now(), outcome=deployment["why"])
        self.save()
        from .report import build_report

        if (self.root / run_name / "pipeline.json").is_file():
            build_report(self.root / run_name)
        return entry

    def count_withdrawn(self, entry: dict[str, Any]) -> None:
        """`withdrawn`: earlier rounds' human records whose answers this round's pull found withdrawn
        in Argilla (a tie, discarded, deleted), which the reward models' pool leaves out from now on
        (`loop_rewards.pooled_rows`); an adapter that already trained on one keeps what it learned."""
        from .loop_rewards import withdrawn_counts

        runs = [e["run"] for e in self.state["rounds"] if e["round"] < entry["round"]] + [entry["run"]]
        entry["withdrawn"] = withdrawn_counts(self.root, runs)
        for signal, n in entry["withdrawn"].items():
            self.log(
                f"round {entry['round']}: {n} earlier {signal} record(s) withdrawn in Argilla since "
                "(a tie, discarded, deleted): left out of the reward models' pool from now on"
            )

    def decide(self, entry: dict[str, Any], counts: dict[str, int]) -> None:
        """After the pull, before every phase: what each `rewards:` entry does (once per round,
        saved, so a resumed round runs the same stages), then the evaluation key (which includes
        the models that score) and whether an earlier evaluation of the deployed version can be
        reused under it. The key is computed again on every phase: a round resumed after its
        `evaluate:` settings or held-out files changed evaluates the deployed version again rather
        than gating the new candidate's numbers against an evaluation made under the old settings."""
        from .loop_rewards import plan, scoring_models

        if "rewards" not in entry and self.loop.spec.rewards and trainable(self.loop.spec, counts):
            entry["rewards"] = plan(self.loop.spec.rewards, self.root, self.state["rounds"], entry)
        key = evaluation_key(self.loop, scoring_models(entry.get("rewards")))
        if entry.get("evaluation_key") != key:
            entry["evaluation_key"] = key
            earlier = [e for e in self.state["rounds"] if e["round"] < entry["round"]]
            entry["reuse_current"] = reusable_evaluation(self.root, earlier, entry["current_version"], key)

    def run(self, rounds: int | None, min_new: int, every: float | None, log=print) -> list[dict[str, Any]]:
        """Resume an unfinished round, then start rounds while enough new feedback arrives.

        A round starts when at least `min_new` new records wait on the server and one train
        step has its `min_records`. When quarantine leaves too few to train, the round ends
        without advancing the cursor (the records wait for the next round, nothing is lost);
        the loop then waits `every` (or stops without it), so it never spins on the same rows.
        """
        with loop_lock(self.root):
            self.log = log
            self.state = {**self.state, **load_state(self.root)}  # what a process before this one left
            return self._run(rounds, min_new, every, log)

    def _run(self, rounds: int | None, min_new: int, every: float | None, log) -> list[dict[str, Any]]:
        done: list[dict[str, Any]] = []
        pending = self.pending_round()
        if pending is not None:
            log(f"resuming {pending['run']} at phase {pending.get('phase')}")
            done.append(self.run_round(pending))
            if str(pending.get("outcome", "")).startswith("nothing to train") and every is None:
                return done
        while rounds is None or len(done) < rounds:
            counts = count_new(
                self.loop.spec, self.token(), self.cursor(), self.cursor("human_cursor"), base_dir=self.loop.path.parent
            )
            new = new_records(counts)
            if new < min_new or not trainable(self.loop.spec, counts):
                if every is None:
                    log(
                        f"{new} new feedback record(s) on the server {counts}; a round needs {min_new} and one train step's min_records: stopping"
                    )
                    break
                log(f"{new} new feedback record(s); waiting {every:g}s")
                time.sleep(every)
                continue
            number = len(self.state["rounds"]) + 1
            entry = {"round": number, "run": f"round-{number:03d}", "started": now(), "phase": "pull", "new": new}
            entry["cursor_in"] = self.cursor()
            entry["human_cursor_in"] = self.cursor("human_cursor")
            self.state["rounds"].append(entry)
            self.save()
            log(f"round {number}: {new} new feedback record(s) {counts}")
            done.append(self.run_round(entry))
            if str(entry.get("outcome", "")).startswith("nothing to train"):
                if every is None:
                    break
                time.sleep(every)
        return done


def critique_summary(run_dir: Path) -> list[dict[str, Any]]:
    """Every recurring critique a C3PO step of this round learned, in chain order: `{stage, rank,
    feedback, users, records}` each (empty without one)."""
    import json

    found = []
    for path in run_dir.glob("critique_*/critique/critique.json"):
        stage = path.parent.parent.name
        number = re.fullmatch(r"critique_(\d+)(?:_\d+)?", stage)
        if number is None:  # not one the loop planned (critique_stages names them)
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        rank = int(data.get("rank", 1))
        found.append(
            (
                int(number.group(1)),
                rank,
                {"stage": stage, "rank": rank, **{k: data.get(k) for k in ("feedback", "users", "records")}},
            )
        )
    return [entry for *_, entry in sorted(found, key=lambda f: f[:2])]


def learned_critiques(entry: dict[str, Any]) -> list[str]:
    """The critiques a round's entry in loop.json says it learned (`critique`: one, before several)."""
    found = entry.get("critiques") or ([entry["critique"]] if entry.get("critique") else [])
    return [str(c.get("feedback")) for c in found]


def status_rows(root: Path) -> list[dict[str, Any]]:
    """One row per round from `loop.json`: what a user asks `heedful loop status`."""
    from .loop_rewards import summary as reward_summary

    rows = []
    for entry in load_state(root)["rounds"]:
        gate = entry.get("gate") or {}
        rows.append(
            {
                "round": entry["round"],
                "run": entry["run"],
                "phase": entry.get("phase"),
                "records": sum((entry.get("counts") or {}).values()),
                "quarantined": entry.get("quarantined", 0),
                "withdrawn": sum((entry.get("withdrawn") or {}).values()) or None,
                "version_before": entry.get("current_version"),
                "trained": ", ".join(entry.get("trained") or []) or None,
                "critique": " | ".join(learned_critiques(entry)) or None,
                "rewards": reward_summary(entry.get("rewards")),
                "current_eval": None
                if not gate
                else ("reused " + Path(entry["reuse_current"]["summary"]).parts[-3] if entry.get("reuse_current") else "ran"),
                "gate": None
                if not gate
                else ("passed" if gate.get("passed") else "failed: " + "; ".join(gate.get("reasons", []))),
                "deployed": entry.get("deployed"),
                "version_after": entry.get("version_after"),
                "outcome": entry.get("outcome"),
            }
        )
    return rows
