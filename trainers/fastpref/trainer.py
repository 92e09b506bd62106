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

import logging
import math
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from .logps import TILE_ELEMENTS, autocast_forward, packed_logps, unwrap_peft
from .loss import SUPPORTED_LOSS_TYPES, dpo_loss, trl_metrics
from .packing import PackedPreferenceCollator, pack
from .reference import PackedReference, four_bit_layers_in_train_mode

log = logging.getLogger(__name__)


class FastDPOTrainer(PackedReference, DPOTrainer):
    """`DPOTrainer(...)` plus keyword-only options:

    fast                 the packed core and the fast CPU LoRA-dropout mask (default True);
                         False is exactly TRL's DPOTrainer
    ref_cache            cache the training set's reference log-probs under `ref_cache_dir`
                         (default `<heedful cache>/cache/ref_logps`); False: a reference forward per step;
                         "auto": cache where the run reads every row at least once (`run_passes`)
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
        ref_cache: bool | str = True,
        ref_cache_dir: str | Path | None = None,
        tile_elements: int = TILE_ELEMENTS,
        probe_checkpointing: bool = False,
        probe_cache_path: str | Path | None = None,
        model_name: str | None = None,
        attention: Any = "auto",
        **kwargs: Any,
    ):
        self._before_trl_init(args, kwargs, fast, attention, ref_cache)
        super().__init__(*args, **kwargs)
        self._after_trl_init(
            fast,
            "DPO",
            lambda: PackedPreferenceCollator(self._tokenizer.pad_token_id, self.args.max_length),
            ref_cache,
            ref_cache_dir,
            tile_elements,
        )
        if self.fast and probe_checkpointing:
            self.probe_checkpointing(model_name, probe_cache_path)

    # ------------------------------------------------------------------ what the core covers

    def _unsupported(self) -> str | None:
        if not set(self.loss_types) <= SUPPORTED_LOSS_TYPES:
            return f"loss_type {self.loss_types} (fast: {sorted(SUPPORTED_LOSS_TYPES)})"
        return self._common_unsupported(
            {
                "f_divergence_type != reverse_kl": self.f_divergence_type != "reverse_kl",
                "ld_alpha is set": self.ld_alpha is not None,
                "use_weighting": self.use_weighting,
                "MoE aux loss": self.aux_loss_enabled,
                "truncation_mode != keep_start": self.args.truncation_mode != "keep_start",
            }
        )

    # ------------------------------------------------------------------ gradient checkpointing

    def probe_checkpointing(self, model_name: str | None = None, cache_path: str | Path | None = None) -> bool:
        """Measure (once per host, model and shape; trainers/grad_ckpt_probe.py) whether checkpointing makes a
        step of the longest batch of the training set faster, and train with the faster setting. A run too
        short for the probe to pay off keeps the current setting unless the answer is cached."""
        from trainers.grad_ckpt_probe import choose_gradient_checkpointing, packed_dpo_step, set_checkpointing, shape_bucket

        ds = self.train_dataset
        sizes = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds]
        longest = sorted(range(len(sizes)), key=lambda i: -sizes[i])[: self.args.per_device_train_batch_size]
        units = [self.unit(ds[i]) for i in longest]
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
        with autocast_forward(self.accelerator, model):  # accelerate's autocast, as TRL's forward runs under it
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
        with torch.no_grad(), self.compute_loss_context_manager(), four_bit_layers_in_train_mode(self.model):
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
