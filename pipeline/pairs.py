"""One best-vs-worst pairing for every stage that turns scored replies into preferences
(`score`'s best-of-n, `make_pairs`'s heuristic pairs)."""

from __future__ import annotations

from typing import Any

from .chat import assistant, row_messages, row_prompt_id


def best_vs_worst(
    rows: list[dict[str, Any]],
    score: str,
    *,
    response_field: str = "response",
    prompt_field: str = "prompt",
    min_margin: float = 0.0,
    all_pairs: bool = False,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Preference pairs from scored replies, grouped by prompt id: the best against the worst
    reply of each prompt (or, with `all_pairs`, every higher- against every lower-ranked one).
    Ties keep the sampling order (`sample_index`); pairs below `min_margin` or with the same
    text are skipped. Each pair is TRL conversational prompt/chosen/rejected plus `prompt_id`,
    `score_chosen`, `score_rejected` and the `extra` fields."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get("prompt_id") or row_prompt_id(row, prompt_field)), []).append(row)
    pairs = []
    for pid, group in groups.items():
        ranked = sorted(group, key=lambda r: (-r[score], r.get("sample_index", 0)))
        candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :]] if all_pairs else [(ranked[0], ranked[-1])]
        for good, bad in candidates:
            if len(group) < 2 or good[score] - bad[score] < min_margin or good[response_field] == bad[response_field]:
                continue
            pairs.append(
                {
                    "prompt": row_messages(good, prompt_field),
                    "chosen": assistant(str(good[response_field])),
                    "rejected": assistant(str(bad[response_field])),
                    "prompt_id": pid,
                    "score_chosen": good[score],
                    "score_rejected": bad[score],
                    **extra,
                }
            )
    return pairs
