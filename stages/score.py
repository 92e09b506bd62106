"""score: add reward columns to sampled responses; optionally best-of-n preference pairs.

Rejection sampling in two stages: `generate` N replies per prompt, `score` them with a trained
reward model (or a `module:function`), keep `best_vs_worst` pairs for DPO or filter on the
`reward` column. With `suggest`, each row also carries an Argilla `suggestions` column
(e.g. a P[Love]-based love/dislike pre-annotation) that `argilla_push` uploads as suggestions.
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from pipeline.chat import row_messages
from pipeline.pairs import best_vs_worst
from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig


class SuggestSettings(StageConfig):
    """Turn the reward into a pre-annotation for an Argilla label question."""

    question: str = Field(default="reaction", description="Argilla question the suggestion answers")
    threshold: float = Field(default=0.5, description="reward >= threshold -> `above`, else `below`")
    above: str = "love"
    below: str = "dislike"


class ScoreConfig(StageConfig):
    column: str = Field(default="reward", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of the added reward column")
    function: str | None = Field(default=None, description="module:function reward instead of a reward_model input")
    prompt_field: str = "prompt"
    response_field: str = "response"
    batch_size: int = Field(default=16, ge=1)
    best_of_n: bool = Field(default=True, description="also write best-vs-worst pairs per prompt_id")
    min_margin: float = Field(default=0.0, ge=0, description="skip pairs whose rewards differ less")
    suggest: SuggestSettings | None = Field(default=None, description="add an Argilla `suggestions` column from the reward")
    device: str | None = None

    @model_validator(mode="after")
    def _column_not_reserved(self):
        if self.column in (self.prompt_field, self.response_field):
            raise ValueError(f"column '{self.column}' would overwrite an input field")
        return self


def suggestion(reward: float, cfg: SuggestSettings, agent: str) -> dict:
    """{question: {value, score, agent}}; the score (Argilla wants [0, 1]) only for probabilities."""
    value = cfg.above if reward >= cfg.threshold else cfg.below
    item: dict[str, str | float] = {"value": value, "agent": agent}
    if 0.0 <= reward <= 1.0:
        item["score"] = reward if value == cfg.above else 1.0 - reward
    return {cfg.question: item}


class ScoreStage(Stage):
    uses = "score"
    summary = "Reward columns for sampled responses (+ best-of-n pairs) from a reward model."
    Config = ScoreConfig
    inputs = {
        "responses": Input(("responses",), doc="rows with prompt and response (e.g. generate's output)"),
        "reward_model": Input(("reward_model",), required=False, doc="train_reward output (or set `function`)"),
    }
    outputs = {
        "responses": Output("responses", doc="the input rows plus the reward column and per-aspect columns"),
        "preferences": Output("preferences", required=False, doc="best vs worst reply per prompt_id (best_of_n)"),
    }
    non_semantic_fields = frozenset({"batch_size", "device"})

    def run(self):
        from pipeline.progress import track
        from reward_models.base import RewardBatch, load_reward_model
        from reward_models.function import FunctionReward

        cfg: ScoreConfig = self.config
        path = self.ctx.input("reward_model")
        if (path is None) == (cfg.function is None):
            raise ValueError("score needs exactly one of: a reward_model input, or `function: module:function`")
        rm = FunctionReward(cfg.function) if cfg.function else load_reward_model(path)
        rows = load_rows(self.ctx.input("responses"), required=[cfg.prompt_field, cfg.response_field], what="responses")
        chunks = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        for chunk in track(chunks, desc=f"{self.ctx.name}: scoring"):
            out = rm.score(
                RewardBatch([row_messages(r, cfg.prompt_field) for r in chunk], [str(r[cfg.response_field]) for r in chunk])
            )
            for i, row in enumerate(chunk):
                row[cfg.column] = float(out.scalar[i])
                for name, values in out.components.items():
                    row[f"{cfg.column}_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}"] = float(values[i])
                if cfg.suggest is not None:
                    row["suggestions"] = {
                        **(row.get("suggestions") or {}),
                        **suggestion(row[cfg.column], cfg.suggest, f"heedful:{getattr(rm, 'kind', 'reward')}"),
                    }
        save_rows(rows, self.ctx.output("responses"))
        metrics = {"responses": len(rows), f"mean_{cfg.column}": sum(r[cfg.column] for r in rows) / max(len(rows), 1)}
        if cfg.best_of_n:
            pairs = best_vs_worst(
                rows, cfg.column, response_field=cfg.response_field, prompt_field=cfg.prompt_field, min_margin=cfg.min_margin
            )
            metrics["pairs"] = len(pairs)
            if pairs:
                save_rows(pairs, self.ctx.output("preferences"))
                metrics["mean_margin"] = sum(p["score_chosen"] - p["score_rejected"] for p in pairs) / len(pairs)
        return metrics
