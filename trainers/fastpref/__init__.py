"""fastpref: an exact, faster preference core on top of TRL's DPOTrainer and KTOTrainer.

Same loss, gradients and logged metrics as TRL's sigmoid DPO (and its "sft" RPO term) and
TRL's KTO (kto, apo_zero_unpaired), by doing less work per step:

- packing.py   one row per pair as [prompt | chosen | rejected]: the prompt runs once, the
               rejected reply restarts its position ids at the prompt length and a 4D mask
               hides the chosen reply from it; short pairs share a row block-diagonally.
- attention.py the same attention as that mask, computed as two causal pieces per unit (SDPA
               skips what the mask would hide instead of scoring the full square).
- logps.py     log-probabilities of the completion tokens only, in token chunks over the
               49k vocabulary (no [tokens, vocab] log-softmax kept for backward).
- loss.py      TRL's sigmoid DPO loss, its rewards/metrics, and the optional NLL (RPO) term.
- kto_loss.py  TRL's KTO loss (its KL estimate from mismatched replies) and its metrics.
- ref_cache.py reference log-probs computed once per (model, adapter, data, max_length,
               tokenizer) and reused from disk across epochs, reruns and methods.
- reference.py the reference's forward passes and the cache, shared by both trainers.
- trainer.py   `FastDPOTrainer(DPOTrainer)`: TRL's checkpointing/resume/logging, this core,
               and, where LoRA dropout is on (TRL turns it off unless `disable_dropout=False`),
               its CPU mask drawn by trainers/lora_dropout.py.
- kto_trainer.py `FastKTOTrainer(KTOTrainer)`: rows packed as [prompt | reply | KL reply].

Imports nothing heavy at package import; the modules import torch.
"""
