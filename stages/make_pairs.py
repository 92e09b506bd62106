"""make_pairs: turn N sampled replies per prompt into preference pairs without a human.

The quickstart's stand-in for real feedback, and honest about it: a reply is scored by
how many of the prompt's reference `keywords` it mentions, minus a penalty for repeated
phrases and for being cut off. Later work (the simulator, reward models) produces
preference pairs from real or simulated feedback instead.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from pipeline.pairs import best_vs_worst
from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig


class MakePairsConfig(StageConfig):
    scorer: Literal["keywords"] = "keywords"
    strategy: Literal["best_worst", "all_pairs"] = "best_worst"
    min_margin: float = Field(default=0.1, ge=0, description="skip pairs whose scores differ less")
    repetition_weight: float = Field(default=0.5, ge=0)
    truncation_penalty: float = Field(default=0.2, ge=0)


def keyword_score(text: str, keywords: list[str], repetition_weight: float, truncation_penalty: float, finished: bool) -> float:
    """Recall of keywords ('a|b' = either) - weight * repeated-trigram rate - penalty if cut off."""
    lower = text.lower()
    hits = sum(any(alt.strip().lower() in lower for alt in kw.split("|")) for kw in keywords)
    recall = hits / len(keywords) if keywords else 0.0
    words = re.findall(r"\w+", lower)
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    score = recall - repetition_weight * repeated
    if not finished:
        score -= truncation_penalty
    if not words:
        score -= 1.0
    return round(score, 6)


class MakePairsStage(Stage):
    uses = "make_pairs"
    summary = "Heuristic preference pairs from sampled replies (keyword coverage)."
    Config = MakePairsConfig
    inputs = {"responses": Input(("responses",), doc="output of generate; prompts need a `keywords` list")}
    outputs = {"preferences": Output("preferences", doc="TRL conversational prompt/chosen/rejected")}

    def run(self):
        cfg: MakePairsConfig = self.config
        rows = load_rows(self.ctx.input("responses"), required=["prompt_id", "prompt", "response", "keywords"], what="responses")
        for row in rows:
            row["score"] = keyword_score(
                row["response"],
                list(row["keywords"] or []),
                cfg.repetition_weight,
                cfg.truncation_penalty,
                bool(row.get("finished", True)),
            )
        pairs = best_vs_worst(
            rows, "score", min_margin=cfg.min_margin, all_pairs=cfg.strategy == "all_pairs", source=f"heuristic:{cfg.scorer}"
        )
        groups = {row["prompt_id"] for row in rows}
        if not pairs:
            raise RuntimeError(
                f"no pair reached min_margin={cfg.min_margin} across {len(groups)} prompts; "
                "sample more replies per prompt or lower min_margin"
            )
        save_rows(pairs, self.ctx.output("preferences"))
        margins = [p["score_chosen"] - p["score_rejected"] for p in pairs]
        return {"prompts": len(groups), "pairs": len(pairs), "mean_margin": sum(margins) / len(margins)}
