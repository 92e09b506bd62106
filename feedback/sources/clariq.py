"""ClariQ (Aliannejadi et al. 2021): the user's yes/no answer to a clarifying question is a
real reaction to that system turn (yes -> love, no -> dislike, anything else -> neutral).
"""

from __future__ import annotations

from typing import Any

from pipeline.schema import Reaction

from .formats import provenance

_YES = ("yes", "yeah", "yep", "yup", "sure", "correct", "exactly", "right", "absolutely", "definitely", "of course")
_NO = ("no", "nope", "not", "neither", "none", "nothing", "nah", "never", "wrong")


def clariq_reactions(rows: list[dict[str, Any]], where: str) -> list[Reaction]:
    out = []
    for i, row in enumerate(rows):
        answer = (row.get("answer") or "").strip().lower()
        first = answer.split()[0].strip(",.!") if answer else ""
        reaction = "love" if first in _YES else "dislike" if first in _NO else "neutral"
        out.append(
            Reaction(
                id=f"clariq-{i}",
                prompt=row["initial_request"],
                response=row["question"],
                reaction=reaction,
                user_id=row.get("facet_id") or None,
                provenance=provenance("import", where, i, answer=row.get("answer")),
            )
        )
    return out
