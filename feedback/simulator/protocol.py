"""The ConvSim conversation protocol, batched across conversations.

A round is one system turn and the simulated user's reply to it:
  user asks (question) -> policy answers (response) or asks (clarifying_question)
  -> the user answers the question from the information need (answer), or judges the
     response: satisfied -> thanks (feedback, satisfied) and stop; else specific feedback
  -> the policy revises with the whole conversation in view -> ...
The conversation stops when the user is satisfied or after `max_rounds` rounds. Every
step runs for all open conversations at once, so the LLMs see full batches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.chat import Messages
from pipeline.generation import SamplingSettings
from pipeline.llm import LLMSettings
from pipeline.llm_cache import CachedLLM

from . import prompts

Participant = Literal["user", "system"]
UtteranceType = Literal["question", "answer", "clarifying_question", "feedback", "response"]


#: the simulated users' LLM when `simulator.model` is not given
SIMULATOR_MODEL = "smollm2-135m"


class ProtocolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    simulator: LLMSettings = Field(
        default_factory=lambda: LLMSettings(model=SIMULATOR_MODEL),
        description=f"the users' LLM (pipeline.llm: kind hf or openai); model default {SIMULATOR_MODEL}",
    )
    max_rounds: int = Field(default=3, ge=1, description="system turns per conversation at most")
    max_clarifications: int = Field(
        default=1, ge=0, description="clarifying questions the user answers; later ones are judged as replies"
    )
    judge: Literal["both", "verbal", "likelihood"] = Field(
        default="both", description="signals of satisfaction: the simulator's Yes/No, its likelihood of the reply, or both"
    )
    satisfied_threshold: float = Field(
        default=0.5, ge=0, le=1, description="calibrated satisfaction at which the user is satisfied (0.5 = the calibrated cut)"
    )
    neutral_band: float = Field(default=0.5, ge=0, description="logits below the threshold still counted neutral, not dislike")
    min_fact_coverage: float = Field(
        default=0.5, ge=0, le=1, description="share of the need's known facts a reply must mention (when the need lists facts)"
    )
    feedback_on_last_round: bool = Field(default=True, description="also give feedback on the final reply (no revision follows)")
    policy_sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(max_new_tokens=96, temperature=0.7))
    user_sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings(max_new_tokens=40, temperature=0.7))

    def most_new_tokens(self, conversations: int) -> tuple[int, int]:
        """The most new tokens `conversations` can ask of the policy and of the simulated users (a
        turn each per round): the job size a client weighs against the engine probe's cost
        (pipeline/engine_probe.py `PROBE_PAYS_FROM`) before it measures which engine is faster."""
        turns = conversations * self.max_rounds
        return turns * self.policy_sampling.max_new_tokens, turns * self.user_sampling.max_new_tokens

    @field_validator("simulator")
    @classmethod
    def _default_model(cls, value: LLMSettings) -> LLMSettings:
        return value if value.model else value.model_copy(update={"model": SIMULATOR_MODEL})


@dataclass
class SimulatedUser:
    """An information need, how the user first asked for it, and who they are."""

    id: str
    need: str
    request: str
    persona: str = ""
    style: str = ""
    system_prompt: str | None = None  # the policy's system prompt for this conversation ("" = none)
    first_reply: str | None = None  # the policy's first reply when it was sampled upstream
    facts: list[str] = field(default_factory=list)  # what a satisfying reply mentions ('a|b' = either), if known


@dataclass
class Utterance:
    participant: Participant
    type: UtteranceType
    text: str
    round: int
    satisfaction: float | None = None  # the user's calibrated satisfaction with a response, (0, 1)
    satisfied: bool | None = None
    fact_coverage: float | None = None  # share of the need's known facts the response mentions


@dataclass
class Transcript:
    user: SimulatedUser
    utterances: list[Utterance] = field(default_factory=list)
    satisfied: bool = False
    done: bool = False
    clarifications: int = 0

    @property
    def rounds(self) -> int:
        return sum(u.participant == "system" for u in self.utterances)

    def to_row(self) -> dict:
        return {
            "conversation_id": self.user.id,
            "need": self.user.need,
            "request": self.user.request,
            "persona": self.user.persona,
            "style": self.user.style,
            "utterances": [asdict(u) for u in self.utterances],
            "satisfied": self.satisfied,
            "rounds": self.rounds,
        }


_GENERIC_OFFER = re.compile(
    r"^(is there anything|anything else|do you have any other|can i help|would you like (any|more) help)", re.I
)


def is_clarifying_question(text: str) -> bool:
    """A short reply that opens with a question (not a closing 'anything else?') asks for clarification."""
    text = text.strip()
    if not text or len(text.split()) > 40:
        return False
    first = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[0]
    return first.endswith("?") and not _GENERIC_OFFER.match(first)


def policy_messages(transcript: Transcript) -> list[dict[str, str]]:
    """The conversation as the policy sees it: user turns as user, its own turns as assistant."""
    system = transcript.user.system_prompt
    messages = [{"role": "system", "content": system}] if system else []
    for u in transcript.utterances:
        messages.append({"role": "user" if u.participant == "user" else "assistant", "content": u.text})
    return messages


def best_threshold(scores: list[float], labels: list[bool]) -> tuple[float, float]:
    """The cut on `scores` that classifies `labels` best (ties: nearest the middle of the range); returns
    (threshold, accuracy)."""
    ordered = sorted(set(scores))
    candidates = [(a + b) / 2 for a, b in zip(ordered, ordered[1:])] + [ordered[0] - 1e-6, ordered[-1] + 1e-6]

    def accuracy(t: float) -> float:
        return sum((s >= t) == y for s, y in zip(scores, labels)) / len(labels)

    middle = (ordered[0] + ordered[-1]) / 2
    best = max(candidates, key=lambda t: (accuracy(t), -abs(t - middle)))
    return float(best), accuracy(best)


class Judge:
    """The simulated user's satisfaction with a reply, in (0, 1), calibrated on labelled replies.

    Two signals from the simulator LLM:
      verbal      logit P(Yes) when asked "Satisfied?" with a few examples
      likelihood  mean log-probability of the reply given the need and the request (local models)
    Each is z-scored with the calibration replies' statistics and summed; satisfaction is
    sigmoid((score - cut) / spread), where `cut` best separates the calibration labels. Small
    models put every P(Yes) in a narrow band (0.1-0.5 for SmolLM2-135M) and rank poorly by it
    alone; the likelihood carries most of their signal, the verbal judgment most of a large one's.
    """

    def __init__(self, simulator: CachedLLM, mode: str = "both"):
        self.simulator = simulator
        if mode == "likelihood" and not simulator.has_likelihood:
            raise ValueError(f"judge: likelihood needs a local model; {simulator.identity} has no log-probabilities of replies")
        if mode == "verbal" or not simulator.has_likelihood:
            self.kinds: tuple[str, ...] = ("verbal",)
        else:
            self.kinds = ("likelihood",) if mode == "likelihood" else ("verbal", "likelihood")
        self.stats: dict[str, tuple[float, float]] = {}
        self.cut, self.spread, self.accuracy = 0.0, 1.0, float("nan")

    def features(self, items: list[tuple[str, str, str]], salts: list[str]) -> dict[str, list[float]]:
        """items: (need, request, reply)."""
        out: dict[str, list[float]] = {}
        if "verbal" in self.kinds:
            probs = self.simulator.yes_probability(
                [prompts.judge_messages(*item) for item in items], salts=[f"{s}:verbal" for s in salts]
            )
            out["verbal"] = [_logit(p) for p in probs]
        if "likelihood" in self.kinds:
            out["likelihood"] = self.simulator.reply_logprob(
                [prompts.expectation_context(need, request) for need, request, _ in items],
                [r for *_, r in items],
                salts=[f"{s}:likelihood" for s in salts],
            )
        return out

    def _scores(self, feats: dict[str, list[float]]) -> list[float]:
        n = len(next(iter(feats.values())))
        return [sum((feats[k][i] - self.stats[k][0]) / self.stats[k][1] for k in self.kinds) for i in range(n)]

    def calibrate(self) -> Judge:
        items = [(n, r, a) for n, r, a, _ in prompts.CALIBRATION]
        labels = [label for *_, label in prompts.CALIBRATION]
        feats = self.features(items, [f"calibration:{i}" for i in range(len(items))])
        for kind, values in feats.items():
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
            self.stats[kind] = (mean, std or 1.0)
        scores = self._scores(feats)
        self.cut, self.accuracy = best_threshold(scores, labels)
        spread = (sum((x - sum(scores) / len(scores)) ** 2 for x in scores) / len(scores)) ** 0.5
        self.spread = spread / 2 or 1.0
        return self

    def satisfaction(self, items: list[tuple[str, str, str]], salts: list[str]) -> list[float]:
        if not self.stats:
            raise RuntimeError("Judge.calibrate() first")
        scores = self._scores(self.features(items, salts))
        return [min(max(1 / (1 + math.exp(-(x - self.cut) / self.spread)), 1e-6), 1 - 1e-6) for x in scores]


#: a thousands separator: a comma between digits with exactly three digits after it ("1,000,000")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def fact_coverage(text: str, facts: list[str]) -> float | None:
    """Share of facts mentioned as whole words (case-insensitive; 'a|b' = either); None when the
    need lists none.

    Numbers match as whole numbers: '9' is not in '19', '100' is not in '1000', '2100', '100.2'
    or '0.100' (nor '5' in '1,5'), but is in '100.' and '100,' at the end of a sentence or
    clause. A negative number is another number: '273' is not in '-273.15' (nor after '−'), but
    is in a range's end, '200-273' (a letter before the hyphen makes it a name: not 'U-235').
    Thousands separators do not count ('1,000' is '1000', in the text and in the fact), so a
    reply that writes 1,000 covers the fact 1000 and not the fact 1 or 000."""
    if not facts:
        return None
    lower = _THOUSANDS.sub("", text.lower())

    def mentioned(alt: str) -> bool:
        alt = _THOUSANDS.sub("", alt.strip().lower())
        before = r"(?<!\w)" + (r"(?<!\d[.,])(?<!(?<!\d)[-−–])" if alt[:1].isdigit() else "")
        after = r"(?!\w)" + (r"(?![.,]\d)" if alt[-1:].isdigit() else "")
        return re.search(before + re.escape(alt) + after, lower) is not None

    return sum(any(mentioned(alt) for alt in fact.split("|") if alt.strip()) for fact in facts) / len(facts)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def reaction_for(satisfaction: float, threshold: float, neutral_band: float, satisfied: bool | None = None) -> str:
    """love when satisfied; neutral just below the threshold (or above it with facts missing); dislike further below."""
    if satisfaction >= threshold:
        return "love" if satisfied in (None, True) else "neutral"
    return "neutral" if _logit(satisfaction) > _logit(threshold) - neutral_band else "dislike"


def clean_user_text(text: str, limit_words: int = 40) -> str:
    """First line, at most two sentences: small models ramble on and start new turns."""
    text = text.strip().split("\n")[0].strip().strip('"').strip()
    sentences = re.split(r"(?<=[.!?])\s+", text)
    text = " ".join(sentences[:2])
    words = text.split()
    return " ".join(words[:limit_words])


#: a small model sometimes words its negative feedback as approval; the judgment decides, so those are replaced
_POSITIVE_OPENINGS = (
    "thank",
    "great",
    "perfect",
    "that's correct",
    "that is correct",
    "that's right",
    "that is right",
    "that's exactly",
    "that is exactly",
    "correct",
    "yes",
)


def _fallback_feedback(need: str) -> str:
    return f"That is not what I need. I want {need.rstrip('.')}."


@dataclass
class Side:
    """One way of answering in conversations run side by side (`run_sides`): its own copies of the
    users (the policy's system prompt is the side's), the policy that writes its turns, and
    `weights`, the context those turns are generated in (an evaluated adapter switched on or off
    on a loaded model). Sides with the same policy and the same `weights` object have their turns
    written in one call.

    `adapter`: on a policy whose `generate` takes per-row adapters (the loaded PEFT model's HF
    client), the adapter this side's turns are written with (`BASE_ROWS`: off), instead of
    `weights`: sides with the same policy then share one call whatever their adapters (PEFT's
    mixed-batch LoRA), as conditions on a CPU gain from (docs/generation.md)."""

    users: list[SimulatedUser]
    policy: CachedLLM
    weights: Callable[[], AbstractContextManager[Any]] = nullcontext
    adapter: str | None = None


def run_conversations(
    users: list[SimulatedUser],
    policy: CachedLLM,
    simulator: CachedLLM,
    settings: ProtocolSettings,
    seed: int,
    judge: Judge,
    on_round: Callable[[int, int, int], None] | None = None,
) -> list[Transcript]:
    """Simulate every conversation to its stop; `on_round(round, open, total)` reports progress."""
    return run_sides([Side(users, policy)], simulator, settings, seed, judge, on_round)[0]


def run_sides(
    sides: list[Side],
    simulator: CachedLLM,
    settings: ProtocolSettings,
    seed: int,
    judge: Judge,
    on_round: Callable[[int, int, int], None] | None = None,
) -> list[list[Transcript]]:
    """Every side's conversations, round by round together: each side's policy writes its turns
    (in its `weights`), then the simulated users answer, judge and give feedback in one call for
    all sides. One transcript list per side, in its users' order.

    Why together: an evaluation compares several conditions on the same held-out users, and the
    users' simulator is the same model for all of them. One call with every condition's rows costs
    less than one call per condition: 8 simulated users' feedback took 1.4x the time of 4 (SmolLM2
    on CTranslate2, one thread), not 2x; and the judge's shared instructions run once per round
    instead of once per condition. With one side the calls are the ones a side alone makes."""
    transcripts = [[Transcript(u, [Utterance("user", "question", u.request, 0)]) for u in side.users] for side in sides]
    total = sum(len(ts) for ts in transcripts)
    for rnd in range(1, settings.max_rounds + 1):
        open_by_side = [[t for t in ts if not t.done] for ts in transcripts]
        open_ = [t for ts in open_by_side for t in ts]
        if not open_:
            break
        if on_round:
            on_round(rnd, len(open_), total)
        # -- system turn: given first replies, or each policy generates (batched; sides that share a
        # policy and its weights in one call)
        texts = {id(t): t.user.first_reply or "" for t in open_ if rnd == 1 and t.user.first_reply is not None}
        calls: dict[tuple[int, int], tuple[Side, list[tuple[Transcript, str | None]]]] = {}
        for side, mine in zip(sides, open_by_side):
            pending = [(t, side.adapter) for t in mine if id(t) not in texts]
            if side.adapter is not None and side.weights is not nullcontext:
                raise ValueError("a side with a per-row adapter writes in the policy's own weights: leave `weights` unset")
            if pending:
                call = (id(side.policy), -1 if side.adapter is not None else id(side.weights))
                calls.setdefault(call, (side, []))[1].extend(pending)
        for side, rows in calls.values():
            asked = [t for t, _ in rows]
            per_row = {"adapters": [str(adapter) for _, adapter in rows]} if side.adapter is not None else {}
            with side.weights():
                replies = side.policy.generate(
                    [policy_messages(t) for t in asked],
                    settings.policy_sampling,
                    seed=seed + 1000 * rnd,
                    salts=[f"{t.user.id}:policy:{rnd}" for t in asked],
                    **per_row,
                )
            texts.update({id(t): r.text for t, r in zip(asked, replies)})
        for t in open_:
            text = texts[id(t)]
            asks = is_clarifying_question(text) and t.clarifications < settings.max_clarifications
            t.utterances.append(Utterance("system", "clarifying_question" if asks else "response", text, rnd))
            t.clarifications += asks
        _users_turn(open_, rnd, simulator, settings, seed, judge)
        if rnd == settings.max_rounds:
            for t in open_:
                t.done = True
    return transcripts


def _users_turn(
    open_: list[Transcript], rnd: int, simulator: CachedLLM, settings: ProtocolSettings, seed: int, judge: Judge
) -> None:
    """The users' side of round `rnd` for the open conversations: answer the clarifying questions
    from the need; judge the responses, thanks when satisfied, else specific feedback."""
    asked = [t for t in open_ if t.utterances[-1].type == "clarifying_question"]
    if asked:
        answers = _users_say(asked, prompts.answer_messages, "answer", seed + 1000 * rnd + 1, rnd, simulator, settings)
        for t, a in zip(asked, answers):
            text = clean_user_text(a) or f"I want {t.user.need.rstrip('.')}."
            t.utterances.append(Utterance("user", "answer", text, rnd))

    judged = [t for t in open_ if t.utterances[-1].type == "response"]
    if not judged:
        return
    scores = judge.satisfaction(
        [(t.user.need, t.user.request, t.utterances[-1].text) for t in judged],
        salts=[f"{t.user.id}:judge:{rnd}" for t in judged],
    )
    unhappy = []
    for t, p in zip(judged, scores):
        reply = t.utterances[-1]
        coverage = fact_coverage(reply.text, t.user.facts)
        reply.satisfaction, reply.fact_coverage = p, coverage
        reply.satisfied = p >= settings.satisfied_threshold and (coverage is None or coverage >= settings.min_fact_coverage)
        if reply.satisfied:
            thanks = prompts.THANKS.get(t.user.style, prompts.THANKS[""])
            t.utterances.append(Utterance("user", "feedback", thanks, rnd, p, True))
            t.satisfied = t.done = True
        elif rnd < settings.max_rounds or settings.feedback_on_last_round:
            unhappy.append(t)
    if not unhappy:
        return
    notes = _users_say(unhappy, prompts.feedback_messages, "feedback", seed + 1000 * rnd + 2, rnd, simulator, settings)
    for t, note in zip(unhappy, notes):
        text = clean_user_text(note)
        if not text or text.lower().startswith(_POSITIVE_OPENINGS):
            text = _fallback_feedback(t.user.need)  # the judgment decides satisfaction, not the wording
        t.utterances.append(Utterance("user", "feedback", text, rnd, t.utterances[-1].satisfaction, False))


def _users_say(
    ts: list[Transcript],
    messages: Callable[..., Messages],
    purpose: str,
    seed: int,
    rnd: int,
    simulator: CachedLLM,
    settings: ProtocolSettings,
) -> list[str]:
    """What each user says to the system's last turn, from `messages(need, request, turn, persona,
    style)`: one sampled call for all of them, each salted with its user, purpose and round."""
    asked = [messages(t.user.need, t.user.request, t.utterances[-1].text, t.user.persona, t.user.style) for t in ts]
    salts = [f"{t.user.id}:{purpose}:{rnd}" for t in ts]
    return [c.text for c in simulator.generate(asked, settings.user_sampling, seed=seed, salts=salts)]
