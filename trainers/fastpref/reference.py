"""The frozen reference of a packed trainer: its log-probs per batch, and once per dataset from the cache.

Shared by `FastDPOTrainer` and `FastKTOTrainer` (a mixin on a TRL trainer): both pack a row as
[prompt | first reply | second reply] (DPO: chosen, rejected; KTO: the reply, the mismatched
KL reply), so the reference's two log-probs per row, its cache key and its forward passes are
the same code. The subclass names its dataset columns (`UNIT_COLUMNS`, `REF_COLUMNS`).

Why a mixin and not a base trainer: each subclass is its TRL trainer (DPOTrainer, KTOTrainer)
with everything but the step left as TRL has it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any

import torch
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .logps import attention_window, first_unsupported, packed_logps, unwrap_peft
from .packing import Unit, pack, truncate
from .ref_cache import RefLogpCache, base_model_identity, cache_key, data_fingerprint, reference_adapter_identity

log = logging.getLogger(__name__)


class PackedReference:
    """The reference half of a packed trainer. Needs TRL's `args`, `accelerator`, `model`,
    `ref_model`, `_tokenizer`, and the subclass's `attention` and `tile_elements`."""

    #: the dataset's token-id columns of one unit: prompt, first reply, second reply (absent: empty)
    UNIT_COLUMNS: tuple[str, str, str] = ("prompt_ids", "chosen_ids", "rejected_ids")
    #: the columns the reference's log-probs of the two replies go to
    REF_COLUMNS: tuple[str, str] = ("ref_chosen_logps", "ref_rejected_logps")

    args: Any
    accelerator: Any
    model: Any
    ref_model: Any
    train_dataset: Any
    eval_dataset: Any
    precompute_ref_logps: bool
    _precompute_model_hash: Any
    _tokenizer: Any
    data_collator: Any
    attention: Any
    tile_elements: int
    ref_forward_calls: int
    ref_cache_key: str | None
    ref_cache_seconds: float | None

    fast: bool
    fast_off_reason: str | None
    _trl_precompute: bool

    def _before_trl_init(self, args: tuple, kwargs: dict, fast: bool, attention: Any, ref_cache: bool | str) -> None:
        """Before TRL's __init__: check `attention` and `ref_cache` (not after TRL's set-up), and take over a
        `precompute_ref_log_probs=True` (the cache does it, without TRL's hash of the model)."""
        from .attention import ATTENTION_CHOICES

        if not callable(attention) and attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: {attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if ref_cache not in (True, False, "auto"):
            raise ValueError(f"ref_cache: {ref_cache!r} is not True, False or 'auto'")
        self.attention = attention
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        self._trl_precompute = bool(config is not None and config.precompute_ref_log_probs)
        if fast and config is not None and self._trl_precompute:
            config.precompute_ref_log_probs = False

    def _after_trl_init(
        self, fast: bool, method: str, make_collator, ref_cache: bool | str, ref_cache_dir, tile_elements: int
    ) -> None:
        """After TRL's __init__: the core where it covers the settings (its collator, the CPU LoRA-dropout
        mask, the cached reference), else TRL's own path with what was asked of TRL given back."""
        from trainers.lora_dropout import use_cpu_lora_dropout

        self.tile_elements = tile_elements
        self.ref_forward_calls = 0
        self.ref_cache_key = None
        # seconds spent computing reference log-probs before training: 0.0 when all came from the cache,
        # None when this trainer computes them otherwise (inside each step, or TRL's own path)
        self.ref_cache_seconds = None
        self.fast_off_reason = self._unsupported() if fast else "fast: false"  # type: ignore[attr-defined]
        self.fast = self.fast_off_reason is None
        if not self.fast:
            if fast:
                log.warning("fast %s core off (%s): TRL's own path runs", method, self.fast_off_reason)
            if self._trl_precompute and not self.precompute_ref_logps:  # give back what the user asked TRL for
                self._restore_trl_precompute()
            return
        use_cpu_lora_dropout(self.model)  # the same dropout, its mask drawn fast (trainers/lora_dropout.py)
        self.data_collator = make_collator()
        if ref_cache == "auto":
            ref_cache = self.run_passes() >= 1
        if ref_cache or self._trl_precompute:  # precompute_ref_log_probs=True asks for what the cache does
            self.train_dataset = self._with_cached_ref_logps(self.train_dataset, RefLogpCache(ref_cache_dir))

    def run_passes(self) -> float:
        """How many times this run reads each training row: from TRL's `args` as the trainer has them (a
        stage's `trainer_args` overrides included) and the training set as TRL kept it (after it drops rows
        whose prompt fills `max_length`). `ref_cache="auto"` caches the reference of every row where this is
        >= 1: computing it for the whole set then costs no more than the steps would, and a rerun or another
        method on the same rows finds it; a few steps over many rows compute it inside the steps instead."""
        args = self.args
        rows, accumulation = len(self.train_dataset), args.gradient_accumulation_steps
        per_batch = args.per_device_train_batch_size * args.world_size
        batches = max(rows // per_batch if args.dataloader_drop_last else math.ceil(rows / per_batch), 1)
        steps_per_epoch = math.ceil(batches / accumulation)  # HF steps an epoch's last, partial group too
        if args.max_steps > 0:
            steps = args.max_steps
        elif args.num_train_epochs >= 1:
            return float(args.num_train_epochs)
        else:  # a fraction of an epoch: HF rounds its optimizer steps up
            steps = math.ceil(args.num_train_epochs * steps_per_epoch)
        epochs, rest = divmod(steps, steps_per_epoch)  # rest < steps_per_epoch: rest x accumulation < batches
        return epochs + rest * accumulation / batches

    def reference_origin(self) -> str:
        """Where the core's reference log-probs come from, for a stage's log line."""
        if self.ref_cache_seconds is None:
            return "inside each step, for the rows it reads"
        if self.ref_cache_seconds == 0:
            return "of every row reused from the cache"
        return f"of every row computed in {self.ref_cache_seconds:.1f} s"

    def unit(self, example: dict) -> Unit:
        """One dataset row as a packed unit, truncated as TRL truncates (keep_start)."""
        prompt, first, second = self.UNIT_COLUMNS
        return truncate(example[prompt], example[first], example.get(second, []), self.args.max_length)

    def _common_unsupported(self, checks: dict[str, bool]) -> str | None:
        """The first of `checks` (why: is unsupported) that holds, then what every packed trainer needs:
        among them attention over the whole causal context within `max_length` (the packed pieces apply
        no sliding window: logps.attention_window) and logits that are the head's product
        (logps.body_then_head: no soft-capping or logit scale, which the chunked log-softmax would skip)."""
        from datasets import Dataset

        model = self.accelerator.unwrap_model(self.model)
        window = attention_window(model, self.args.max_length)
        checks = {
            **checks,
            "vision data": self._is_vision_dataset,  # type: ignore[attr-defined]
            "streaming (IterableDataset) data": not isinstance(self.train_dataset, Dataset),
            "sync_ref_model": self.args.sync_ref_model,
            "several processes": self.accelerator.num_processes > 1,
            "padding-free/other attention": self._attn_implementation() not in ("sdpa", "eager"),
            # TRL's evaluation hands compute_metrics the full [rows, length, vocab] logits of its padded
            # batches; the core neither builds them nor pads its batches that way
            "a compute_metrics (it reads TRL's full logits)": getattr(self, "compute_metrics", None) is not None,
            str(window): window is not None,
        }
        return first_unsupported(checks, model)

    def _attn_implementation(self) -> str:
        base = unwrap_peft(self.accelerator.unwrap_model(self.model))
        return getattr(base.config, "_attn_implementation", None) or "sdpa"

    @contextlib.contextmanager
    def _reference(self, model):
        """Forward passes in this block are the frozen reference's (TRL's choice of reference)."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                yield self.ref_model
                return
            unwrapped = self.accelerator.unwrap_model(model)
            if not hasattr(unwrapped, "peft_config"):
                raise ValueError("no reference: pass ref_model or train a PEFT adapter")
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                yield unwrapped

    def _reference_adapter(self) -> str | None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        return "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None

    def reference_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's log-probs of a packed batch's first and second replies."""
        self.ref_forward_calls += 1
        with self._reference(model) as ref, self.accelerator.autocast():
            first, second = packed_logps(
                ref, batch, self.tile_elements, with_metrics=False, attention=self.attention
            ).chosen_rejected()
            return first.detach(), second.detach()

    def _with_cached_ref_logps(self, dataset, cache: RefLogpCache):
        """`dataset` with the two `REF_COLUMNS`, from the cache or computed once."""
        units = [self.unit(r) for r in dataset]
        ref_model = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)
        tokenizer = f"{getattr(self._tokenizer, 'name_or_path', '')}|{len(self._tokenizer)}"
        self.ref_cache_key = cache_key(
            base=base_model_identity(ref_model),
            adapter=reference_adapter_identity(ref_model, self._reference_adapter()),
            data=data_fingerprint(units),
            max_length=self.args.max_length,
            tokenizer=tokenizer,
            precision=str(self.accelerator.mixed_precision),
        )
        found = cache.load(self.ref_cache_key, len(units))
        if found is None:
            started = time.perf_counter()
            first, second = self._compute_ref_logps(units)
            self.ref_cache_seconds = time.perf_counter() - started
            cache.save(self.ref_cache_key, first, second)
            log.info("reference log-probs of %d rows computed and cached (%s)", len(units), self.ref_cache_key)
        else:
            first, second = found
            self.ref_cache_seconds = 0.0
            log.info("reference log-probs of %d rows reused from the cache (%s)", len(units), self.ref_cache_key)
        for name in self.REF_COLUMNS:
            if name in dataset.column_names:
                dataset = dataset.remove_columns(name)
        for name, values in zip(self.REF_COLUMNS, (first, second), strict=True):
            dataset = dataset.add_column(name, values.tolist())
        return dataset

    def _compute_ref_logps(self, units) -> tuple[Any, Any]:
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        device = self.accelerator.device
        first, second = [], []
        model = self.model.to(device) if self.ref_model is None else self.model
        with four_bit_layers_in_train_mode(model):
            for start in range(0, len(units), batch_size):
                batch = pack(units[start : start + batch_size], self._tokenizer.pad_token_id)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                a, b = self.reference_logps(model, batch)
                first.append(a.double().cpu())
                second.append(b.double().cpu())
        return torch.cat(first).numpy(), torch.cat(second).numpy()

    def _restore_trl_precompute(self) -> None:
        """The core is off (unsupported settings): do what TRL's __init__ does for the
        `precompute_ref_log_probs=True` the core had taken over (and refuses with it)."""
        from trl.trainer.utils import hash_module

        if self.args.sync_ref_model:
            raise ValueError("sync_ref_model=True cannot be used with precompute_ref_log_probs=True (TRL's rule)")
        if self._is_vision_dataset:  # type: ignore[attr-defined]
            raise ValueError("precompute_ref_log_probs=True is not supported for vision datasets (TRL's rule)")
        self.args.precompute_ref_log_probs = self.precompute_ref_logps = True
        self._precompute_model_hash = hash_module(self.ref_model or self.model)
        size = self.args.precompute_ref_batch_size
        precompute = self._precompute_ref_logps  # type: ignore[attr-defined]
        with four_bit_layers_in_train_mode(self.ref_model or self.model):
            self.train_dataset = precompute(self.train_dataset, "train", size or self.args.per_device_train_batch_size)
            evaluation = getattr(self, "eval_dataset", None)
            if isinstance(evaluation, dict):
                self.eval_dataset = {
                    n: precompute(d, n, size or self.args.per_device_eval_batch_size) for n, d in evaluation.items()
                }
            elif evaluation is not None:
                self.eval_dataset = precompute(evaluation, "eval", size or self.args.per_device_eval_batch_size)


@contextlib.contextmanager
def four_bit_layers_in_train_mode(model):
    """bitsandbytes' 4-bit layers (QLoRA) in train mode for forward passes without gradient (the
    reference cache, TRL's precompute, evaluation).

    Why: on a CPU with AVX512-BF16, a 4-bit layer called in eval mode with an input that needs no
    gradient repacks its weights in place into an inference layout (bitsandbytes 0.50,
    `Linear4bit.forward`), after which every call, training included, takes an op without a
    backward: the LoRA adapters below it would get no gradient. A model fresh from
    `from_pretrained` is in eval mode when the trainer computes the cache, and `evaluate()` puts it
    there. Train mode changes nothing else a 4-bit layer computes; only bitsandbytes' own layers are
    switched, not PEFT's wrappers of them or any dropout. Without bitsandbytes imported there are none."""
    bnb = sys.modules.get("bitsandbytes")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)] if bnb is not None else []
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.training = mode
