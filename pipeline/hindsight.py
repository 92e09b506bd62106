"""A Chain-of-Hindsight adapter's inference phrase, applied wherever heedful samples from it.

The coh stage trains replies that follow a feedback phrase ("A helpful answer:") and writes
`coh.json` beside the adapter: the positive phrase, and every phrase of the chain (`stop`). Asked
without its phrase the adapter answers unprompted, which it was not trained to do; and after its
reply it may go on to the next link of a chain ("An unhelpful answer: ..."). So every engine that
samples from an adapter -- the generate, simulate and c3po_data stages, evaluation, the LLM
client, `heedful serve` -- reads the phrase here (`adapter_phrase`), appends it to the prompt
rendered with its assistant turn open (`text`) and cuts the reply where a phrase begins (`cut`;
`answered_after` does both around an engine's call). It travels with the adapter (export copies
it), so a shipped CoH adapter is served as it was evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generation import Completion

COH_FILE = "coh.json"


@dataclass(frozen=True)
class Phrase:
    """What opens the assistant turn (`text`), and the phrases a reply is cut at (`stop`)."""

    text: str
    stop: tuple[str, ...] = ()

    def cut(self, reply: str) -> tuple[str, bool]:
        """(the reply up to the first stop phrase, stripped; whether one was found)."""
        at = min((i for i in (reply.find(s) for s in self.stop if s) if i >= 0), default=-1)
        return (reply[:at].strip(), True) if at >= 0 else (reply.strip(), False)


def answered_after(
    phrase: Phrase | None, sample: Callable[[str], list[list[Completion]]], tokenizer: Any
) -> list[list[Completion]]:
    """What every engine does with an adapter's phrase: `sample(prompt_suffix)` returns `Completion`
    records (pipeline.generation) per prompt; with a phrase the suffix is the phrase and each reply is
    cut at its stop phrases; without one, `sample("")` as it is.

    A reply cut at a phrase ended its answer: it counts as finished (as a stop string ends a served
    reply), with the tokens of the text kept (`tokenizer`), not of the chain it went on to. Else a
    finished-only filter, a truncation penalty or the unfinished rate would count it as cut off."""
    if phrase is None:
        return sample("")

    def kept(c: Completion) -> Completion:
        text, found = phrase.cut(c.text)
        if not found:
            return c
        return replace(c, text=text, num_tokens=len(tokenizer.encode(text, add_special_tokens=False)), finished=True)

    return [[kept(c) for c in samples] for samples in sample(phrase.text)]


def adapter_phrase(adapter: str | Path | None) -> Phrase | None:
    """The phrase a Chain-of-Hindsight adapter was trained to answer after; None for any other
    adapter (or none). A `coh.json` that is not an object with a text `phrase` is an error naming it."""
    if adapter is None:
        return None
    path = Path(adapter) / COH_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("phrase"), str):
        raise ValueError(f"{path}: field 'phrase' must be a string (the coh stage writes it)")
    stop = data.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"{path}: field 'stop' must be a list of strings")
    return Phrase(data["phrase"], tuple(s for s in stop if s))  # an empty stop would end every reply at once
