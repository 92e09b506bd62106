"""Recurring critiques: the same verbal feedback given by several users becomes one C3PO feedback.

Why: C3PO learns one feedback at a time, and a critique only one user gave is one person's
taste (or an attack). A critique that *recurs*, worded a little differently by several
distinct users ("too long, be concise" / "Way too long. Be more concise!"), is a need of the
deployment. This module groups near-identical critiques, ranks the groups by distinct users and
names each group's representative wording; the `recurring_critique` stage of rank k writes the
k-th for `c3po_data`, and the loop (pipeline/loop.py) calls the same `group_critiques` and `ranked` on
the pulled rows to decide, before its train phase, how many critiques a `c3po from critiques` step
learns that round (each its own C3PO adapter, chained).

Similarity is lexical by default: normalised content words (case, punctuation, a few
stopwords and plural/adverb endings dropped), Jaccard of the word sets. It needs no model, so
the loop's decision is cheap and exact to repeat. `similarity: minilm` uses the MiniLM
sentence embedder of the server's memory (serving/embedder.py, cosine) when its wheel is
installed, for paraphrases that share few words; without the wheel it falls back to lexical
and says so in the group's `similarity` field.

Only critiques count (provenance `feedback: critique`, or records that do not say): a
clarification is what a user meant by one request (it goes to memory), not feedback on the
model's behaviour. Users are `provenance.annotator`; the pull's quarantine already dropped
records without a verified author.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STOPWORDS = frozenset(
    "a an the this that these those is are was were be been being it its i me my we you your he she they them "
    "and or but of to in on at for with as by from so very way just really much more quite please pls kindly "
    "should could would can will do does did have has had here there what which who".split()
)
_WORD = re.compile(r"[a-z0-9]+")


class CritiqueGrouping(BaseModel):
    """How critiques are grouped (the stage's settings and the loop's counting use the same)."""

    model_config = ConfigDict(extra="forbid")
    similarity: Literal["lexical", "minilm"] = Field(
        default="lexical", description="lexical: Jaccard of normalised content words; minilm: cosine of MiniLM embeddings"
    )
    threshold: float | None = Field(
        default=None, gt=0, le=1, description="same critique at or above this similarity (default: lexical 0.5, minilm 0.8)"
    )

    def cutoff(self) -> float:
        return self.threshold if self.threshold is not None else (0.5 if self.similarity == "lexical" else 0.8)


@dataclass
class CritiqueGroup:
    """Near-identical critiques: the records, their distinct users, the representative wording."""

    members: list[dict[str, Any]] = field(default_factory=list)
    representative: str = ""
    similarity: str = "lexical"

    @property
    def users(self) -> list[str]:
        return sorted({str(m["user"]) for m in self.members if m.get("user")})

    @property
    def ids(self) -> list[str]:
        return [str(m["id"]) for m in self.members]

    def summary(self) -> dict[str, Any]:
        return {
            "feedback": self.representative,
            "users": len(self.users),
            "records": len(self.members),
            "source_ids": self.ids,
            "wordings": sorted({m["critique"] for m in self.members}),
            "similarity": self.similarity,
        }


def content_words(text: str) -> frozenset[str]:
    """Lower-cased words without stopwords, plural -s and adverb -ly: 'Be more concise!' -> {concise}."""
    words = set()
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS:
            continue
        for ending in ("ly", "s"):
            if len(word) > 4 and word.endswith(ending) and not word.endswith("ss"):
                word = word[: -len(ending)]
        words.add(word)
    return frozenset(words)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def is_critique(row: dict[str, Any]) -> bool:
    """A verbal record that is a critique (not a clarification), with text."""
    provenance = row.get("provenance") or {}
    try:
        extra = json.loads(provenance.get("extra") or "{}") if isinstance(provenance, dict) else {}
    except ValueError:
        extra = {}
    return bool(str(row.get("critique") or "").strip()) and extra.get("feedback", "critique") == "critique"


def critique_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`{id, critique, user, prompt, response, created}` of each critique among verbal records."""
    out = []
    for row in rows:
        if not is_critique(row):
            continue
        provenance = row.get("provenance") or {}
        out.append(
            {
                "id": str(row["id"]),
                "critique": str(row["critique"]).strip(),
                "user": provenance.get("annotator"),
                "prompt": row.get("prompt"),
                "response": row.get("response"),
                "created": provenance.get("timestamp"),
                "record": row,
            }
        )
    return out


def similarity_matrix(texts: list[str], grouping: CritiqueGrouping) -> tuple[list[list[float]], str]:
    """Pairwise similarities of `texts` and the method that produced them."""
    if grouping.similarity == "minilm":
        try:
            from serving.embedder import EmbedderUnavailable, MiniLMEmbedder
        except ImportError:  # pragma: no cover - the serving extra is part of the project
            pass
        else:
            try:
                vectors = MiniLMEmbedder().encode(texts)
                return (vectors @ vectors.T).tolist(), "minilm"
            except EmbedderUnavailable:
                pass
    words = [content_words(t) for t in texts]
    return [[jaccard(a, b) for b in words] for a in words], "lexical"


def group_critiques(rows: list[dict[str, Any]], grouping: CritiqueGrouping | None = None) -> list[CritiqueGroup]:
    """Critiques (from `critique_rows`) in groups, largest first (by distinct users, then records).

    Average link, in arrival order: a critique joins the group whose members it is most similar
    to on average, if that is at or above the cutoff; else it starts a group. Average (not
    single) link keeps a chain of small drifts from merging different critiques.
    """
    grouping = grouping or CritiqueGrouping()
    if not rows:
        return []
    sims, method = similarity_matrix([r["critique"] for r in rows], grouping)
    cutoff = grouping.cutoff()
    members: list[list[int]] = []
    for i in range(len(rows)):
        scores = [sum(sims[i][j] for j in group) / len(group) for group in members]
        best = max(range(len(scores)), key=scores.__getitem__, default=None)
        if best is not None and scores[best] >= cutoff - 1e-9:
            members[best].append(i)
        else:
            members.append([i])
    groups = []
    for group in members:
        # the wording most similar to the others; ties: the one most users gave, then the earliest
        def centrality(i: int, group=group) -> tuple[float, int, int]:
            same = sum(rows[j]["critique"].lower() == rows[i]["critique"].lower() for j in group)
            return (sum(sims[i][j] for j in group if j != i), same, -i)

        representative = rows[max(group, key=centrality)]["critique"]
        groups.append(CritiqueGroup([rows[i] for i in group], representative, method))
    groups.sort(key=lambda g: (len(g.users), len(g.members)), reverse=True)
    return groups


def recurring(rows: list[dict[str, Any]], grouping: CritiqueGrouping | None = None) -> CritiqueGroup | None:
    """The largest group of critiques among verbal records (None without critiques)."""
    groups = group_critiques(critique_rows(rows), grouping)
    return groups[0] if groups else None


def recurring_users(rows: list[dict[str, Any]], grouping: CritiqueGrouping | None = None) -> int:
    """Distinct users behind the most recurrent critique: what a `c3po from critiques` step counts."""
    group = recurring(rows, grouping)
    return len(group.users) if group else 0


def ranked(groups: list[CritiqueGroup], min_users: int, limit: int | None = None) -> list[CritiqueGroup]:
    """The groups (of `group_critiques`, largest first) that at least `min_users` distinct users
    gave, most users first (then most records, then first given), at most `limit`. The loop counts
    them and the `recurring_critique` stage of rank k takes the k-th, both through this function,
    so the stages a round plans are the groups its stages find."""
    found = [g for g in groups if len(g.users) >= min_users]
    return found if limit is None else found[:limit]


# ----------------------------------------------------------------------------- scoped prompts for C3PO


def request_text(prompt: Any) -> str:
    """The request a reply answered: the last user turn of a served conversation (or the text)."""
    from pipeline.chat import last_user_text

    return last_user_text(prompt).strip() if prompt else ""


def scoped_prompts(group: CritiqueGroup, served: list[dict[str, Any]], near_scope: list[str] | None = None) -> list[dict]:
    """C3PO's prompts from the deployment itself: `{prompt, scope, category}` rows.

    in_scope: the requests whose replies got this critique. out_of_scope: the other requests in
    the pull (`served`: any records with a prompt), the ones the critique was not about.
    near_scope: `near_scope` when given (a generator wrote them, the better source); else the
    half of the other requests closest to the in-scope ones (most shared content words), a
    weak stand-in: related requests on which no user gave this critique. Each request appears
    once, in the first scope that claims it.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(text: str, scope: str, category: str) -> bool:
        key = " ".join(_WORD.findall(text.lower()))
        if not key or key in seen:
            return False
        seen.add(key)
        rows.append({"prompt": text, "scope": scope, "category": category})
        return True

    for member in group.members:
        add(request_text(member["prompt"]), "in_scope", "critiqued")
    in_words = [content_words(r["prompt"]) for r in rows]
    for text in near_scope or []:
        add(text.strip(), "near_scope", "generated")
    others = [text for text in dict.fromkeys(request_text(r.get("prompt")) for r in served) if text]
    others = [text for text in others if add(text, "out_of_scope", "served")]
    if near_scope is None and others:
        closeness = {t: max((jaccard(content_words(t), w) for w in in_words), default=0.0) for t in others}
        near = set(sorted(others, key=lambda t: -closeness[t])[: len(others) // 2])
        for row in rows:
            if row["prompt"] in near and row["scope"] == "out_of_scope":
                row.update(scope="near_scope", category="served, related")
    return rows
