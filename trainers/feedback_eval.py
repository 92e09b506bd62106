"""Did the model learn the feedback, and only where it applies? (C3PO's evaluation, usable
by every method.)

Held-out prompts carry a scope: `in_scope` (the feedback applies), `near_scope` (related,
it must not apply), `out_of_scope` (unrelated). For each condition (the base model, the base
model with the feedback in its system prompt = the in-context baseline, the trained adapter)
we sample replies and ask whether the feedback was applied, with a programmatic metric
(starts_with, ends_with, contains, regex, max_words, min_words, max_chars) or a judge LLM:

    adherence          share of in-scope replies that apply the feedback   (higher is better)
    overgen_near/out   share of near-/out-of-scope replies that apply it   (lower is better)
each reported with its difference from the base model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.generation import EngineSetting, SamplingSettings
from pipeline.hindsight import Phrase, answered_after
from pipeline.llm import LLMSettings

SCOPES = ("in_scope", "near_scope", "out_of_scope")
SCOPE_KEYS = {"in_scope": "adherence", "near_scope": "overgen_near", "out_of_scope": "overgen_out"}
IN_CONTEXT_TEMPLATE = "Follow this feedback from the user whenever it applies: {feedback}"
Condition = Literal["base", "in_context", "trained"]
JUDGE_TEMPLATE = (
    'A user gave an assistant this feedback: "{feedback}"\n\nThen a user wrote:\n{prompt}\n\n'
    "The assistant replied:\n{response}\n\nDoes the reply apply the feedback? Answer with one word: yes or no."
)


def _all_conditions() -> list[Condition]:
    return ["base", "in_context", "trained"]


class MetricSpec(BaseModel):
    """How to tell whether a reply applies the feedback."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["starts_with", "ends_with", "contains", "regex", "max_words", "min_words", "max_chars", "judge"]
    value: str | float | None = None
    case_sensitive: bool = False
    judge: LLMSettings | None = Field(default=None, description="kind judge: the judge LLM")

    @model_validator(mode="after")
    def _check(self) -> MetricSpec:
        if self.kind == "judge":
            if self.judge is None:
                raise ValueError("metric kind 'judge' needs a judge generator (judge: {kind: local|openai, ...})")
        elif self.value is None:
            raise ValueError(f"metric kind '{self.kind}' needs a value")
        elif self.kind == "regex":
            try:
                re.compile(str(self.value))
            except re.error as exc:
                raise ValueError(f"invalid regex {self.value!r}: {exc}") from None
        elif self.kind in ("max_words", "min_words", "max_chars"):
            float(self.value)
        return self

    @classmethod
    def parse(cls, text: str) -> MetricSpec:
        """'starts_with:Chef's tip:' -> MetricSpec(kind='starts_with', value="Chef's tip:") (CLI form)."""
        kind, _, value = text.partition(":")
        return cls(kind=kind.strip(), value=value if value else None)


def applies(metric: MetricSpec, response: str) -> bool:
    """Programmatic check of one reply (judge metrics go through `judge_applies`)."""
    text = response.strip()
    value = str(metric.value)
    if metric.kind in ("starts_with", "ends_with", "contains") and not metric.case_sensitive:
        text, value = text.lower(), value.lower()
    if metric.kind == "starts_with":
        return text.startswith(value.strip())
    if metric.kind == "ends_with":
        return text.endswith(value.strip())
    if metric.kind == "contains":
        return value in text
    if metric.kind == "regex":
        return re.search(value, text, 0 if metric.case_sensitive else re.IGNORECASE) is not None
    words = len(re.findall(r"\S+", text))
    if metric.kind == "max_words":
        return words <= float(value)
    if metric.kind == "min_words":
        return words >= float(value)
    if metric.kind == "max_chars":
        return len(text) <= float(value)
    raise ValueError(f"metric kind '{metric.kind}' is not programmatic")


def judge_applies(generator, feedback: str, prompts: list[str], responses: list[str], seed: int = 0) -> list[bool]:
    """Ask a judge LLM, one yes/no per reply; anything but a leading 'yes' counts as no."""
    asks = [
        [{"role": "user", "content": JUDGE_TEMPLATE.format(feedback=feedback, prompt=p, response=r)}]
        for p, r in zip(prompts, responses)
    ]
    verdicts = generator.complete(asks, seed=seed)
    return [bool(re.match(r"\W*yes\b", v.strip(), re.IGNORECASE)) for v in verdicts]


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Rates per condition and scope (`scope_estimates`, as the evaluate stage reports them),
    each condition's difference from `base`, then each rate's 95% interval (`.../lo`, `.../hi`)."""
    out: dict[str, float] = {}
    intervals: dict[str, float] = {}
    for condition in sorted({row["condition"] for row in rows}):
        for name, estimate in scope_estimates([r for r in rows if r["condition"] == condition]).items():
            out[f"{name}/{condition}"] = estimate["value"]
            intervals[f"{name}/{condition}/lo"], intervals[f"{name}/{condition}/hi"] = estimate["lo"], estimate["hi"]
    for key in list(out):
        name, condition = key.split("/")
        if condition != "base" and f"{name}/base" in out:
            out[f"{name}_vs_base/{condition}"] = out[key] - out[f"{name}/base"]
    return {**out, **intervals}


def sample_completions(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    sampling: SamplingSettings,
    batch_size: int,
    seed: int,
    phrase: Phrase | None = None,
    adapters: list[str] | None = None,
):
    """One `Completion` (text, tokens, finished) per conversation on a loaded HF model; with a
    Chain-of-Hindsight `phrase` (pipeline/hindsight.py) the assistant turn opens with it and the
    reply is cut at its stop phrases, as every engine samples from such an adapter. `adapters`:
    per conversation, its PEFT adapter (`chat_generate`)."""
    from pipeline.generation import chat_generate

    def sample(suffix: str):
        return chat_generate(
            model, tokenizer, conversations, sampling, 1, batch_size, seed, prompt_suffix=suffix, adapters=adapters
        )

    return [r[0] for r in answered_after(phrase, sample, tokenizer)]


def choose_prompts(prompts: list[dict[str, Any]], max_per_scope: int | None) -> list[dict[str, Any]]:
    """The held-out prompts to evaluate, in order, at most `max_per_scope` per scope; bad scopes are errors."""
    chosen: list[dict[str, Any]] = []
    per_scope: dict[str, int] = {}
    for i, row in enumerate(prompts):
        scope = row["scope"]
        if scope not in SCOPES:
            raise ValueError(f"prompt {i} ({str(row['prompt'])[:40]!r}): scope '{scope}' is not one of {', '.join(SCOPES)}")
        if max_per_scope and per_scope.get(scope, 0) >= max_per_scope:
            continue
        per_scope[scope] = per_scope.get(scope, 0) + 1
        chosen.append(row)
    return chosen


def verdicts(metric: MetricSpec, judge, feedback: str, prompts: list[str], replies: list[str], seed: int = 0) -> list[bool]:
    """Does each reply apply the feedback? Programmatic metric, or the judge LLM when `judge` is given."""
    if judge is not None:
        return judge_applies(judge, feedback, prompts, replies, seed)
    return [applies(metric, reply) for reply in replies]


def scope_estimates(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """adherence / overgen_near / overgen_out of one condition's rows, each {value, n, lo, hi} (Wilson)."""
    from pipeline.stats import rate

    return {
        key: rate(r["applied"] for r in rows if r["scope"] == scope)
        for scope, key in SCOPE_KEYS.items()
        if any(r["scope"] == scope for r in rows)
    }


class EvalSettings(BaseModel):
    """What `evaluate_feedback` (and the c3po stage's built-in evaluation) runs."""

    model_config = ConfigDict(extra="forbid")
    conditions: list[Condition] = Field(default_factory=_all_conditions)
    sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(max_new_tokens=48, temperature=0.0))
    batch_size: int = Field(
        default=8,
        ge=1,
        description="HF generate: prompts at a time; each batch is seeded, so replies sampled at a temperature depend on "
        "it (part of the fingerprint)",
    )
    in_context_template: str = IN_CONTEXT_TEMPLATE
    max_prompts_per_scope: int | None = Field(default=None, ge=1)
    engine: EngineSetting = "auto"


def evaluate(
    model_name: str,
    adapter: str | Path | None,
    prompts: list[dict[str, Any]],
    feedback: str,
    metric: MetricSpec,
    settings: EvalSettings,
    seed: int = 0,
    device: str | None = None,
    log=None,
    model=None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample replies per condition on scoped prompts and score them. `model` may be a
    loaded PEFT model (its adapter is switched off for base/in_context; HF generate writes
    its replies). Without one the replies come from the generation engine `settings.engine`
    picks (the `evaluate` stage's path, pipeline/evaluation/conditions.py: CTranslate2 with
    the adapter merged where it is faster on this CPU; the same greedy replies as HF), and
    the HF model is loaded only when HF writes them."""
    import logging

    from pipeline.evaluation import conditions as answering
    from pipeline.generation import pick_engine
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer

    logger = log or logging.getLogger(__name__)
    chosen = choose_prompts(prompts, settings.max_prompts_per_scope)  # a bad scope is an error here
    names = [c for c in settings.conditions if c != "trained" or adapter is not None or model is not None]
    engine = "hf" if model is not None else pick_engine(settings.engine, device, model_name)
    if model is None and engine == "hf":
        model = load_causal_lm(model_name, device_policy(device), adapter=adapter).eval()
    ans = answering.Answering(
        model=model,
        tokenizer=load_tokenizer(model_name),
        conditions=[
            answering.Condition(name=c, adapter_on=c == "trained", system="feedback" if c == "in_context" else "none")
            for c in names
        ],
        system_for=answering.system_prompts(settings.in_context_template, feedback, None),
        model_name=model_name,
        adapter=Path(adapter) if adapter is not None else None,
        device=device,
        seed=seed,
        batch_size=settings.batch_size,
        resamples=0,  # no interval of a mean here: rates get Wilson intervals
        log=logger,
        engine=engine,
    )
    rows = answering.generate_replies(ans, chosen, feedback, metric, {}, settings.sampling, None, ngram=3)
    for condition in names:
        rates = summarize([r for r in rows if r["condition"] == condition])
        logger.info("%s: %s", condition, ", ".join(f"{k.split('/')[0]}={v:.2f}" for k, v in rates.items() if k.count("/") == 1))
    return rows, summarize(rows)
