"""Segmenters, span → segment labels, and segment ends → policy token positions.

Fine-grained rewards are given per segment (sentence, sub-sentence, ...) and written at the
policy token that ends the segment. Everything here works on character offsets of the
response, so the reward model's tokenizer and the policy's tokenizer never need to agree.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet

Segment = tuple[int, int]  # [start, end) character offsets, no surrounding whitespace

_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "st",
    "jr",
    "sr",
    "vs",
    "etc",
    "inc",
    "ltd",
    "co",
    "no",
    "vol",
    "fig",
    "e.g",
    "i.e",
    "u.s",
    "u.k",
    "a.m",
    "p.m",
    "approx",
    "est",
    "gen",
    "col",
    "lt",
    "sgt",
    "rev",
    "mt",
    "ft",
}
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s+|$)")
_WORD = re.compile(r"\S+")


def _strip(text: str, start: int, end: int) -> Segment | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def split_sentences(text: str) -> list[Segment]:
    """Sentences by punctuation + whitespace, skipping abbreviations, initials and decimals."""
    segments, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        word = text[: match.start()].rsplit(None, 1)[-1] if text[: match.start()].strip() else ""
        token = (word + text[match.start() : match.end()]).rstrip(".!?\"'”’)]").lower()
        nxt = text[end:].lstrip()[:1]
        if text[match.start()] == "." and (token in _ABBREVIATIONS or re.fullmatch(r"[a-z]", token)):
            continue  # "Dr. Smith", "J. K. Rowling"
        if nxt and not (nxt.isupper() or nxt.isdigit() or nxt in "\"'“‘(["):
            continue  # "3.5 km", "e.g. this" -- a sentence must start like one
        if (seg := _strip(text, start, end)) is not None:
            segments.append(seg)
        start = end
    if (seg := _strip(text, start, len(text))) is not None:
        segments.append(seg)
    return segments


def split_subsentences(text: str, min_words: int = 5) -> list[Segment]:
    """FineGrainedRLHF's sub-sentences: inside each sentence, a piece ends at a word ending in
    , ; ! or ? when at least `min_words` words follow; a piece shorter than `min_words` is
    merged into the piece before it."""
    out: list[Segment] = []
    for s_start, s_end in split_sentences(text):
        words = [(m.start() + s_start, m.end() + s_start) for m in _WORD.finditer(text[s_start:s_end])]
        starts = [0]
        for i in range(1, len(words)):
            prev_word = text[words[i - 1][0] : words[i - 1][1]]
            if prev_word[-1] not in ",;!?" or i + min_words >= len(words):
                continue
            if i - starts[-1] >= min_words:
                starts.append(i)
            elif starts[-1] > 0:
                starts[-1] = i  # the short piece joins the one before it
        for j, first in enumerate(starts):
            last = (starts[j + 1] if j + 1 < len(starts) else len(words)) - 1
            out.append((words[first][0], words[last][1]))
    return out


def split_lines(text: str) -> list[Segment]:
    segments, pos = [], 0
    for line in text.splitlines(keepends=True):
        if (seg := _strip(text, pos, pos + len(line))) is not None:
            segments.append(seg)
        pos += len(line)
    return segments


def whole(text: str) -> list[Segment]:
    seg = _strip(text, 0, len(text))
    return [seg] if seg else []


SEGMENTERS: dict[str, Callable[[str], list[Segment]]] = {
    "sentence": split_sentences,
    "subsentence": split_subsentences,
    "newline": split_lines,
    "whole": whole,
}


def segment(text: str, segmenter: str) -> list[Segment]:
    try:
        return SEGMENTERS[segmenter](text)
    except KeyError:
        raise ValueError(f"unknown segmenter '{segmenter}': expected one of {', '.join(SEGMENTERS)}") from None


# ----------------------------------------------------------------------------- labels from spans


def segment_labels(
    text: str,
    segments: Sequence[Segment],
    spans: Iterable[tuple[int, int, str]],
    error_types: set[str],
    ignore_types: AbstractSet[str] = frozenset(),
    min_span_words: int = 0,
    short_span_types: AbstractSet[str] = frozenset(),
) -> list[int | None]:
    """1 = the segment overlaps an error span of `error_types`, 0 = clean, None = ignore.

    A segment that only overlaps spans of `ignore_types` is ignored (the paper ignores
    sentences with non-factual errors when training the factuality RM). Spans of
    `short_span_types` with fewer than `min_span_words` words are dropped (paper App. D)."""
    kept = []
    for start, end, label in spans:
        if label in short_span_types and len(text[start:end].split()) < min_span_words:
            continue
        if label in error_types or label in ignore_types:
            kept.append((start, end, label))
    labels: list[int | None] = []
    for s_start, s_end in segments:
        hits = {label for start, end, label in kept if _overlaps_text(text, max(start, s_start), min(end, s_end))}
        if hits & error_types:
            labels.append(1)
        elif hits & ignore_types:
            labels.append(None)
        else:
            labels.append(0)
    return labels


def _overlaps_text(text: str, start: int, end: int) -> bool:
    return end > start and not text[start:end].isspace()


# ----------------------------------------------------------------------------- policy alignment


def token_char_ends(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[int]]:
    """The text the policy tokens spell and, per token, the character offset where it ends.

    Uses the fast tokenizer's offsets when re-encoding the decoded text gives the same ids,
    else decodes prefix by prefix (always right, O(T^2) characters)."""
    ids = [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    content = [i for i, t in enumerate(ids) if t not in special]
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == [ids[i] for i in content]:
            ends: list[int] = []
            k = 0
            offsets = enc["offset_mapping"]
            for _i, t in enumerate(ids):
                if t in special:
                    ends.append(ends[-1] if ends else 0)
                else:
                    ends.append(int(offsets[k][1]))
                    k += 1
            return text, _monotone(ends)
    except (NotImplementedError, TypeError, ValueError):
        pass  # slow tokenizers have no offsets
    ends = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    return text, _monotone(ends)


def _monotone(ends: list[int]) -> list[int]:
    out, best = [], 0
    for e in ends:
        best = max(best, e)
        out.append(best)
    return out


def end_token_index(char_ends: Sequence[int], char_end: int) -> int:
    """Index of the first token whose text reaches `char_end` (the token that ends a segment)."""
    if not char_ends:
        raise ValueError("no policy tokens")
    return min(bisect.bisect_left(char_ends, char_end), len(char_ends) - 1)
