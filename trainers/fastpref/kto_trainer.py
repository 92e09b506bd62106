"""FastKTOTrainer: TRL's KTOTrainer on the packed, chunked, reference-cached core.

KTO's step (TRL) runs each row's prompt+reply with gradient, its prompt + mismatched "KL"
reply (another row's reply) without, and the reference on both, every sequence padded to the
batch's longest. Its rows have the DPO core's shape, one prompt and two replies, so they take
the same packing: [prompt | reply | KL reply] with the KL reply restarting its positions after
the prompt and hidden from the reply (packing.py). Here, as in FastDPOTrainer:

- the prompt runs once per row and nothing is padded beyond a row's length;
- log-probs only at the reply tokens, in vocabulary tiles (logps.py);
- the reference's log-probs of both replies come from the on-disk cache (reference.py,
  ref_cache.py), computed once per (model, adapter, data, max_length, tokenizer) and reused
  across epochs, reruns, and the arena's other methods on the same rows.

`kl_in_row` True runs the KL reply in the reply's own packed row: the prompt once more saved, at
the price of the backward pass also running over the KL reply's positions (whose gradient is
zero: TRL's KL term is detached). False runs the KL replies as a second packed batch without
gradient, as TRL does. None (default) chooses per training set: in the row where its prompts
have at least `KL_IN_ROW_PROMPT_RATIO` times the KL replies' tokens. bench/kto_step.py, whole runs:
~40-token prompts before ~215-token replies, in the row took 1.31x and 1.08x the time of apart;
~206-token prompts before ~66-token replies, 0.94x and 0.88x.

Exact for what it covers: loss types "kto" and "apo_zero_unpaired", text only, no MoE aux
loss, sdpa/eager attention, one process. Anything else runs TRL's own step unchanged
(`self.fast` False, `self.fast_off_reason` says why).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from trl import KTOConfig, KTOTrainer

from .kto_loss import KTO_LOSS_TYPES, kto_loss, kto_metrics
from .logps import TILE_ELEMENTS, autocast_forward, packed_logps
from .packing import pack, truncate
from .reference import PackedReference, four_bit_layers_in_train_mode

log = logging.getLogger(__name__)


#: prompt tokens per KL-reply token from which the KL reply goes into the reply's row (measured: 0.19 -> slower, 3.1 -> faster)
KL_IN_ROW_PROMPT_RATIO = 2.0


class PackedUnpairedCollator:
    """TRL's tokenized KTO rows (prompt_ids, completion_ids, KL_completion_ids, label and, when
    cached, ref_logps / ref_KL_logps) into one packed batch of [prompt | reply | KL reply] units,
    or with `kl_in_row` False of [prompt | reply] units beside `kl_batch`, the [prompt | KL reply]
    units packed apart."""

    def __init__(self, pad_token_id: int, max_length: int | None, kl_in_row: bool = False):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.kl_in_row = kl_in_row

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        units = [
            truncate(e["prompt_ids"], e["completion_ids"], e.get("KL_completion_ids", []), self.max_length) for e in examples
        ]
        split = not self.kl_in_row and "KL_completion_ids" in examples[0]
        batch = pack([truncate(u.prompt, u.chosen, [], None) for u in units] if split else units, self.pad_token_id)
        if split:
            batch["kl_batch"] = pack([truncate(u.prompt, u.rejected, [], None) for u in units], self.pad_token_id)
        batch["num_tokens"] = sum(len(u.prompt) + len(u.chosen) for u in units)  # TRL counts the reply's sequence only
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples])
        for key in ("ref_logps", "ref_KL_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return batch


class FastKTOTrainer(PackedReference, KTOTrainer):
    """`KTOTrainer(...)` plus keyword-only options:

    fast          the packed core and the fast CPU LoRA-dropout mask (default True); False is exactly TRL's KTOTrainer
    ref_cache     cache the training set's reference log-probs under `ref_cache_dir`
                  (default `<heedful cache>/cache/ref_logps`); False: a reference forward per step;
                  "auto": cache where the run reads every row at least once (`run_passes`)
    kl_in_row     the KL reply in the reply's packed row (True) or in a second batch without gradient
                  (False); None: in the row where prompts are long (`KL_IN_ROW_PROMPT_RATIO`)
    tile_elements elements of one [tokens, vocab] log-prob tile
    attention     the packed pieces' attention (attention.py): auto, sdpa, varlen, or a varlen kernel
    """

    UNIT_COLUMNS = ("prompt_ids", "completion_ids", "KL_completion_ids")
    REF_COLUMNS = ("ref_logps", "ref_KL_logps")

    args: KTOConfig
    model: Any
    ref_model: Any
    train_dataset: Any

    def __init__(
        self,
        *args: Any,
        fast: bool = True,
        ref_cache: bool | str = True,
        ref_cache_dir: str | Path | None = None,
        kl_in_row: bool | None = None,
        tile_elements: int = TILE_ELEMENTS,
        attention: Any = "auto",
        **kwargs: Any,
    ):
        self.kl_in_row: bool | None = None  # where the KL replies go, once the core is set up
        self._before_trl_init(args, kwargs, fast, attention, ref_cache)
        super().__init__(*args, **kwargs)
        self._after_trl_init(
            fast,
            "KTO",
            lambda: PackedUnpairedCollator(self._tokenizer.pad_token_id, self.args.max_length, self._kl_in_row(kl_in_row)),
            ref_cache,
            ref_cache_dir,
            tile_elements,
        )

    def _kl_in_row(self, asked: bool | None) -> bool:
        """`asked`, else in the row where the training set's prompts are long beside its KL replies
        (their tokens after `max_length` truncation, which cuts replies, never prompts; counted in Arrow)."""
        if asked is None:
            import pyarrow.compute as pc  # type: ignore[import-untyped]  # datasets' own storage
            from datasets import Dataset

            data = self.train_dataset
            if not isinstance(data, Dataset) or "KL_completion_ids" not in data.column_names or not len(data):
                asked = False  # no KL replies (apo_zero_unpaired)
            else:
                table = data.select_columns(["prompt_ids", "KL_completion_ids"]).with_format("arrow")[:]
                prompt = pc.list_value_length(table["prompt_ids"])
                kl = pc.list_value_length(table["KL_completion_ids"])
                if self.args.max_length is not None:
                    kl = pc.min_element_wise(kl, pc.subtract(self.args.max_length, prompt))
                asked = pc.sum(prompt).as_py() >= KL_IN_ROW_PROMPT_RATIO * max(pc.sum(kl).as_py(), 1)
        self.kl_in_row = asked
        return asked

    def _unsupported(self) -> str | None:
        if self.loss_type not in KTO_LOSS_TYPES:
            return f"loss_type {self.loss_type!r} (fast: {sorted(KTO_LOSS_TYPES)})"
        return self._common_unsupported({"MoE aux loss": self.aux_loss_enabled})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.fast:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        model = self.accelerator.unwrap_model(model)
        labels = inputs["label"]
        n = labels.shape[0]
        kl_batch = inputs.get("kl_batch")  # the KL replies packed apart (kl_in_row False)
        with autocast_forward(self.accelerator, model):
            logps = packed_logps(model, inputs, self.tile_elements, attention=self.attention)
            kl_logps = None
            if self.calculate_KL and kl_batch is not None:
                with torch.no_grad():
                    kl_logps = packed_logps(model, kl_batch, self.tile_elements, with_metrics=False, attention=self.attention)
                kl_logps = kl_logps.seq_logps[:n]
            elif self.calculate_KL:
                kl_logps = logps.seq_logps[n:].detach()
        if "ref_logps" in inputs:
            ref, ref_kl = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:  # not cached (a run shorter than one pass): the reference inside the step, as TRL's
            ref, ref_kl = self.reference_logps(model, inputs)
            if kl_batch is not None and self.calculate_KL:
                ref_kl = self.reference_logps(model, kl_batch)[0]
        out = kto_loss(
            logps.seq_logps[:n],
            ref,
            labels,
            kl_logps,
            ref_kl if self.calculate_KL else None,
            self.beta,
            self.loss_type,
            self.desirable_weight,
            self.undesirable_weight,
        )
        if mode == "train":
            self._total_train_tokens += inputs["num_tokens"]
        for key, value in kto_metrics(logps, labels, out).items():
            self._metrics[mode][key].append(value)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (out.loss, None) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.fast:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), four_bit_layers_in_train_mode(self.model):
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
