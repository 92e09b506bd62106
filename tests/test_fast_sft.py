"""FastSFTTrainer against TRL's SFTTrainer on `tiny`: the same loss, LoRA gradients and logged
metrics for the same batch (prompt-completion rows, completion-only loss, padding), and TRL's
own step wherever the labelled-positions core does not apply."""

from __future__ import annotations

import pytest
import torch

from .conftest import move_lora_b

ROWS = [
    {"prompt": "How do I boil an egg so the yolk stays soft?", "completion": " Six minutes in boiling water."},
    {"prompt": "Name a prime.", "completion": " Seven, and also eleven if you want a second one."},
    {"prompt": "Say hi in French, please, and keep it short.", "completion": " Salut."},
]


def make_trainer(trainer_class, out, rows=ROWS, perturb=True, **kwargs):
    from datasets import Dataset
    from trl import SFTConfig

    from pipeline.models import LoraSettings, load_causal_lm, load_tokenizer

    settings = {
        "max_length": 48,
        "completion_only_loss": True,
        "use_cpu": True,
        "bf16": False,  # fp32 on the CPU, as heedful's stages train where the CPU has no bf16 units (TRL defaults to bf16)
        "report_to": "none",
        "per_device_train_batch_size": len(rows),
        **kwargs.pop("sft", {}),
    }
    args = SFTConfig(output_dir=str(out), **settings)
    torch.manual_seed(0)
    trainer = trainer_class(
        model=load_causal_lm("tiny"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer("tiny", padding_side="right"),
        peft_config=LoraSettings(r=4, alpha=8, dropout=0.0).peft_config(),
        **kwargs,
    )
    if perturb:  # LoRA's B starts at zero: move it so both factors' gradients are non-trivial
        move_lora_b(trainer.model)
    return trainer


def loss_and_grads(trainer, batch, num_items_in_batch=None):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items_in_batch", [None, 40], ids=["per-batch-mean", "accumulation-count"])
def test_loss_gradients_and_metrics_equal_trl(tmp_path, tiny_model_path, num_items_in_batch):
    from trl import SFTTrainer

    from trainers.fast_sft import FastSFTTrainer

    trl = make_trainer(SFTTrainer, tmp_path / "trl")
    fast = make_trainer(FastSFTTrainer, tmp_path / "fast")
    assert fast.fast, fast.fast_off_reason
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(ROWS))])
    labelled = (batch["labels"][:, 1:] != -100).sum(1)
    assert (batch["attention_mask"] == 0).any() and (labelled < batch["attention_mask"].sum(1) - 1).all()  # padding, prompts

    # the random `tiny` model's top-1 is never the text's next token: make some labels its argmax, so
    # mean_token_accuracy is neither 0 nor 1 and the two trainers' counts are compared for real
    with torch.no_grad():
        argmax = fast.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    positions = (batch["labels"][:, 1:] != -100).nonzero()[::2]
    batch["labels"][positions[:, 0], positions[:, 1] + 1] = argmax[positions[:, 0], positions[:, 1]]

    trl_loss, trl_grads = loss_and_grads(trl, batch, num_items_in_batch)
    fast_loss, fast_grads = loss_and_grads(fast, batch, num_items_in_batch)
    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert trl_grads.keys() == fast_grads.keys() and len(fast_grads) > 0
    for name, grad in trl_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert fast._metrics["train"][key][-1] == pytest.approx(trl._metrics["train"][key][-1], abs=1e-4), key
    assert 0.2 < fast._metrics["train"]["mean_token_accuracy"][-1] < 0.8

    # by hand: the mean NLL of the labelled (completion) tokens, the prompt and padding left out
    model = fast.model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = -torch.log_softmax(logits, -1)[mask].gather(1, labels[mask][:, None]).sum()
    expected = nll / (mask.sum() if num_items_in_batch is None else num_items_in_batch)
    assert fast_loss.item() == pytest.approx(expected.item(), abs=1e-4)


def test_under_bf16_autocast_it_stays_as_close_to_trl_as_trl_is_to_fp32(tmp_path, tiny_model_path):
    """On a CPU with bf16 units heedful trains under bf16 autocast (the precision probe), and there the
    two paths round differently: TRL's head scores every position in bf16, the core only the labelled
    ones, in tiles. What a user gets must still be TRL's step up to bf16's own noise: the loss within
    1e-3, and each LoRA gradient no further from TRL's than TRL's bf16 gradient is from fp32 (x2).
    Both under `accelerator.autocast()`, as `train()` runs TRL's forward (measured on `tiny`: 0.9%
    apart, 1.3% from fp32)."""
    from trl import SFTTrainer

    from trainers.fast_sft import FastSFTTrainer

    def autocast_loss_and_grads(trainer, batch):
        model = trainer.model
        model.train()
        model.zero_grad()
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def apart(grads, reference):  # the largest relative difference over the LoRA parameters
        return max(((grads[n] - reference[n]).norm() / reference[n].norm()).item() for n in reference)

    trl = make_trainer(SFTTrainer, tmp_path / "trl", sft={"bf16": True})
    fast = make_trainer(FastSFTTrainer, tmp_path / "fast", sft={"bf16": True})
    fp32 = make_trainer(SFTTrainer, tmp_path / "fp32")
    assert fast.fast, fast.fast_off_reason
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(ROWS))])
    trl_loss, trl_grads = autocast_loss_and_grads(trl, batch)
    fast_loss, fast_grads = autocast_loss_and_grads(fast, batch)
    fp32_loss, fp32_grads = autocast_loss_and_grads(fp32, batch)
    assert apart(trl_grads, fp32_grads) > 1e-4  # bf16 did round (else this compares fp32 with fp32)
    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=1e-3)
    assert apart(fast_grads, trl_grads) < min(2 * apart(trl_grads, fp32_grads), 0.05)
    assert fast._metrics["train"]["entropy"][-1] == pytest.approx(trl._metrics["train"]["entropy"][-1], abs=5e-3)
    assert fast._metrics["train"]["num_tokens"][-1] == trl._metrics["train"]["num_tokens"][-1]


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(0)], ids=["per-batch-mean", "empty-accumulation-window"])
def test_a_batch_without_labels_is_a_connected_zero(tmp_path, tiny_model_path, num_items_in_batch):
    from trainers.fast_sft import FastSFTTrainer

    fast = make_trainer(FastSFTTrainer, tmp_path / "fast")
    batch = fast.data_collator([fast.train_dataset[i] for i in range(len(ROWS))])
    batch["labels"][:] = -100
    loss, grads = loss_and_grads(fast, batch, num_items_in_batch)
    assert loss.item() == 0.0 and all(g.abs().max() == 0 for g in grads.values())
    assert fast._metrics["train"]["mean_token_accuracy"][-1] == 0.0


def test_unsupported_settings_run_trls_own_step(tmp_path, tiny_model_path):
    from trainers.fast_sft import FastSFTTrainer

    assert make_trainer(FastSFTTrainer, tmp_path / "off", fast=False).fast_off_reason == "fast=False"
    dft = make_trainer(FastSFTTrainer, tmp_path / "dft", sft={"loss_type": "dft"})
    assert not dft.fast and "loss_type 'dft'" in dft.fast_off_reason
    smoothed = make_trainer(FastSFTTrainer, tmp_path / "smooth", sft={"label_smoothing_factor": 0.1})
    assert not smoothed.fast and smoothed.fast_off_reason == "label smoothing"
    # TRL's path is the one taken: same loss as SFTTrainer with the same settings
    batch = dft.data_collator([dft.train_dataset[i] for i in range(len(ROWS))])
    from trl import SFTTrainer

    trl = make_trainer(SFTTrainer, tmp_path / "trl", sft={"loss_type": "dft"})
    assert loss_and_grads(dft, batch)[0].item() == pytest.approx(loss_and_grads(trl, batch)[0].item(), abs=1e-6)
