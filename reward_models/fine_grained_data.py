"""FineGrainedRLHF inputs: span feedback → per-segment labels, and the reward-model input in
which a label token follows each segment.

RM input (token ids): [specials] question: Q [context: C] answer: seg_1 M seg_2 M ... [specials]
where M is the mark token; the classifier's prediction at each M is that segment's label.
Putting M *after* the segment lets encoders and causal LMs alike see the whole segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.chat import split_prompt

from .segments import Segment, segment, segment_labels

#: span label (normalised: lower case, '-' for spaces/underscores) -> aspect
RELEVANCE_ERRORS = {"irrelevant", "redundant", "incoherent"}
FACTUALITY_ERRORS = {"wrong-grounding", "unverifiable", "inconsistent-fact", "factual-error"}
SPAN_ASPECTS = {
    # paper: sentences with only non-factual errors are ignored when training factuality
    "relevance": {"errors": RELEVANCE_ERRORS, "ignore": set()},
    "factuality": {"errors": FACTUALITY_ERRORS, "ignore": RELEVANCE_ERRORS},
}
IGNORE = -100


def normalise_label(label: str) -> str:
    return label.strip().lower().replace("_", "-").replace(" ", "-")


@dataclass
class SegmentExample:
    prompt: Any
    response: str
    segments: list[Segment]
    labels: list[int | None]  # 1 error, 0 fine, None ignored


def segment_examples(records, aspect: str, segmenter: str, min_span_words: int) -> list[SegmentExample]:
    """One example per response with at least one labelled segment (as in the paper)."""
    spec = SPAN_ASPECTS[aspect]
    out = []
    for r in records:
        segs = segment(r.response, segmenter)
        spans = [(s.start, s.end, normalise_label(s.label)) for s in r.spans]
        labels = segment_labels(r.response, segs, spans, spec["errors"], spec["ignore"], min_span_words, RELEVANCE_ERRORS)
        if segs and any(label is not None for label in labels):
            out.append(SegmentExample(r.prompt, r.response, segs, labels))
    return out


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer wraps around a text ([CLS] .. [SEP], BOS .., or none)."""
    inner = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for i in range(len(full) - len(inner) + 1):
        if full[i : i + len(inner)] == inner:
            return full[:i], full[i + len(inner) :]
    return [], []


def mark_token_id(tokenizer, mark: str | None) -> int:
    token = mark or tokenizer.sep_token or tokenizer.eos_token
    if token is None:
        raise ValueError("the reward model's tokenizer has no sep/eos token: set fine_grained.mark_token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"mark token {token!r} is not a single token of the reward model's vocabulary")
    return token_id


def encode_segments(
    tokenizer, prompt: Any, response: str, segments: list[Segment], mark_id: int, max_length: int, with_context: bool
) -> tuple[list[int], list[int]]:
    """(input ids, position of the mark after each segment). Context is truncated first; if the
    answer alone is too long, trailing segments are dropped (fewer positions than segments). A
    question longer than half of `max_length` keeps its first half's worth of tokens: a prompt
    that carries its passages inline would otherwise leave no room for a single segment."""
    question, context = split_prompt(prompt)
    prefix, suffix = special_affixes(tokenizer)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    head = ids(f"question: {question}")[: max_length // 2]
    answer_tag = ids(" answer:")
    budget = max_length - len(prefix) - len(suffix) - len(head) - len(answer_tag)
    pieces, used = [], 0
    for start, end in segments:
        piece = ids(" " + response[start:end]) + [mark_id]
        if used + len(piece) > budget:
            break
        pieces.append(piece)
        used += len(piece)
    context_ids = ids(f" context: {context}")[: max(0, budget - used)] if with_context and context else []
    body = head + context_ids + answer_tag
    marks, pos = [], len(prefix) + len(body)
    for piece in pieces:
        pos += len(piece)
        marks.append(pos - 1)
    return prefix + body + [t for piece in pieces for t in piece] + suffix, marks


def token_classification_rows(
    tokenizer, examples: list[SegmentExample], mark_id: int, max_length: int, with_context: bool
) -> list[dict[str, list[int]]]:
    rows = []
    for ex in examples:
        input_ids, marks = encode_segments(tokenizer, ex.prompt, ex.response, ex.segments, mark_id, max_length, with_context)
        labels = [IGNORE] * len(input_ids)
        for pos, label in zip(marks, ex.labels):
            if label is not None:
                labels[pos] = label
        if any(label != IGNORE for label in labels):
            rows.append({"input_ids": input_ids, "labels": labels})
    return rows
