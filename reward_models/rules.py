"""Rule-based reward models: transparent, dense rewards written as code, not learned.

They follow the same protocol as learned models (`score(batch) -> Rewards`), so PPO, the
reward combiner and evaluation treat them alike. Uses: synthetic tasks whose optimum is
known (tests), guard rails next to learned models (a repetition penalty), and a real
objective on data without a trained model.

  token_class     +value at every response token of a class (token ids or a regex on the
                  token's text); scalar = the sum
  prompt_overlap  a relevance-like rule: +value where a content word of the prompt is
                  first mentioned, -repeat_penalty where a word trigram repeats; rewards
                  land on the token that completes the word, like fine-grained segment
                  rewards land on segment ends
  feedback_metric a feedback's own check (c3po_data's `metric`: starts_with, ends_with,
                  contains, regex, max_words, ...) as the reward, with partial credit for
                  the leading characters of a fixed phrase: for a feedback whose adherence
                  is a rule, the strongest reward PPO can have; on prompts the feedback is
                  not about (a c3po_data row's near/out-of-scope) following it costs instead
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from pipeline.chat import prompt_text

from .base import RewardBatch, Rewards, read_descriptor, register_kind, write_descriptor

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[a-z]+)?")
_STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being do does did "
    "what which who whom whose when where why how that this these those it its they them their there here "
    "you your we our i me my he she his her not no yes can could should would will shall may might must "
    "about into than then so such very more most some any each other answer two three sentences sentence "
    "explain describe give list name tell short has have had all one get got use used also just".split()
)


def token_char_ends(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """Decoded text of `ids` and, for each token, the character offset where it ends.

    Decodes growing prefixes so multi-byte characters split across tokens land on the
    token that completes them (n <= a few hundred tokens, so O(n^2) decoding is cheap).
    """
    ends, text = [], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        ends.append(len(text))
    return text, ends


def token_at_char(ends: list[int], char: int) -> int:
    """Index of the token whose text covers character `char`."""
    for k, end in enumerate(ends):
        if end > char:
            return k
    return len(ends) - 1


class _Rule:
    kind: ClassVar[str] = "rules"
    rule: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        write_descriptor(Path(path), self.kind, rule=self.rule, **self.params())

    def dense_for(self, prompt: Any, ids: list[int], tokenizer, scope: str | None = None) -> list[float]:
        """Per-token rewards of one reply; `scope` is its prompt's (RewardBatch.scopes), if known."""
        raise NotImplementedError

    def score(self, batch: RewardBatch) -> Rewards:
        import torch

        if batch.response_token_ids is None or batch.policy_tokenizer is None:
            raise ValueError(f"the {self.rule} rule needs response_token_ids and policy_tokenizer in the batch")
        scopes = batch.scopes or [None] * len(batch.prompts)
        rows = [
            self.dense_for(p, ids, batch.policy_tokenizer, scope)
            for p, ids, scope in zip(batch.prompts, batch.response_token_ids, scopes)
        ]
        width = max((len(r) for r in rows), default=0)
        dense = torch.zeros(len(rows), width)
        for b, row in enumerate(rows):
            dense[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return Rewards(scalar=dense.sum(1), dense=dense)


class TokenClassReward(_Rule):
    """+value for each response token in the class; -penalty for each one outside it."""

    rule = "token_class"

    def __init__(
        self,
        token_ids: list[int] | None = None,
        pattern: str | None = None,
        value: float = 1.0,
        penalty: float = 0.0,
        name: str = "token_class",
    ):
        if (token_ids is None) == (pattern is None):
            raise ValueError("token_class: give exactly one of token_ids or pattern")
        self.token_ids = sorted(set(token_ids)) if token_ids is not None else None
        self.pattern = pattern
        self._regex = re.compile(pattern) if pattern is not None else None
        self._ids = frozenset(self.token_ids or ())
        self.value, self.penalty, self.name = value, penalty, name
        self._cache: dict[int, bool] = {}

    def params(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "pattern": self.pattern,
            "value": self.value,
            "penalty": self.penalty,
            "name": self.name,
        }

    def member(self, token_id: int, tokenizer) -> bool:
        if self._regex is None:
            return token_id in self._ids
        if token_id not in self._cache:
            self._cache[token_id] = bool(self._regex.search(tokenizer.decode([token_id])))
        return self._cache[token_id]

    def dense_for(self, prompt, ids, tokenizer, scope=None) -> list[float]:
        return [self.value if self.member(t, tokenizer) else -self.penalty for t in ids]


class PromptOverlapReward(_Rule):
    """Relevance by rule: first mention of each prompt content word earns `value` at the token
    that completes it; each repeated word trigram costs `repeat_penalty` at its last token."""

    rule = "prompt_overlap"

    def __init__(self, value: float = 1.0, repeat_penalty: float = 0.5, min_word_length: int = 3, name: str = "prompt_overlap"):
        self.value, self.repeat_penalty, self.min_word_length, self.name = value, repeat_penalty, min_word_length, name

    def params(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "repeat_penalty": self.repeat_penalty,
            "min_word_length": self.min_word_length,
            "name": self.name,
        }

    def content_words(self, prompt: Any) -> set[str]:
        words = (w.lower() for w in _WORD.findall(prompt_text(prompt)))
        return {w for w in words if len(w) >= self.min_word_length and w not in _STOPWORDS}

    def dense_for(self, prompt, ids, tokenizer, scope=None) -> list[float]:
        rewards = [0.0] * len(ids)
        if not ids:
            return rewards
        text, ends = token_char_ends(tokenizer, ids)
        wanted, seen_trigrams = self.content_words(prompt), set()
        words = [(m.group().lower(), m.end()) for m in _WORD.finditer(text)]
        for i, (word, end) in enumerate(words):
            at = token_at_char(ends, end - 1)
            if word in wanted:
                rewards[at] += self.value
                wanted.discard(word)
            if i >= 2:
                trigram = (words[i - 2][0], words[i - 1][0], word)
                if trigram in seen_trigrams:
                    rewards[at] -= self.repeat_penalty
                seen_trigrams.add(trigram)
        return rewards


class FeedbackMetricReward(_Rule):
    """`value` for a reply the feedback's metric accepts (trainers/feedback_eval.py `applies`, the
    check the evaluation counts as adherence), `-penalty` for one it does not.

    Why partial credit: a small model almost never samples a whole fixed phrase it was not
    trained on, so an all-or-nothing reward is 0 on every rollout and PPO's advantages have
    nothing to follow. For a phrase (starts_with, ends_with, contains) a reply that has its
    first k characters, whole words of it (at the very start for starts_with, anywhere a word
    starts for the others; at least `min_chars`), earns `partial` x value x k / len(phrase)
    instead, on the token that completes them, so "Chef" at the start already pays a little
    toward "Chef's tip:" and "Cheese" nothing. Only a reply the metric accepts earns the full
    value: on the token completing the phrase for starts_with and contains, on the last token
    otherwise.

    Scoped (the default): on a near_scope or out_of_scope prompt (a c3po_data row's scope, where
    the feedback does not apply) a reply the metric accepts costs `value` instead, at the same
    token, and any other reply earns 0: PPO on every scope's prompts then learns where the
    feedback applies, the overgeneralization C3PO is about. Other prompts are in scope. For a
    length or word-count metric "accepts" means short, as the evaluation counts firing, so a
    reply cut off at the token limit escapes the cost: pair it with `missing_eos_penalty`."""

    rule = "feedback_metric"

    def __init__(
        self,
        metric: dict[str, Any] | str,
        value: float = 1.0,
        penalty: float = 0.0,
        partial: float = 0.5,
        min_chars: int = 3,
        scoped: bool = True,
        name: str = "feedback_metric",
    ):
        from trainers.feedback_eval import MetricSpec

        spec = MetricSpec.parse(metric) if isinstance(metric, str) else MetricSpec.model_validate(metric)
        if spec.kind == "judge":
            raise ValueError("feedback_metric: a judge metric is not a rule; train a reward model on its verdicts instead")
        if not 0 <= partial < 1:
            raise ValueError(f"feedback_metric: partial must be in [0, 1), got {partial}")
        self.metric, self.value, self.penalty, self.name = spec, value, penalty, name
        self.partial, self.min_chars, self.scoped = partial, min_chars, scoped

    def params(self) -> dict[str, Any]:
        return {
            "metric": self.metric.model_dump(mode="json", exclude_none=True),
            "value": self.value,
            "penalty": self.penalty,
            "partial": self.partial,
            "min_chars": self.min_chars,
            "scoped": self.scoped,
            "name": self.name,
        }

    def dense_for(self, prompt, ids, tokenizer, scope=None) -> list[float]:
        from trainers.feedback_eval import applies

        rewards = [0.0] * len(ids)
        if not ids:
            return rewards
        text, ends = token_char_ends(tokenizer, ids)
        kind = self.metric.kind
        phrase = str(self.metric.value) if kind in ("starts_with", "ends_with", "contains") else ""
        phrase = phrase if kind == "contains" else phrase.strip()  # as `applies` reads the value
        start, length = self.phrase_match(self.fold(text), self.fold(phrase)) if phrase else (0, 0)
        elsewhere = self.scoped and scope in ("near_scope", "out_of_scope")
        if applies(self.metric, text):
            if kind == "contains":  # the first occurrence, inside a word or not, as `applies` finds it
                start = self.fold(text).find(self.fold(phrase))
            found = kind in ("starts_with", "contains") and start >= 0
            at = token_at_char(ends, start + len(phrase) - 1) if found else len(ids) - 1
            rewards[at] += -self.value if elsewhere else self.value
        elif elsewhere:  # not following a feedback that does not apply is the reply wanted: no partial credit
            pass
        elif length >= min(self.min_chars, len(phrase)) and length > 0 and self.partial > 0:
            rewards[token_at_char(ends, start + length - 1)] += self.partial * self.value * length / len(phrase)
        else:
            rewards[-1] -= self.penalty
        return rewards

    def fold(self, text: str) -> str:
        """Lower case unless case-sensitive, one character for one (a few characters lower to two,
        which would shift every offset after them off the token ends)."""
        return text if self.metric.case_sensitive else "".join(c.lower()[:1] for c in text)

    def phrase_match(self, text: str, phrase: str) -> tuple[int, int]:
        """(where, how many) of the phrase's leading characters the reply has, in whole words of the
        phrase: at its start for starts_with (after leading spaces), else the longest leading part
        found anywhere a word starts (so "Che" of "Cheese" pays nothing toward "Chef's tip:")."""

        def word_end(k: int) -> bool:
            return k == len(phrase) or not (phrase[k].isalnum() and phrase[k - 1].isalnum())

        if self.metric.kind == "starts_with":
            lead = len(text) - len(text.lstrip())
            k = 0
            while k < min(len(phrase), len(text) - lead) and text[lead + k] == phrase[k]:
                k += 1
            while k > 0 and not word_end(k):
                k -= 1
            return lead, k
        for k in (k for k in range(len(phrase), 0, -1) if word_end(k)):
            where = text.find(phrase[:k])
            while where > 0 and text[where - 1].isalnum() and phrase[0].isalnum():
                where = text.find(phrase[:k], where + 1)
            if where >= 0:
                return where, k
        return 0, 0


RULES: dict[str, type[_Rule]] = {cls.rule: cls for cls in (TokenClassReward, PromptOverlapReward, FeedbackMetricReward)}


def build_rule(spec: dict[str, Any]) -> _Rule:
    """`{"rule": "token_class", ...params}` -> a rule reward model; errors name the bad key."""
    spec = dict(spec)
    name = spec.pop("rule", None)
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}: expected one of {', '.join(sorted(RULES))}")
    try:
        return RULES[name](**spec)
    except TypeError as exc:
        raise ValueError(f"rule '{name}': {exc}") from None


def load(path: Path) -> _Rule:
    info = read_descriptor(path)
    info.pop("kind", None)
    return build_rule(info)


register_kind("rules", load)
