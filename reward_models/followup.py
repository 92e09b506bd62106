"""Follow-up likelihood as reward (FLR; Zhang et al., AAAI 2025).

A good reply makes positive user follow-ups ("Thanks, that answers my question.") likely and
negative ones ("That's not what I asked.") unlikely. Under a causal LM, with each follow-up
appended as the next user turn after the reply:

    FLR(prompt, reply) = mean_{f in positive} lp(f) - mean_{f in negative} lp(f)
    lp(f) = (1/|f|) * sum_t log p(f_t | conversation, reply, f_<t)       (length-normalised)

Prefix reuse: all follow-ups of a reply are scored in ONE forward pass. The sequence is
[pad.. | prompt+reply | f_1 | f_2 | ... | f_N] with a 4D attention mask in which each f_k sees
the shared prefix and itself only, and position ids restart after the prefix for every
f_k; that equals N separate passes over prefix+f_k (tested to 1e-4) for the cost of
one pass over prefix + sum |f_k| tokens. Left padding puts every reply's prefix end at the same
column, so only the follow-up positions go through the LM head (`logits_to_keep`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from pydantic import Field, field_validator

from pipeline.chat import as_messages, last_user_text
from pipeline.paths import ConfigPath
from pipeline.stage import StageConfig

from .base import RewardBatch, Rewards, read_descriptor, register_kind, write_descriptor
from .common import batched

if TYPE_CHECKING:
    from pipeline.schema import Preference

log = logging.getLogger(__name__)

FLR_ASPECTS = ("understanding", "relevance", "correctness", "engagingness", "informativeness", "instruction_following")


class FollowupSettings(StageConfig):
    """FLR: log-likelihood of positive minus negative user follow-ups after the reply."""

    followups: ConfigPath = Field(default="data:followups/flr_followups.json", description="follow-up lists (data: ref or path)")
    aspects: list[str] | None = Field(default=None, description=f"subset of {', '.join(FLR_ASPECTS)}; default all")
    per_aspect: int | None = Field(default=None, ge=1, description="use the first N follow-ups per aspect and polarity")
    include_context: bool = Field(default=False, description="keep system messages (e.g. retrieved passages) in the prefix")
    max_prefix_tokens: int = Field(default=1024, ge=16)
    batch_size: int = Field(default=4, ge=1, description="replies per forward pass")
    finetune: bool = Field(default=False, description="fine-tune the follow-up LM on natural-language feedback (LoRA)")
    fast: bool = Field(
        default=True,
        description="fine-tuning on a CPU: only the follow-up's tokens through the LM head (trainers/fast_sft.py, "
        "exact); false: TRL's own SFT step",
    )
    max_eval_prompts: int | None = Field(default=60, ge=1, description="cap on held-out prompts scored for pairwise accuracy")

    @field_validator("aspects")
    @classmethod
    def _known_aspects(cls, value):
        if value is not None:
            unknown = [a for a in value if a not in FLR_ASPECTS]
            if unknown:
                raise ValueError(f"unknown aspect(s) {unknown}: expected some of {list(FLR_ASPECTS)}")
        return value


_MARK = "\ue000FOLLOWUP\ue000"


@dataclass
class Followups:
    texts: list[str]
    positive: list[bool]
    aspects: list[str]

    @classmethod
    def load(cls, path: str | Path, aspects: list[str] | None = None, per_aspect: int | None = None) -> Followups:
        from pipeline.errors import DataError

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read follow-up lists ({exc})") from None
        table = data.get("aspects") if isinstance(data, dict) else None
        if not isinstance(table, dict):
            raise DataError(f"{path}: expected {{'aspects': {{aspect: {{'positive': [...], 'negative': [...]}}}}}}")
        texts, positive, names = [], [], []
        for aspect in aspects or list(table):
            if aspect not in table:
                raise DataError(f"{path}: aspects.{aspect} is missing (have {', '.join(table)})")
            for polarity in ("positive", "negative"):
                items = table[aspect].get(polarity)
                if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
                    raise DataError(f"{path}: aspects.{aspect}.{polarity} must be a list of non-empty strings")
                for text in items[:per_aspect] if per_aspect else items:
                    texts.append(text)
                    positive.append(polarity == "positive")
                    names.append(aspect)
        if not any(positive) or all(positive):
            raise DataError(f"{path}: need at least one positive and one negative follow-up")
        return cls(texts, positive, names)

    def to_json(self) -> dict[str, Any]:
        table: dict[str, dict[str, list[str]]] = {}
        for text, pos, aspect in zip(self.texts, self.positive, self.aspects):
            table.setdefault(aspect, {"positive": [], "negative": []})["positive" if pos else "negative"].append(text)
        return {"aspects": table}


class ConversationFormat:
    """Renders (prompt, reply) as the text just before a new user turn, and the text that
    closes a user turn, from the tokenizer's chat template (or a plain 'User:' format)."""

    def __init__(self, tokenizer, include_context: bool = False):
        self.tokenizer = tokenizer
        self.include_context = include_context
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if self.chat:
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": _MARK}]
            full = tokenizer.apply_chat_template(probe, tokenize=False)
            self.end_of_turn = full[full.index(_MARK) + len(_MARK) :].rstrip("\n") or "\n"
        else:
            self.end_of_turn = "\n"

    def messages(self, prompt: Any, reply: str) -> list[dict[str, str]]:
        messages = as_messages(prompt)
        if not self.include_context:
            messages = [m for m in messages if m["role"] != "system"]
        return messages + [{"role": "assistant", "content": reply}]

    def prefix(self, prompt: Any, reply: str) -> str:
        messages = self.messages(prompt, reply)
        if self.chat:
            full = self.tokenizer.apply_chat_template(messages + [{"role": "user", "content": _MARK}], tokenize=False)
            return full[: full.index(_MARK)]
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "User: "

    def followup(self, text: str) -> str:
        return text + self.end_of_turn


# ----------------------------------------------------------------------------- the math


def pack_followups(prefixes: list[list[int]], followups: list[list[int]], pad_id: int, dtype=None) -> dict[str, Any]:
    """Inputs that score every follow-up after every prefix in one forward pass.

    Row b: [pad * (P - P_b) | prefix_b | f_1 | ... | f_N]. Returns input_ids, position_ids,
    an additive 4D attention mask [B, 1, S, S], `keep` (the columns whose logits predict a
    follow-up token), `targets` (the token each kept column predicts) and `owner` (which
    follow-up each kept column belongs to)."""
    import torch

    dtype = dtype or torch.float32
    width = max(len(p) for p in prefixes)
    lengths = [len(f) for f in followups]
    if min(lengths, default=0) == 0:
        raise ValueError("empty follow-up")
    total = width + sum(lengths)
    batch = len(prefixes)
    input_ids = torch.full((batch, total), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, total), dtype=torch.long)
    segment = torch.full((batch, total), -1, dtype=torch.long)  # -1 pad, 0 prefix, k+1 follow-up k
    flat = torch.tensor([t for f in followups for t in f], dtype=torch.long)
    owner = torch.tensor([k for k, f in enumerate(followups) for _ in f], dtype=torch.long)
    offset_in_f = torch.tensor([i for f in followups for i in range(len(f))], dtype=torch.long)
    for b, prefix in enumerate(prefixes):
        start = width - len(prefix)
        input_ids[b, start:width] = torch.tensor(prefix, dtype=torch.long)
        position_ids[b, start:width] = torch.arange(len(prefix))
        segment[b, start:width] = 0
        input_ids[b, width:] = flat
        position_ids[b, width:] = len(prefix) + offset_in_f
        segment[b, width:] = owner + 1
    idx = torch.arange(total)
    causal = idx[None, :] <= idx[:, None]  # [S(query), S(key)]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = causal[None] & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(total, dtype=torch.bool)[None]  # pads attend to themselves (no empty rows)
    mask = torch.zeros((batch, 1, total, total), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    # column predicting token j of f_k: the prefix end for j == 0, else the previous token of f_k
    columns = width + torch.arange(len(flat))
    keep = torch.where(offset_in_f == 0, torch.full_like(columns, width - 1), columns - 1)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask,
        "keep": keep,
        "targets": flat,
        "owner": owner,
        "lengths": torch.tensor(lengths),
    }


def packed_logprobs(model, prefixes: list[list[int]], followups: list[list[int]], pad_id: int):
    """[B, N] length-normalised log p(f_k | prefix_b), one forward pass for the whole batch."""
    import torch

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    packed = pack_followups(prefixes, followups, pad_id, dtype)
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"].to(device),
            position_ids=packed["position_ids"].to(device),
            attention_mask=packed["attention_mask"].to(device),
            logits_to_keep=packed["keep"].to(device),
            use_cache=False,
        ).logits.float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(
        -1, packed["targets"].to(device)[None, :, None].expand(len(prefixes), -1, 1)
    )
    sums = torch.zeros(len(prefixes), len(followups), device=device).index_add_(1, packed["owner"].to(device), token_lp[..., 0])
    return (sums / packed["lengths"].to(device)).cpu()


def naive_logprobs(model, prefixes: list[list[int]], followups: list[list[int]], pad_id: int, batch_followups: bool = False):
    """The same quantity with one full pass over prefix + f_k per follow-up (the reference).
    `batch_followups` runs a reply's N passes as one right-padded batch (same FLOPs)."""
    import torch

    device = next(model.parameters()).device
    out = torch.zeros(len(prefixes), len(followups))
    with torch.no_grad():
        for b, prefix in enumerate(prefixes):
            seqs = [prefix + f for f in followups]
            groups = [list(range(len(seqs)))] if batch_followups else [[k] for k in range(len(seqs))]
            for group in groups:
                width = max(len(seqs[k]) for k in group)
                ids = torch.full((len(group), width), pad_id, dtype=torch.long)
                att = torch.zeros((len(group), width), dtype=torch.long)
                for row, k in enumerate(group):
                    ids[row, : len(seqs[k])] = torch.tensor(seqs[k])
                    att[row, : len(seqs[k])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False).logits.float().cpu()
                lp = torch.log_softmax(logits, dim=-1)
                for row, k in enumerate(group):
                    f = followups[k]
                    positions = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(f))
                    out[b, k] = lp[row, positions, torch.tensor(f)].sum() / len(f)
    return out


def flr_from_logprobs(logprobs, positive: list[bool]):
    """mean over positive follow-ups minus mean over negative ones, per reply."""
    import torch

    pos = torch.tensor(positive)
    return logprobs[:, pos].mean(dim=1) - logprobs[:, ~pos].mean(dim=1)


# ----------------------------------------------------------------------------- the reward model


class FollowupReward:
    kind: ClassVar[str] = "followup"

    def __init__(
        self,
        model,
        tokenizer,
        followups: Followups,
        base: str,
        adapter: str | None = None,
        include_context: bool = False,
        max_prefix_tokens: int = 1024,
        batch_size: int = 4,
    ):
        self.model, self.tokenizer, self.followups = model, tokenizer, followups
        self.base, self.adapter = base, adapter
        self.format = ConversationFormat(tokenizer, include_context)
        self.include_context, self.max_prefix_tokens, self.batch_size = include_context, max_prefix_tokens, batch_size
        self.followup_ids = [tokenizer(self.format.followup(t), add_special_tokens=False)["input_ids"] for t in followups.texts]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, base: str, followups: Followups, adapter: Path | None = None, device: str | None = None, **kwargs):
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer

        model = load_causal_lm(base, device_policy(device), adapter=adapter).eval()
        return cls(
            model, load_tokenizer(base, padding_side="right"), followups, base, str(adapter) if adapter else None, **kwargs
        )

    @classmethod
    def load(cls, path: Path, device: str | None = None) -> FollowupReward:
        path = Path(path)
        info = read_descriptor(path)
        followups = Followups.load(path / "followups.json")
        adapter = path / info["adapter"] if info.get("adapter") else None
        return cls.from_pretrained(
            info["base_model"],
            followups,
            adapter,
            device,
            include_context=info["include_context"],
            max_prefix_tokens=info["max_prefix_tokens"],
        )

    def prefix_ids(self, prompt: Any, reply: str) -> list[int]:
        ids = self.tokenizer(self.format.prefix(prompt, reply), add_special_tokens=False)["input_ids"]
        return list(ids)[-self.max_prefix_tokens :]

    def logprobs(self, prompts: list[Any], responses: list[str], naive: bool = False):
        """[B, N] length-normalised log-likelihood of each follow-up after each reply."""
        import torch

        prefixes = [self.prefix_ids(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))  # similar lengths share a pass
        out = torch.zeros(len(prefixes), len(self.followup_ids))
        for chunk in batched(order, self.batch_size):
            group = [prefixes[i] for i in chunk]
            fn = naive_logprobs if naive else packed_logprobs
            out[list(chunk)] = fn(self.model, group, self.followup_ids, self.pad_id)
        return out

    def score(self, batch: RewardBatch) -> Rewards:
        import torch

        lp = self.logprobs(batch.prompts, batch.responses)
        components = {}
        pos = torch.tensor(self.followups.positive)
        for aspect in dict.fromkeys(self.followups.aspects):
            cols = torch.tensor([a == aspect for a in self.followups.aspects])
            components[f"flr/{aspect}"] = flr_from_logprobs(lp[:, cols], pos[cols].tolist())
        return Rewards(scalar=flr_from_logprobs(lp, self.followups.positive), components=components)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "followups.json").write_text(json.dumps(self.followups.to_json(), indent=2))
        adapter = None
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(str(path / "adapter"))
            adapter = "adapter"
        self._describe(path, adapter)

    def _describe(self, path: Path, adapter: str | None, **extra: Any) -> None:
        write_descriptor(
            path,
            self.kind,
            base_model=self.base,
            adapter=adapter,
            include_context=self.include_context,
            max_prefix_tokens=self.max_prefix_tokens,
            **extra,
        )


# ----------------------------------------------------------------------------- training / evaluation


def feedback_triples(path: Path, followups: Followups, seed: int) -> tuple[list[tuple[Any, Any, str]], list[Preference]]:
    """(prompt, reply, follow-up) examples of natural-language feedback for fine-tuning, and
    the preference pairs found (for evaluation). Preference pairs become feedback by giving
    the chosen reply a positive follow-up and the rejected one a negative follow-up."""
    from feedback.sources import readers
    from feedback.sources.formats import load_feedback

    fmt, rows = load_feedback(path)
    rng = random.Random(seed)
    pos = [t for t, p in zip(followups.texts, followups.positive) if p]
    neg = [t for t, p in zip(followups.texts, followups.positive) if not p]
    if fmt in ("preferences", "qa_feedback", "trl_preferences"):
        pairs = readers.preferences_from(fmt, rows, path)
        triples: list[tuple[Any, Any, str]] = []  # (prompt, reply, follow-up); the readers give text replies
        for pair in pairs:
            triples.append((pair.prompt, pair.chosen, rng.choice(pos)))
            triples.append((pair.prompt, pair.rejected, rng.choice(neg)))
        return triples, pairs
    if fmt == "followups":
        from pipeline.schema import FollowUp, rows_to_records

        followup_records = cast(list[FollowUp], rows_to_records("followups", rows, str(path)))
        return [(r.prompt, r.response, r.followup) for r in followup_records], []
    if fmt == "verbal_feedback":
        from pipeline.schema import VerbalFeedback, rows_to_records

        verbal_records = cast(list[VerbalFeedback], rows_to_records("verbal_feedback", rows, str(path)))
        return [(r.prompt, r.response, r.critique) for r in verbal_records], []
    from pipeline.errors import DataError

    raise DataError(f"{path}: FLR uses preferences, follow-ups or verbal feedback, got {fmt}")


def train(ctx, cfg) -> dict[str, Any]:
    """Zero-shot FLR, optionally fine-tuned on feedback (LoRA, TRL SFT on the follow-up turn
    only); pairwise accuracy on held-out preference pairs before and after."""
    from pipeline.paths import resolve_data_ref

    from .common import split_train_eval

    settings = cfg.followup
    base = cfg.base_model or ctx.model
    init = ctx.input("init")
    if init is not None and read_descriptor(init).get("adapter") and not settings.finetune:
        from pipeline.errors import HeedfulError

        raise HeedfulError(
            f"train_reward: input 'init' {init} is a fine-tuned FLR model; followup.finetune: false would drop "
            "what it learned (set followup.finetune: true to continue it)"
        )
    source = settings.followups
    followups = Followups.load(
        resolve_data_ref(source) if source.startswith("data:") else Path(source), settings.aspects, settings.per_aspect
    )
    triples, pairs = feedback_triples(ctx.input("feedback"), followups, ctx.seed)
    key = last_user_text
    if ctx.input("eval") is not None:
        _, eval_pairs = feedback_triples(ctx.input("eval"), followups, ctx.seed)
        train_triples = triples
    else:
        _, eval_pairs = split_train_eval(pairs, cfg.eval_fraction, ctx.seed, "group", group=lambda p: key(p.prompt))
        held = {key(p.prompt) for p in eval_pairs}
        train_triples = [t for t in triples if key(t[0]) not in held]
    prompts = list(dict.fromkeys(key(p.prompt) for p in eval_pairs))
    if settings.max_eval_prompts and len(prompts) > settings.max_eval_prompts:
        keep = set(prompts[: settings.max_eval_prompts])
        eval_pairs = [p for p in eval_pairs if key(p.prompt) in keep]
    out = ctx.output("reward_model")
    out.mkdir(parents=True, exist_ok=True)
    (out / "followups.json").write_text(json.dumps(followups.to_json(), indent=2))
    kwargs = dict(
        include_context=settings.include_context, max_prefix_tokens=settings.max_prefix_tokens, batch_size=settings.batch_size
    )
    metrics: dict[str, Any] = {"followups": len(followups.texts), "eval_pairs": len(eval_pairs)}
    comparison = []
    if eval_pairs:
        ctx.log.info("FLR zero-shot on %d held-out pairs (%d prompts)", len(eval_pairs), len({key(p.prompt) for p in eval_pairs}))
        zero_shot = FollowupReward.from_pretrained(base, followups, None, cfg.policy().device, **kwargs)
        metrics["pairwise_accuracy_zero_shot"] = pairwise(zero_shot, eval_pairs, ctx)
        metrics.update(baselines(eval_pairs))
        comparison.append(_row("FLR zero-shot", metrics["pairwise_accuracy_zero_shot"], metrics))
        del zero_shot
    adapter = None
    if settings.finetune:
        metrics.update(finetune(ctx, cfg, base, followups, train_triples))
        adapter = "adapter"
        if eval_pairs:
            tuned = FollowupReward.from_pretrained(base, followups, out / "adapter", cfg.policy().device, **kwargs)
            metrics["pairwise_accuracy_finetuned"] = pairwise(tuned, eval_pairs, ctx)
            comparison.append(_row("FLR fine-tuned", metrics["pairwise_accuracy_finetuned"], metrics))
    if eval_pairs:
        metrics["pairwise_accuracy"] = metrics.get("pairwise_accuracy_finetuned", metrics["pairwise_accuracy_zero_shot"])
        (out / "eval.json").write_text(json.dumps({"kind": "followup", "metrics": metrics, "comparison": comparison}, indent=2))
    write_descriptor(
        out,
        FollowupReward.kind,
        base_model=base,
        adapter=adapter,
        include_context=settings.include_context,
        max_prefix_tokens=settings.max_prefix_tokens,
        metrics=metrics,
    )
    return metrics


def _row(what: str, value: float, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "what": what,
        "metric": "pairwise accuracy",
        "model": value,
        "baseline": metrics["baseline_length_accuracy"],
        "baseline_name": "longer reply wins",
    }


def pairwise(rm: FollowupReward, pairs: list, ctx) -> float:
    """Score each distinct (prompt, reply) once, then compare chosen vs rejected."""
    from pipeline.progress import track

    from .metrics import pairwise_accuracy

    replies: dict[tuple[str, str], int] = {}
    items: list[tuple[Any, Any]] = []
    for p in pairs:
        for reply in (p.chosen, p.rejected):
            k = (last_user_text(p.prompt), reply)
            if k not in replies:
                replies[k] = len(items)
                items.append((p.prompt, reply))
    scores = []
    for chunk in track(batched(items, rm.batch_size * 4), desc=f"{ctx.name}: FLR scoring"):
        scores += rm.score(RewardBatch([c[0] for c in chunk], [c[1] for c in chunk])).scalar.tolist()
    chosen = [scores[replies[(last_user_text(p.prompt), p.chosen)]] for p in pairs]
    rejected = [scores[replies[(last_user_text(p.prompt), p.rejected)]] for p in pairs]
    return pairwise_accuracy(chosen, rejected)


def baselines(pairs: list) -> dict[str, float]:
    from .metrics import pairwise_accuracy

    return {
        "baseline_length_accuracy": pairwise_accuracy([len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs]),
        "baseline_random_accuracy": 0.5,
    }


def fit_rows(pairs: list[tuple[str, str]], tokenizer, max_length: int) -> list[dict[str, str]]:
    """(conversation so far, follow-up) as prompt-completion rows within `max_length` tokens: a long
    conversation keeps its last tokens (those next to the reply and the follow-up), since a row cut
    on the right would lose the follow-up, the only tokens trained on (TRL then drops the row)."""
    from pipeline.errors import HeedfulError

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = []
    for prefix, followup in pairs:
        room = max_length - len(tokens(followup))
        ids = tokens(prefix)
        kept, take = prefix, room
        while take >= 1 and len(tokens(kept)) > room:  # decoded at a cut and encoded again, tokens can differ
            kept, take = tokenizer.decode(ids[-take:]), take - 1
        if room >= 1 and len(tokens(kept)) <= room:
            rows.append({"prompt": kept, "completion": followup})
    if pairs and not rows:
        raise HeedfulError(f"train_reward (followup): max_length={max_length} leaves no room for a follow-up turn; raise it")
    if len(rows) < len(pairs):
        log.warning(
            "FLR fine-tuning: %d of %d follow-ups are longer than max_length=%d alone; left out",
            len(pairs) - len(rows),
            len(pairs),
            max_length,
        )
    return rows


def finetune(ctx, cfg, base: str, followups: Followups, triples: list[tuple[Any, Any, str]]) -> dict[str, Any]:
    """LoRA SFT of the follow-up LM: loss on the follow-up turn only (TRL prompt-completion)."""
    from datasets import Dataset
    from trl import SFTConfig

    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.training import fit
    from trainers.fast_sft import FastSFTTrainer

    tokenizer = load_tokenizer(base, padding_side="right")
    fmt = ConversationFormat(tokenizer, cfg.followup.include_context)
    rows = fit_rows([(fmt.prefix(p, r), fmt.followup(f)) for p, r, f in triples], tokenizer, cfg.max_length)
    # `init` (train_reward checked its kind and base): continue its adapter; a zero-shot init has none
    init = ctx.input("init")
    start = init / read_descriptor(init)["adapter"] if init is not None and read_descriptor(init).get("adapter") else None
    ctx.log.info("fine-tuning the follow-up LM on %d feedback turns%s", len(rows), f", continuing {start}" if start else "")

    def build_trainer():
        model = load_causal_lm(base, cfg.policy(), adapter=start, qlora=cfg.lora.qlora, trainable_adapter=start is not None)
        args = SFTConfig(max_length=cfg.max_length, completion_only_loss=True, **cfg.trainer_kwargs(ctx))
        trainer = FastSFTTrainer(  # TRL's SFTTrainer, scoring only the follow-up's tokens on a CPU
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=None if start is not None else cfg.lora.peft_config(),
            fast=cfg.followup.fast,
        )
        if trainer.fast:
            ctx.log.info("only the follow-up tokens through the LM head (trainers/fast_sft.py)")
        return trainer

    metrics = fit(ctx, cfg, build_trainer, output_name="reward_model/adapter")
    metrics["finetune_examples"] = len(rows)
    return metrics


register_kind(
    FollowupReward.kind, FollowupReward.load, FollowupSettings, train, "FLR: likelihood of positive vs negative follow-ups"
)
