"""C3PO's data library: the generator prompts that ask for scoped prompts and revisions,
list parsing, prompt ids, and the evaluation metric stored with c3po_data's rows.

Used by the `c3po_data` stage (which writes the rows), the `c3po` stage and
`evaluate_feedback` (which read the metric back). Imports no heavy library.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from trainers.feedback_eval import MetricSpec

TOPIC_PROMPT = (
    'Here is a piece of feedback a user gave an AI assistant:\n"{feedback}"\n\n'
    "In a few words, what kind of requests does this feedback apply to? Reply with the short phrase only."
)
CATEGORIES_PROMPT = (
    "Topic: {topic}\n\nList {count} broad but distinct categories of situations in which a user asks an AI assistant "
    "something that falls under this topic. Output a numbered list, one category per line, and nothing else."
)
IN_SCOPE_PROMPT = (
    "Topic: {topic}\nCategory: {category}\n\nWrite {count} different requests a user could send to an AI assistant. "
    "Each must clearly fall under the topic and the category, so that this feedback would apply to the reply: "
    '"{feedback}". Make each request specific and self-contained, 1-2 sentences. '
    "Output a numbered list, one request per line, and nothing else."
)
NEAR_SCOPE_PROMPT = (
    "Topic: {topic}\nCategory: {category}\n\nWrite {count} different requests a user could send to an AI assistant "
    "that are closely related to the category but fall OUTSIDE the topic, so that this feedback would NOT apply to the "
    'reply: "{feedback}". Make each request specific and self-contained, 1-2 sentences. '
    "Output a numbered list, one request per line, and nothing else."
)
OUT_OF_SCOPE_PROMPT = (
    "Write {count} different everyday requests a user could send to an AI assistant about {category}. "
    "Make each request specific and self-contained, 1-2 sentences. Output a numbered list, one request per line, and nothing else."
)
REVISE_PROMPT = (
    "Rewrite the reply below so that it follows the feedback. Keep everything else as it is. "
    "Output only the rewritten reply.\n\nFeedback: {feedback}\n\nRequest: {prompt}\n\nReply: {response}"
)
GENERAL_CATEGORIES = [
    "science",
    "history",
    "geography",
    "personal finance",
    "programming",
    "sports",
    "travel planning",
    "health and fitness",
    "music",
    "mathematics",
    "careers",
    "home repair",
]
_LIST_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*(.+?)\s*$")


def parse_list(text: str) -> list[str]:
    """Items of a numbered or bulleted list, quotes stripped; plain lines when there is no list."""
    items = [m.group(1) for line in text.splitlines() if (m := _LIST_ITEM.match(line))]
    if not items:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    return [item.strip().strip('"').strip() for item in items if len(item.strip().strip('"')) > 3]


def dedupe(items: list[str]) -> list[str]:
    seen, out = set(), []
    for item in items:
        key = re.sub(r"\W+", " ", item.lower()).strip()
        if key and key not in seen:
            seen.add(key)
            out.append(item)
    return out


def row_id(scope: str, prompt: str) -> str:
    return hashlib.sha1(f"{scope}\n{prompt}".encode()).hexdigest()[:12]


def metric_from_rows(rows: list[dict[str, Any]]) -> MetricSpec | None:
    """The metric c3po_data stored with its prompts (a JSON string column), if any."""
    for row in rows:
        if row.get("metric"):
            return MetricSpec.model_validate(json.loads(row["metric"]))
    return None


#: where a sentence ends: ., ! or ? (closing quotes/brackets allowed) before whitespace or the end,
#: or a line break (a list item or a heading is a whole unit too)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")
#: "3." at the start of a line numbers a list item: no sentence ends there
_LIST_MARKER = re.compile(r"\s*\d+\.")


def _line_before(text: str, end: int) -> str:
    return text[text.rfind("\n", 0, end - 1) + 1 : end]


def trim_to_last_sentence(text: str) -> str | None:
    """`text` cut back to its last complete sentence, or None when it has none.

    Why: a reply cut off at the sampling limit ends mid-sentence; a template revision of it (a
    suffix, a prefix) would teach a model to write replies that never end. Cut back to the last
    full sentence, the revision is a reply that ends, and the model can learn to stop after it.
    """
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if not _LIST_MARKER.fullmatch(_line_before(text, m.end()))]
    trimmed = text[: ends[-1]].rstrip() if ends else ""
    return trimmed or None


def leading_sentences(text: str, max_words: float) -> str | None:
    """The longest run of `text`'s leading whole sentences within `max_words` words, or None when
    even its first sentence is longer.

    Why: a length feedback ("answer in at most 30 words") has a mechanical revision a model can
    learn from without a generator LLM: the reply's own opening, cut at a sentence end. It ends,
    it is the model's own wording, and it keeps what a reply usually leads with: the answer.
    """
    best = None
    for m in _SENTENCE_END.finditer(text):
        if _LIST_MARKER.fullmatch(_line_before(text, m.end())):
            continue
        head = text[: m.end()].rstrip()
        if len(re.findall(r"\S+", head)) > max_words:
            break
        best = head or best
    return best


def learned_reply_finished(row: dict[str, Any]) -> bool:
    """Whether the reply a method learns to write from a c3po_data row ended within the sampling limit.

    In scope that is the revision (the baseline there is the rejected, undesirable side: a cut-off
    one teaches nothing about stopping); near and out of scope it is the baseline (C3PO's
    regularizer rows, KTO's desirable replies, SFT's targets)."""
    key = "revised_finished" if row.get("scope") == "in_scope" else "baseline_finished"
    return bool(row.get(key, True))


def template_revision(template: str, prompt: str, baseline: str, finished: bool, trim_cut_off: bool) -> tuple[str, bool]:
    """(revision, whether it ends): `template` ({response}, {prompt}) applied to the baseline.

    A template revision of a cut-off baseline is cut off too; with `trim_cut_off` the baseline is
    first cut back to its last whole sentence (`trim_to_last_sentence`), and then it ends."""
    if not finished and trim_cut_off and (whole := trim_to_last_sentence(baseline)) is not None:
        baseline, finished = whole, True
    return template.format(response=baseline, prompt=prompt), finished
