"""FastDPOTrainer: TRL's DPOTrainer with the packed, chunked, reference-cached core.

Everything but the step's arithmetic stays TRL's (dataset tokenization, optimizer,
checkpoints, resume, logging, callbacks): only the collator (packed rows) and `compute_loss`
change, and the reference log-probs of the training set come from `RefLogpCache`.

The core is exact for what it covers: loss types "sigmoid" and "sft" (RPO's NLL term, via
`loss_weights`), reverse-KL, no length-desensitization (`ld_alpha`), no WPO weighting, no MoE
aux loss, text only, keep_start truncation, sdpa/eager attention, one process. Anything else
runs TRL's own path unchanged (`self.fast` is False and `self.fast_off_reason` says why).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import hash_module, use_adapter

from trainers.lora_dropout import use_cpu_lora_dropout

from .attention import ATTENTION_CHOICES
from .logps import TILE_ELEMENTS, body_then_head, packed_logps, unwrap_peft
from .loss import SUPPORTED_LOSS_TYPES, dpo_loss, trl_metrics
from .packing import PackedPreferenceCollator, pack, truncate
from .ref_cache import RefLogpCache, base_model_identity, cache_key, data_fingerprint, reference_adapter_identity

log = logging.getLogger(__name__)


class FastDPOTrainer(DPOTrainer):
    """`DPOTrainer(...)` plus keyword-only options:

    fast                 the packed core and the fast CPU LoRA-dropout mask (default True);
                         False is exactly TRL's DPOTrainer
    ref_cache            cache the training set's reference log-probs under `ref_cache_dir`
                         (default `<heedful cache>/cache/ref_logps`); False: a reference forward per step
    tile_elements        elements of one [tokens, vocab] log-prob tile
    probe_checkpointing  measure whether gradient checkpointing is faster here (trainers/grad_ckpt_probe.py),
                         cached in `probe_cache_path` under `model_name`; False keeps `args`' setting
    attention            the packed pieces' attention (attention.py): auto (varlen kernels on a CUDA GPU
                         in fp16/bf16, else SDPA), sdpa, varlen (insist), or a varlen kernel
    """

    args: DPOConfig
    model: Any
    ref_model: Any
    train_dataset: Any

    def __init__(
        self,
        *args: Any,
        fast: bool = True,
        ref_cache: bool = True,
        ref_cache_dir: str | Path | None = None,
        tile_elements: int = TILE_ELEMENTS,
        probe_checkpointing: bool = False,
        probe_cache_path: str | Path | None = None,
        model_name: str | None = None,
        attention: Any = "auto",
        **kwargs: Any,
    ):
        if not callable(attention) and attention not in ATTENTION_CHOICES:  # before TRL's set-up, not after it
            raise ValueError(f"attention: {attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        self.attention = attention
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        self._trl_precompute = bool(config is not None and config.precompute_ref_log_probs)
        if fast and config is not None and config.precompute_ref_log_probs:
            config.precompute_ref_log_probs = False  # our cache replaces TRL's per-trainer precompute
        super().__init__(*args, **kwargs)
        self.tile_elements = tile_elements
        self.ref_forward_calls = 0
        self.ref_cache_key: str | None = None
        # seconds spent computing reference log-probs before training: 0.0 when all came from the cache,
        # None when this trainer computes them otherwise (TRL's own path: inside each step)
        self.ref_cache_seconds: float | None = None
        self.fast_off_reason = None if fast else "fast: false"
        if fast:
            self.fast_off_reason = self._unsupported()
        self.fast = self.fast_off_reason is None
        if not self.fast:
            if fast:
                log.warning("fast DPO core off (%s): TRL's own path runs", self.fast_off_reason)
            if self._trl_precompute and not self.precompute_ref_logps:  # give back what the user asked TRL for
                self.args.precompute_ref_log_probs = self.precompute_ref_logps = True
                self._precompute_model_hash = hash_module(self.ref_model or self.model)
                self.train_dataset = self._precompute_ref_logps(
                    self.train_dataset, "train", self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
                )
            return
        use_cpu_lora_dropout(self.model)  # the same dropout, its mask drawn fast (trainers/lora_dropout.py)
        self.data_collator = PackedPreferenceCollator(self._tokenizer.pad_token_id, self.args.max_length)
        if ref_cache or self._trl_precompute:  # precompute_ref_log_probs=True asks for what the cache does
            self.train_dataset = self._with_cached_ref_logps(self.train_dataset, RefLogpCache(ref_cache_dir))
        if probe_checkpointing:
            self.probe_checkpointing(model_name, probe_cache_path)

    # ------------------------------------------------------------------ what the core covers

    def _unsupported(self) -> str | None:
        if not set(self.loss_types) <= SUPPORTED_LOSS_TYPES:
            return f"loss_type {self.loss_types} (fast: {sorted(SUPPORTED_LOSS_TYPES)})"
        checks = {
            "f_divergence_type != reverse_kl": self.f_divergence_type != "reverse_kl",
            "ld_alpha is set": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "MoE aux loss": self.aux_loss_enabled,
            "vision data": self._is_vision_dataset,
            "truncation_mode != keep_start": self.args.truncation_mode != "keep_start",
            "sync_ref_model": self.args.sync_ref_model,
            "several processes": self.accelerator.num_processes > 1,
            "padding-free/other attention": self._attn_implementation() not in ("sdpa", "eager"),
        }
        return next((why for why, bad in checks.items() if bad), None) or body_then_head(
            self.accelerator.unwrap_model(self.model)
        )

    def _attn_implementation(self) -> str:
        model = self.accelerator.unwrap_model(self.model)
        base = unwrap_peft(model)
        return getattr(base.config, "_attn_implementation", None) or "sdpa"

    # ------------------------------------------------------------------ reference

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
        """The reference's chosen and rejected log-probs of a packed batch."""
        self.ref_forward_calls += 1
        with self._reference(model) as ref, self.accelerator.autocast():
            chosen, rejected = packed_logps(
                ref, batch, self.tile_elements, with_metrics=False, attention=self.attention
            ).chosen_rejected()
            return chosen.detach(), rejected.detach()

    def _with_cached_ref_logps(self, dataset, cache: RefLogpCache):
        """`dataset` with ref_chosen_logps/ref_rejected_logps columns, from the cache or computed once."""
        units = [truncate(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], self.args.max_length) for r in dataset]
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
            chosen, rejected = self._compute_ref_logps(units)
            self.ref_cache_seconds = time.perf_counter() - started
            cache.save(self.ref_cache_key, chosen, rejected)
            log.info("reference log-probs of %d pairs computed and cached (%s)", len(units), self.ref_cache_key)
        else:
            chosen, rejected = found
            self.ref_cache_seconds = 0.0
            log.info("reference log-probs of %d pairs reused from the cache (%s)", len(units), self.ref_cache_key)
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            if name in dataset.column_names:
                dataset = dataset.remove_columns(name)
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps", rejected.tolist())

    def _compute_ref_logps(self, units) -> tuple[Any, Any]:
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        device = self.accelerator.device
        chosen, rejected = [], []
        model = self.model.to(device) if self.ref_model is None else self.model
        for start in range(0, len(units), batch_size):
            batch = pack(units[start : start + batch_size], self._tokenizer.pad_token_id)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            c, r = self.reference_logps(model, batch)
            chosen.append(c.double().cpu())
            rejected.append(r.double().cpu())
        return torch.cat(chosen).numpy(), torch.cat(rejected).numpy()

    # ------------------------------------------------------------------ gradient checkpointing

    def probe_checkpointing(self, model_name: str | None = None, cache_path: str | Path | None = None) -> bool:
        """Measure (once per host, model and shape; trainers/grad_ckpt_probe.py) whether checkpointing makes a
        step of the longest batch of the training set faster, and train with the faster setting. A run too
        short for the probe to pay off keeps the current setting unless the answer is cached."""
        from trainers.grad_ckpt_probe import choose_gradient_checkpointing, packed_dpo_step, set_checkpointing, shape_bucket

        ds = self.train_dataset
        sizes = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds]
        longest = sorted(range(len(sizes)), key=lambda i: -sizes[i])[: self.args.per_device_train_batch_size]
        units = [truncate(ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"], self.args.max_length) for i in longest]
        device = self.accelerator.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack(units, self._tokenizer.pad_token_id).items()}
        model = self.accelerator.unwrap_model(self.model).to(device)
        base = unwrap_peft(model)
        bucket = shape_bucket(device.type, str(base.dtype), *batch["input_ids"].shape)
        name = model_name or str(getattr(base.config, "_name_or_path", "") or type(base).__name__)
        on = choose_gradient_checkpointing(
            name,
            bucket,
            packed_dpo_step(model, batch, self.attention),
            cache_path=Path(cache_path) if cache_path else None,
            log=log,
            run_steps=self.planned_steps(),
            default=self._args_checkpointing(),
        )
        set_checkpointing(model, on)
        for field in ("activation_checkpointing", "gradient_checkpointing"):
            if hasattr(self.args, field):
                setattr(self.args, field, on)
        self.checkpointing_chosen = on
        return on

    def _args_checkpointing(self) -> bool:
        """The checkpointing setting in `args` (transformers 5 renamed the field)."""
        for field in ("activation_checkpointing", "gradient_checkpointing"):
            if hasattr(self.args, field):
                return bool(getattr(self.args, field))
        return False

    def planned_steps(self) -> int:
        """Optimizer steps this run will take (max_steps, else epochs x batches per epoch)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return math.ceil(math.ceil(len(self.train_dataset) / per_step) * self.args.num_train_epochs)

    # ------------------------------------------------------------------ the step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.fast:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        model = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():  # what accelerate's wrapped forward does for TRL under bf16/fp16
            logps = packed_logps(model, inputs, self.tile_elements, attention=self.attention)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.reference_logps(model, inputs)
        out = dpo_loss(logps, ref_chosen, ref_rejected, self.beta, self.loss_types, self.loss_weights)
        metrics = trl_metrics(logps, out)
        if mode == "train":
            self._total_train_tokens += inputs["num_tokens"]
        metrics["num_tokens"] = self._total_train_tokens
        for key, value in metrics.items():
            if key == "num_tokens":
                self._metrics[mode][key] = [value]
            else:
                self._metrics[mode][key].append(value)
        return (out.loss, None) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.fast:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
