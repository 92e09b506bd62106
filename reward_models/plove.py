"""P[Love] (Han et al., "Reinforcement Learning from User Feedback", 2025): the probability
that a reply gets a positive reaction, learned from binary, sparse, noisy user reactions.

A sequence classifier (one logit) with LoRA on a base model. Positives are rare, so the
loss weights them by #neg/#pos; that shifts the optimal logit by +log(weight), which
`PLoveReward` subtracts at scoring so P[Love] stays a calibrated probability. Each user
contributes at most `max_per_user` examples, so a few heavy users cannot define "love".

    rm = load_reward_model("runs/r/plove/reward_model")
    rm.score(RewardBatch(prompts, responses)).scalar   # P[Love] per reply, [B]
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.chat import last_user_text
from pipeline.stage import StageConfig

from .base import RewardBatch, Rewards, read_descriptor, register_kind, write_descriptor
from .common import batched, encode_reply, load_classifier, split_train_eval


class PLoveSettings(StageConfig):
    """P[Love]: a classifier of 'this reply gets a positive reaction' (RLUF)."""

    positive: list[str] = Field(default_factory=lambda: ["love"], description="reaction values that count as positive")
    class_weighting: Literal["balanced", "none"] = Field(
        default="balanced", description="balanced: positives weighted by #neg/#pos in the loss (the offset is undone at scoring)"
    )
    max_per_user: int | None = Field(default=200, ge=1, description="cap on training examples per user id")
    output: Literal["probability", "logit"] = "probability"
    bins: int = Field(default=10, ge=2, le=50, description="calibration bins (ECE, reliability plot)")
    tfidf_baseline: bool = Field(default=True, description="also fit a TF-IDF logistic regression as a baseline")


@dataclass
class Example:
    prompt: Any
    response: str
    label: int
    user: str
    time: str


def examples_from_reactions(records, positive: list[str]) -> list[Example]:
    # logs' positive words (the configured ones among them) are read as 'love', so it always counts
    wanted = set(positive) | {"love"}
    return [
        Example(
            r.prompt, r.response, int(r.reaction in wanted), r.user_id or r.provenance.annotator or "?", r.provenance.timestamp
        )
        for r in records
    ]


def cap_per_user(examples: list[Example], cap: int | None, seed: int) -> list[Example]:
    """Keep at most `cap` examples per user (a seeded random subset), in the original order."""
    if cap is None:
        return list(examples)
    by_user: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_user[ex.user].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for user in sorted(by_user):
        idx = by_user[user]
        keep.update(idx if len(idx) <= cap else rng.sample(idx, cap))
    return [ex for i, ex in enumerate(examples) if i in keep]


def positive_weight(labels: list[int], mode: str) -> float:
    pos = sum(labels)
    if mode == "none" or pos == 0 or pos == len(labels):
        return 1.0
    return (len(labels) - pos) / pos


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class PLoveReward:
    """Scores P[Love] (or its logit) per reply. `logit_offset` = -log(pos_weight) undoes the
    class weighting of training."""

    kind: ClassVar[str] = "plove"

    def __init__(
        self,
        model,
        tokenizer,
        base: str,
        max_length: int = 512,
        logit_offset: float = 0.0,
        output: str = "probability",
        batch_size: int = 16,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.base, self.max_length, self.logit_offset = base, max_length, logit_offset
        self.output, self.batch_size = output, batch_size

    @classmethod
    def load(cls, path: Path, device: str | None = None) -> PLoveReward:
        path = Path(path)
        info = read_descriptor(path)
        adapter = path / "adapter" if (path / "adapter").is_dir() else None
        model, tokenizer = load_classifier(
            info["base_model"], adapter, "seq", 1, device, weights=None if adapter else path / "model"
        )
        return cls(
            model, tokenizer, info["base_model"], info["max_length"], info["logit_offset"], info.get("output", "probability")
        )

    def logits(self, prompts: list[Any], responses: list[str]):
        import torch

        encoded = [encode_reply(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded))
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for chunk in batched(order, self.batch_size):
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(device)
                out[list(chunk)] = self.model(**batch).logits.squeeze(-1).float().cpu()
        return out + self.logit_offset

    def probabilities(self, prompts: list[Any], responses: list[str]):
        return self.logits(prompts, responses).sigmoid()

    def score(self, batch: RewardBatch) -> Rewards:
        logits = self.logits(batch.prompts, batch.responses)
        probs = logits.sigmoid()
        scalar = probs if self.output == "probability" else logits
        return Rewards(scalar=scalar, components={"plove": probs})

    def save(self, path: Path) -> None:
        """Merged weights under `model/` (training writes a LoRA `adapter/` instead)."""
        self.model.save_pretrained(str(Path(path) / "model"))
        self._describe(path)

    def _describe(self, path: Path, **extra: Any) -> None:
        write_descriptor(
            Path(path),
            self.kind,
            base_model=self.base,
            max_length=self.max_length,
            logit_offset=self.logit_offset,
            output=self.output,
            **extra,
        )


# ----------------------------------------------------------------------------- training


def train(ctx, cfg) -> dict[str, Any]:
    """Train on `feedback` (reactions), evaluate on `eval` or a held-out split; returns metrics."""
    from datasets import Dataset

    from feedback.sources import readers
    from pipeline.training import fit

    from .common import init_weights, new_classifier
    from .trainers import loss_trainer, weighted_bce

    settings = cfg.plove
    base = cfg.base_model or ctx.model
    records = readers.reactions(ctx.input("feedback"), settings.positive)
    examples = examples_from_reactions(records, settings.positive)
    if ctx.input("eval") is not None:
        train_ex, eval_ex = (
            examples,
            examples_from_reactions(readers.reactions(ctx.input("eval"), settings.positive), settings.positive),
        )
    else:
        train_ex, eval_ex = split_train_eval(
            examples, cfg.eval_fraction, ctx.seed, cfg.split, group=lambda e: last_user_text(e.prompt), time=lambda e: e.time
        )
    before = len(train_ex)
    train_ex = cap_per_user(train_ex, settings.max_per_user, ctx.seed)
    labels = [e.label for e in train_ex]
    if not 0 < sum(labels) < len(labels):
        raise ValueError(
            f"P[Love] needs both positive ({settings.positive}) and other reactions; got {sum(labels)} positive of {len(labels)}"
        )
    pos_weight = positive_weight(labels, settings.class_weighting)
    ctx.log.info(
        "P[Love]: %d train (%d dropped by the per-user cap), %d eval, positive rate %.3f, pos_weight %.2f",
        len(train_ex),
        before - len(train_ex),
        len(eval_ex),
        sum(labels) / len(labels),
        pos_weight,
    )

    init = ctx.input("init")  # continue this P[Love] model (train_reward checked its kind and base)
    start = init_weights(
        init,
        "adapter" if init is not None and (init / "adapter").is_dir() else None,
        "model" if init is not None and (init / "model").is_dir() else None,
        cfg.full_finetune,
    )

    def build_trainer():
        model, tokenizer = new_classifier(base, "seq", 1, cfg.lora, ctx.seed, cfg.full_finetune, start)
        rows = [
            {"input_ids": encode_reply(tokenizer, e.prompt, e.response, cfg.max_length), "labels": float(e.label)}
            for e in train_ex
        ]
        return loss_trainer(model, tokenizer, Dataset.from_list(rows), cfg.trainer_kwargs(ctx), weighted_bce(pos_weight))

    out = ctx.output("reward_model")
    metrics = fit(ctx, cfg, build_trainer, output_name="reward_model/model" if cfg.full_finetune else "reward_model/adapter")
    rm = PLoveReward(None, None, base, cfg.max_length, -math.log(pos_weight), settings.output)
    rm._describe(out)
    metrics.update(
        train_examples=len(train_ex),
        capped=before - len(train_ex),
        users=len({e.user for e in train_ex}),
        train_positive_rate=sum(labels) / len(labels),
        pos_weight=pos_weight,
    )
    if eval_ex:
        evaluation = evaluate(PLoveReward.load(out, cfg.policy().device), train_ex, eval_ex, settings)
        (out / "eval.json").write_text(json.dumps(evaluation, indent=2))
        metrics.update(evaluation["metrics"])
        rm._describe(out, metrics=evaluation["metrics"])
    return metrics


def evaluate(rm: PLoveReward, train_ex: list[Example], eval_ex: list[Example], settings) -> dict[str, Any]:
    from .metrics import auroc, expected_calibration_error, quantile_buckets, reliability_bins

    labels = [e.label for e in eval_ex]
    probs = rm.probabilities([e.prompt for e in eval_ex], [e.response for e in eval_ex]).tolist()
    base_rate = sum(e.label for e in train_ex) / len(train_ex)
    metrics = {
        "eval_examples": len(eval_ex),
        "eval_positive_rate": sum(labels) / len(labels),
        "auroc": auroc(labels, probs),
        "ece": expected_calibration_error(labels, probs, settings.bins),
        "mean_plove": sum(probs) / len(probs),
        "baseline_constant_auroc": 0.5,
        "baseline_constant_ece": expected_calibration_error(labels, [base_rate] * len(labels), settings.bins),
    }
    comparison = [
        {
            "what": "P[Love]",
            "metric": "AUROC",
            "model": metrics["auroc"],
            "baseline": 0.5,
            "baseline_name": "constant train positive rate",
        },
        {
            "what": "P[Love]",
            "metric": "ECE",
            "model": metrics["ece"],
            "baseline": metrics["baseline_constant_ece"],
            "baseline_name": "constant train positive rate",
        },
    ]
    if settings.tfidf_baseline and importlib.util.find_spec("sklearn") is not None:  # the `metrics` extra
        metrics.update(tfidf_baseline(train_ex, eval_ex, settings.bins))
        comparison += [
            {
                "what": "P[Love]",
                "metric": "AUROC",
                "model": metrics["auroc"],
                "baseline": metrics["baseline_tfidf_auroc"],
                "baseline_name": "TF-IDF logistic regression",
            },
            {
                "what": "P[Love]",
                "metric": "ECE",
                "model": metrics["ece"],
                "baseline": metrics["baseline_tfidf_ece"],
                "baseline_name": "TF-IDF logistic regression",
            },
        ]
    return {
        "kind": "plove",
        "metrics": metrics,
        "comparison": comparison,
        "reliability": reliability_bins(labels, probs, settings.bins),
        "buckets": quantile_buckets(labels, probs, 5),
        "probs": probs,
        "labels": labels,
    }


def tfidf_baseline(train_ex: list[Example], eval_ex: list[Example], bins: int) -> dict[str, float]:
    """A bag-of-words logistic regression on prompt + reply: the honest cheap baseline."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from pipeline.chat import split_prompt

    from .metrics import auroc, expected_calibration_error

    def text(e: Example) -> str:
        return f"{split_prompt(e.prompt)[0]} ||| {e.response}"

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vectorizer.fit_transform([text(e) for e in train_ex])
    clf = LogisticRegression(max_iter=2000).fit(x_train, [e.label for e in train_ex])
    probs = clf.predict_proba(vectorizer.transform([text(e) for e in eval_ex]))[:, 1].tolist()
    labels = [e.label for e in eval_ex]
    return {"baseline_tfidf_auroc": auroc(labels, probs), "baseline_tfidf_ece": expected_calibration_error(labels, probs, bins)}


register_kind(PLoveReward.kind, PLoveReward.load, PLoveSettings, train, "P[Love]: a classifier of positive reactions (RLUF)")
