"""Fine-grained dense rewards (FineGrainedRLHF; Wu et al., 2023).

Aspects, each its own model on one base (LoRA):
- relevance  (per sub-sentence; Irrelevant / Redundant / Incoherent spans) token classifier,
- factuality (per sentence; Wrong-Grounding / Unverifiable spans)           token classifier,
- completeness (holistic; pairwise preferences)                              sequence RM.
A span aspect reads `question: Q [context: C] answer: s_1 M s_2 M ...` and predicts
"error / fine" at each mark token M; the reward is -w for an error and +w otherwise, written
at the *policy* token that ends the segment (segments are found on characters, so the RM's
tokenizer may differ from the policy's). Completeness adds w * z-scored RM output at the last
response token. Default weights 0.3 / 0.5 / 0.3 (paper).

    rm = load_reward_model("runs/r/relevance/reward_model")
    out = rm.score(RewardBatch(prompts, responses, response_token_ids, policy_tokenizer))
    out.dense      # [B, T] on the policy's response tokens; out.scalar == out.dense.sum(1)
    out.components # {"relevance": [B], ...} per-aspect totals, for logging
    rm.with_weights({"relevance": 1.0})   # reweight without reloading
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from pydantic import Field, field_validator

from pipeline.chat import last_user_text
from pipeline.stage import StageConfig

from .base import RewardBatch, Rewards, read_descriptor, register_kind, write_descriptor
from .common import batched, encode_reply, load_classifier
from .fine_grained_data import IGNORE, encode_segments, mark_token_id, segment_examples, token_classification_rows
from .segments import SEGMENTERS, end_token_index, segment, token_char_ends

AspectName = Literal["relevance", "factuality", "completeness"]
ASPECTS: tuple[AspectName, ...] = ("relevance", "factuality", "completeness")
#: FineGrainedRLHF's defaults (Wu et al. 2023, qa-feedback): reward magnitude per aspect
DEFAULT_WEIGHTS = {"relevance": 0.3, "factuality": 0.5, "completeness": 0.3}


class FineGrainedSettings(StageConfig):
    """FineGrainedRLHF: one token classifier per span aspect + a holistic completeness RM."""

    aspects: list[AspectName] = Field(default_factory=lambda: list(ASPECTS))
    segmenters: dict[str, str] = Field(
        default_factory=lambda: {"relevance": "subsentence", "factuality": "sentence"},
        description="segmenter per span aspect: sentence | subsentence | newline | whole",
    )
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    context: dict[str, bool] = Field(
        default_factory=lambda: {"relevance": False, "factuality": True, "completeness": False},
        description="include the prompt's context (system messages, e.g. passages) in the RM input",
    )
    min_span_words: int = Field(default=5, ge=0, description="ignore non-factual error spans shorter than this (paper App. D)")
    mark_token: str | None = Field(default=None, description="label token after each segment; default the RM's sep/eos token")
    class_weighting: Literal["balanced", "none"] = "balanced"

    @field_validator("segmenters")
    @classmethod
    def _known_segmenters(cls, value):
        for aspect, name in value.items():
            if name not in SEGMENTERS:
                raise ValueError(f"{aspect}: unknown segmenter '{name}': expected one of {', '.join(SEGMENTERS)}")
        return value


@dataclass
class Aspect:
    name: str
    type: str  # segments | holistic
    model: Any
    tokenizer: Any
    weight: float
    context: bool = False
    segmenter: str | None = None
    mark_id: int | None = None
    mean: float = 0.0
    std: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


class FineGrainedReward:
    kind: ClassVar[str] = "fine_grained"

    def __init__(
        self,
        aspects: dict[str, Aspect],
        max_length: int = 512,
        batch_size: int = 16,
        base_model: str | None = None,
        mark_token: str | None = None,
    ):
        self.aspects, self.max_length, self.batch_size = aspects, max_length, batch_size
        self._base, self._mark_token = base_model, mark_token

    @classmethod
    def load(cls, path: Path, device: str | None = None) -> FineGrainedReward:
        path = Path(path)
        info = read_descriptor(path)
        aspects = {}
        for name, spec in info["aspects"].items():
            task, labels = ("token", 2) if spec["type"] == "segments" else ("seq", 1)
            adapter = path / spec["adapter"] if spec.get("adapter") else None
            weights = path / spec["weights"] if spec.get("weights") else None
            model, tokenizer = load_classifier(info["base_model"], adapter, task, labels, device, weights=weights)
            mark = mark_token_id(tokenizer, info.get("mark_token")) if task == "token" else None
            aspects[name] = Aspect(
                name,
                spec["type"],
                model,
                tokenizer,
                spec["weight"],
                spec.get("context", False),
                spec.get("segmenter"),
                mark,
                spec.get("mean", 0.0),
                spec.get("std", 1.0),
                spec,
            )
        return cls(aspects, info["max_length"], base_model=info["base_model"], mark_token=info.get("mark_token"))

    def with_weights(self, weights: dict[str, float]) -> FineGrainedReward:
        unknown = set(weights) - set(self.aspects)
        if unknown:
            raise ValueError(f"unknown aspect(s) {sorted(unknown)}: this model has {sorted(self.aspects)}")
        for name, w in weights.items():
            self.aspects[name].weight = w
        return self

    # -- per-aspect predictions -------------------------------------------------------------

    def segment_predictions(self, aspect: str, prompts: list[Any], texts: list[str]) -> list[list[tuple[int, int, int, float]]]:
        """Per reply: (start, end, predicted label 1=error/0=fine, P(error)) for each segment
        the RM could see (segments past `max_length` are left out)."""
        import torch

        a = self.aspects[aspect]
        mark_id = a.mark_id
        assert mark_id is not None  # load() gives every segments aspect (a token classifier) its mark token
        device = next(a.model.parameters()).device
        encoded, segs = [], []
        for prompt, text in zip(prompts, texts):
            s = segment(text, a.segmenter or "sentence")
            segs.append(s)
            encoded.append(encode_segments(a.tokenizer, prompt, text, s, mark_id, self.max_length, a.context))
        out: list[list[tuple[int, int, int, float]]] = [[] for _ in texts]
        with torch.no_grad():
            for chunk in batched(list(range(len(texts))), self.batch_size):
                batch = a.tokenizer.pad({"input_ids": [encoded[i][0] for i in chunk]}, return_tensors="pt").to(device)
                probs = a.model(**batch).logits.float().softmax(-1)[..., 1].cpu()
                for row, i in enumerate(chunk):
                    for (start, end), pos in zip(segs[i], encoded[i][1]):
                        p = float(probs[row, pos])
                        out[i].append((start, end, int(p > 0.5), p))
        return out

    def holistic(self, aspect: str, prompts: list[Any], texts: list[str]):
        """Raw sequence-RM outputs [B] (before z-scoring)."""
        import torch

        a = self.aspects[aspect]
        device = next(a.model.parameters()).device
        encoded = [encode_reply(a.tokenizer, p, t, self.max_length, a.context) for p, t in zip(prompts, texts)]
        out = torch.empty(len(texts))
        with torch.no_grad():
            for chunk in batched(list(range(len(texts))), self.batch_size):
                batch = a.tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(device)
                out[list(chunk)] = a.model(**batch).logits.squeeze(-1).float().cpu()
        return out

    # -- the protocol -------------------------------------------------------------------------

    def score(self, batch: RewardBatch) -> Rewards:
        """Dense rewards on the policy's response tokens when the batch carries the policy
        tokenizer (and optionally its token ids); scalar = sum over the reply."""
        import torch

        texts, ends = list(batch.responses), None
        if batch.policy_tokenizer is not None:
            ids = batch.token_ids() or []
            decoded = [token_char_ends(batch.policy_tokenizer, row) for row in ids]
            texts, ends = [d[0] for d in decoded], [d[1] for d in decoded]
        width = max((len(e) for e in ends), default=0) if ends is not None else 0
        dense = torch.zeros(len(texts), width) if ends is not None else None
        components = {}
        for name, a in self.aspects.items():
            total = torch.zeros(len(texts))
            if a.type == "segments":
                for b, preds in enumerate(self.segment_predictions(name, batch.prompts, texts)):
                    for _start, end, label, _ in preds:
                        r = -a.weight if label else a.weight
                        total[b] += r
                        if dense is not None and ends is not None and ends[b]:  # dense is None iff ends is
                            dense[b, end_token_index(ends[b], end)] += r
            else:
                total = a.weight * (self.holistic(name, batch.prompts, texts) - a.mean) / a.std
                if dense is not None and ends is not None:  # dense is None iff ends is
                    for b in range(len(texts)):
                        if ends[b]:
                            dense[b, len(ends[b]) - 1] += total[b]
            components[name] = total
        # a sum of tensors is a tensor (sum's 0 start only shows for an empty sequence)
        scalar = cast(torch.Tensor, sum(components.values())) if components else torch.zeros(len(texts))
        return Rewards(scalar=scalar, dense=dense, components=components)

    def save(self, path: Path) -> None:
        """Merged weights per aspect under `<aspect>/model` (training writes LoRA adapters)."""
        path = Path(path)
        specs = {}
        for name, a in self.aspects.items():
            a.model.save_pretrained(str(path / name / "model"))
            specs[name] = {
                **a.info,
                "type": a.type,
                "segmenter": a.segmenter,
                "context": a.context,
                "weight": a.weight,
                "mean": a.mean,
                "std": a.std,
                "adapter": None,
                "weights": f"{name}/model",
            }
        write_descriptor(
            path, self.kind, base_model=self._base, max_length=self.max_length, mark_token=self._mark_token, aspects=specs
        )


# ----------------------------------------------------------------------------- training


def train(ctx, cfg) -> dict[str, Any]:
    """Train each configured aspect (resuming: finished aspects are kept), then evaluate each on
    held-out prompts against a majority (span aspects) or length (completeness) baseline."""
    from feedback.sources import readers

    from .common import split_train_eval

    settings = cfg.fine_grained
    base = cfg.base_model or ctx.model
    out = ctx.output("reward_model")
    key = last_user_text
    span_aspects = [a for a in settings.aspects if a != "completeness"]
    records = readers.span_feedback(ctx.input("feedback")) if span_aspects else []
    if ctx.input("eval") is not None and span_aspects:
        train_records, eval_records = records, readers.span_feedback(ctx.input("eval"))
    else:
        train_records, eval_records = split_train_eval(
            records, cfg.eval_fraction, ctx.seed, cfg.split, group=lambda r: key(r.prompt), time=lambda r: r.provenance.timestamp
        )
    held = {key(r.prompt) for r in eval_records}
    # read once: training and evaluation both split these pairs by `held`
    pairs = _completeness_pairs(ctx) if "completeness" in settings.aspects else []
    specs: dict[str, dict[str, Any]] = {}
    metrics: dict[str, Any] = {}
    curves: list[dict[str, Any]] = []
    for aspect in settings.aspects:
        done = out / aspect / "spec.json"
        if done.is_file():  # finished before an interruption
            specs[aspect] = json.loads(done.read_text())
            ctx.log.info("%s: already trained, kept", aspect)
            continue
        if aspect == "completeness":
            spec, m = _train_completeness(ctx, cfg, base, held, pairs)
        else:
            spec, m = _train_segments(ctx, cfg, base, aspect, train_records)
        specs[aspect] = spec
        metrics.update({f"{aspect}/{k}": v for k, v in m.items()})
        curves += [
            {("step" if k == "step" else f"{aspect}/{k}"): v for k, v in row.items() if k not in ("epoch",)}
            for row in json.loads((ctx.work_dir / "curves.json").read_text())
        ]
        done.write_text(json.dumps(spec))
    ctx.save_curves(curves)
    describe = dict(base_model=base, max_length=cfg.max_length, mark_token=settings.mark_token, aspects=specs)
    write_descriptor(out, FineGrainedReward.kind, **describe)
    evaluation = evaluate(FineGrainedReward.load(out, cfg.policy().device), cfg, train_records, eval_records, held, pairs)
    metrics.update(evaluation["metrics"])
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2))
    write_descriptor(out, FineGrainedReward.kind, **describe, metrics=evaluation["metrics"])
    return metrics


def _train_segments(ctx, cfg, base: str, aspect: str, records) -> tuple[dict[str, Any], dict[str, Any]]:
    from datasets import Dataset
    from transformers import DataCollatorForTokenClassification

    from pipeline.training import fit

    from .common import load_tokenizer, new_classifier
    from .trainers import balanced_weights, loss_trainer, weighted_token_ce

    settings = cfg.fine_grained
    segmenter = settings.segmenters.get(aspect, "sentence")
    context = settings.context.get(aspect, False)
    examples = segment_examples(records, aspect, segmenter, settings.min_span_words)
    tokenizer = load_tokenizer(base)
    mark = mark_token_id(tokenizer, settings.mark_token)
    rows = token_classification_rows(tokenizer, examples, mark, cfg.max_length, context)
    labels = [label for row in rows for label in row["labels"] if label != IGNORE]
    if len(set(labels)) < 2:
        raise ValueError(f"{aspect}: the training spans give only one label ({set(labels)}); need errors and clean segments")
    weights = balanced_weights(labels) if settings.class_weighting == "balanced" else None
    ctx.log.info(
        "%s: %d replies, %d %s segments, error rate %.3f", aspect, len(rows), len(labels), segmenter, sum(labels) / len(labels)
    )

    start = _aspect_init(ctx, cfg, aspect)

    def build_trainer():
        model, tok = new_classifier(base, "token", 2, cfg.lora, ctx.seed, cfg.full_finetune, start)
        return loss_trainer(
            model,
            tok,
            Dataset.from_list(rows),
            cfg.trainer_kwargs(ctx),
            weighted_token_ce(weights),
            DataCollatorForTokenClassification(tok),
        )

    m = fit(ctx, cfg, build_trainer, output_name=f"reward_model/{_weights_folder(aspect, cfg)}")
    m.update(train_replies=len(rows), train_segments=len(labels), train_error_rate=sum(labels) / len(labels))
    spec = {
        "type": "segments",
        "segmenter": segmenter,
        "context": context,
        "weight": settings.weights.get(aspect, 1.0),
        **_weights_spec(aspect, cfg),
    }
    return spec, m


def _train_completeness(ctx, cfg, base: str, held: set[str], pairs) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pairwise (Bradley-Terry) sequence RM with TRL's RewardTrainer on preference pairs."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from pipeline.training import fit

    from .common import new_classifier

    settings = cfg.fine_grained
    context = settings.context.get("completeness", False)
    train_pairs = [p for p in pairs if last_user_text(p.prompt) not in held]
    ctx.log.info("completeness: %d training pairs", len(train_pairs))

    start = _aspect_init(ctx, cfg, "completeness")

    def build_trainer():
        model, tokenizer = new_classifier(base, "seq", 1, cfg.lora, ctx.seed, cfg.full_finetune, start)
        rows = [
            {
                "chosen_ids": encode_reply(tokenizer, p.prompt, p.chosen, cfg.max_length, context),
                "rejected_ids": encode_reply(tokenizer, p.prompt, p.rejected, cfg.max_length, context),
            }
            for p in train_pairs
        ]
        args = RewardConfig(max_length=cfg.max_length, **cfg.trainer_kwargs(ctx))
        return RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)

    m = fit(ctx, cfg, build_trainer, output_name=f"reward_model/{_weights_folder('completeness', cfg)}")
    spec = {
        "type": "holistic",
        "context": context,
        "weight": settings.weights.get("completeness", 1.0),
        **_weights_spec("completeness", cfg),
    }
    # z-score with the training replies' statistics (the paper normalises the same way)

    folder = ctx.output("reward_model") / _weights_folder("completeness", cfg)
    model, tokenizer = load_classifier(
        base, None if cfg.full_finetune else folder, "seq", 1, cfg.policy().device, weights=folder if cfg.full_finetune else None
    )
    rm = FineGrainedReward({"completeness": Aspect("completeness", "holistic", model, tokenizer, 1.0, context)}, cfg.max_length)
    replies = list({(last_user_text(p.prompt), r): (p.prompt, r) for p in train_pairs for r in (p.chosen, p.rejected)}.values())
    raw = rm.holistic("completeness", [x[0] for x in replies], [x[1] for x in replies])
    spec.update(mean=float(raw.mean()), std=float(raw.std().clamp_min(1e-6)) if len(raw) > 1 else 1.0)
    m.update(train_pairs=len(train_pairs))
    return spec, m


def _aspect_init(ctx, cfg, aspect: str) -> Path | None:
    """The weights of `aspect` in the `init` reward model to continue (train_reward checked its
    kind and base); None without an init, or when the init has no such aspect (trained fresh)."""
    from .common import init_weights

    init = ctx.input("init")
    if init is None:
        return None
    spec = read_descriptor(init).get("aspects", {}).get(aspect)
    if spec is None:
        ctx.log.info("%s: not in the init %s, trained from scratch", aspect, init)
        return None
    return init_weights(init, spec.get("adapter"), spec.get("weights"), cfg.full_finetune, aspect)


def _weights_folder(aspect: str, cfg) -> str:
    return f"{aspect}/model" if cfg.full_finetune else f"{aspect}/adapter"


def _weights_spec(aspect: str, cfg) -> dict[str, str | None]:
    folder = _weights_folder(aspect, cfg)
    return {"adapter": None, "weights": folder} if cfg.full_finetune else {"adapter": folder, "weights": None}


def _completeness_pairs(ctx):
    from feedback.sources import readers

    source = ctx.input("preferences") or ctx.input("feedback")
    return readers.preferences(source)


def evaluate(rm: FineGrainedReward, cfg, train_records, eval_records, held: set[str], completeness_pairs) -> dict[str, Any]:
    from .metrics import classification_scores, majority_baseline, pairwise_accuracy

    settings = cfg.fine_grained
    metrics: dict[str, Any] = {}
    comparison = []
    for name, a in rm.aspects.items():
        if a.type == "segments":
            assert a.segmenter is not None  # train() records a segmenter for every span aspect
            train_ex = segment_examples(train_records, name, a.segmenter, settings.min_span_words)
            eval_ex = segment_examples(eval_records, name, a.segmenter, settings.min_span_words)
            if not eval_ex:
                continue
            preds = rm.segment_predictions(name, [e.prompt for e in eval_ex], [e.response for e in eval_ex])
            y, p = [], []
            for ex, pr in zip(eval_ex, preds):
                for label, (_, _, pred, _) in zip(ex.labels, pr):
                    if label is not None:
                        y.append(label)
                        p.append(pred)
            model = classification_scores(y, p)
            baseline = majority_baseline([lab for e in train_ex for lab in e.labels if lab is not None], y)
            for k in ("accuracy", "f1_error", "macro_f1"):
                metrics[f"{name}/{k}"] = model[k]
                metrics[f"{name}/baseline_{k}"] = baseline[k]
                comparison.append(
                    {
                        "what": f"{name} ({a.segmenter})",
                        "metric": k,
                        "model": model[k],
                        "baseline": baseline[k],
                        "baseline_name": f"majority label ({'error' if baseline['label'] else 'fine'})",
                    }
                )
            metrics[f"{name}/eval_segments"] = model["segments"]
        else:
            pairs = [p for p in completeness_pairs if last_user_text(p.prompt) in held]
            if not pairs:
                continue
            chosen = rm.holistic(name, [p.prompt for p in pairs], [p.chosen for p in pairs]).tolist()
            rejected = rm.holistic(name, [p.prompt for p in pairs], [p.rejected for p in pairs]).tolist()
            metrics[f"{name}/pairwise_accuracy"] = pairwise_accuracy(chosen, rejected)
            metrics[f"{name}/baseline_length_accuracy"] = pairwise_accuracy(
                [len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs]
            )
            metrics[f"{name}/eval_pairs"] = len(pairs)
            comparison.append(
                {
                    "what": name,
                    "metric": "pairwise accuracy",
                    "model": metrics[f"{name}/pairwise_accuracy"],
                    "baseline": metrics[f"{name}/baseline_length_accuracy"],
                    "baseline_name": "longer reply wins",
                }
            )
    return {"kind": "fine_grained", "metrics": metrics, "comparison": comparison}


register_kind(
    FineGrainedReward.kind,
    FineGrainedReward.load,
    FineGrainedSettings,
    train,
    "FineGrainedRLHF: dense per-segment rewards per aspect",
)
