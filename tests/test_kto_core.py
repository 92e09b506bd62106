"""The packed KTO core (trainers/fastpref/kto_trainer.py) is exact: on the same batch its loss,
LoRA gradients and logged metrics equal TRL's KTOTrainer's, with the KL reply in the reply's row
or in a second batch; the reference's log-probs of both replies come from the cache, shared with
what TRL computes; a training run follows TRL's step by step; the `kto` stage runs it."""

from __future__ import annotations

import pytest
import torch

from .conftest import move_lora_b, tiny_variant

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PLAIN = [
    {"prompt": "The capital of France is", "completion": " Paris, a city on the Seine.", "label": True},
    {
        "prompt": "Q: what is two plus two, written out in words, please?\nA:",
        "completion": " It is five, or seven.",
        "label": False,
    },
    {"prompt": "Hi", "completion": " Hello there! How can I help you today?", "label": True},
    {"prompt": "List three colours:", "completion": " dog", "label": False},
    {"prompt": "Name a fruit:", "completion": " An apple, or a pear, or a plum, or a peach.", "label": True},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "completion": [{"role": "assistant", "content": row["completion"].strip()}],
        "label": row["label"],
    }
    for row in PLAIN
]
METRICS = (
    "kl",
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def make_trainer(cls, rows, tmp_path, perturb=True, **kwargs):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig

    from pipeline.models import prepare_tiny

    path = prepare_tiny()
    settings = {
        "per_device_train_batch_size": len(rows),
        "max_length": kwargs.pop("max_length", 24),
        "beta": 0.3,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.5,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "seed": 7,
        **kwargs.pop("kto", {}),
    }
    trainer = cls(
        model=kwargs.pop("model", None) or AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=KTOConfig(output_dir=str(tmp_path / "out"), **settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        **{"peft_config": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")}
        | kwargs,
    )
    if perturb:  # LoRA's B starts at zero (policy == reference): move it so the KL and the gradients are non-trivial
        move_lora_b(trainer.model)
    return trainer


def loss_and_grads(trainer, n):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("rows", "max_length", "loss_type", "kl_in_row"),
    [
        (PLAIN, 24, "kto", True),
        (PLAIN, 24, "kto", False),
        (CONVERSATIONAL, 56, "kto", False),
        (PLAIN, 24, "apo_zero_unpaired", False),
    ],
    ids=["plain-kl-in-row", "plain-kl-apart", "conversational", "apo-zero-unpaired"],
)
def test_loss_gradients_and_metrics_equal_trl(rows, max_length, loss_type, kl_in_row, tmp_path, tiny_model_path):
    from trl import KTOTrainer

    from trainers.fastpref.kto_trainer import FastKTOTrainer

    kto = {"loss_type": loss_type}
    trl = make_trainer(KTOTrainer, rows, tmp_path / "trl", kto=kto, max_length=max_length)
    fast = make_trainer(
        FastKTOTrainer, rows, tmp_path / "fast", kto=kto, max_length=max_length, ref_cache_dir=tmp_path / "c", kl_in_row=kl_in_row
    )
    assert fast.fast, fast.fast_off_reason
    examples = [fast.train_dataset[i] for i in range(len(rows))]
    assert len({len(e["prompt_ids"]) for e in examples}) > 1  # mixed prompt lengths
    assert max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples) > max_length  # truncation exercised
    if loss_type == "kto":  # the KL replies are the batch's replies rotated by one, as TRL builds them
        assert [e["KL_completion_ids"] for e in examples] == [examples[-1]["completion_ids"]] + [
            e["completion_ids"] for e in examples[:-1]
        ]

    trl_loss, trl_grads = loss_and_grads(trl, len(rows))
    fast_loss, fast_grads = loss_and_grads(fast, len(rows))

    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert trl_grads.keys() == fast_grads.keys() and len(fast_grads) > 0
    for name, grad in trl_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    trl_metrics, fast_metrics = trl._metrics["train"], fast._metrics["train"]
    if loss_type == "kto" and rows is PLAIN:  # the policy moved: the KL term is in the loss (clamped at 0 on the other rows)
        assert trl_metrics["kl"][-1] > 0
    for key in METRICS:
        assert fast_metrics[key][-1] == pytest.approx(trl_metrics[key][-1], abs=1e-4), key


def test_kl_reply_goes_into_the_replys_row_where_prompts_are_long(tmp_path, tiny_model_path):
    """Left to the trainer, the KL reply is packed apart beside short prompts (the backward over it
    would cost more than the prompt's forward saves) and in the reply's row beside prompts of at
    least `KL_IN_ROW_PROMPT_RATIO` times its tokens; asked for, it is where it was asked."""
    from trainers.fastpref.kto_trainer import KL_IN_ROW_PROMPT_RATIO, FastKTOTrainer

    context = " The passage says many things about many places, all of them at some length." * 4
    long_prompts = [dict(row, prompt=context + " " + row["prompt"]) for row in PLAIN]
    cache = tmp_path / "c"
    short = make_trainer(FastKTOTrainer, PLAIN, tmp_path / "short", perturb=False, ref_cache_dir=cache, max_length=None)
    long = make_trainer(FastKTOTrainer, long_prompts, tmp_path / "long", perturb=False, ref_cache_dir=cache, max_length=None)
    for trainer, in_row in ((short, False), (long, True)):
        rows = trainer.train_dataset
        ratio = sum(map(len, rows["prompt_ids"])) / sum(map(len, rows["KL_completion_ids"]))
        assert (ratio >= KL_IN_ROW_PROMPT_RATIO) == in_row and trainer.kl_in_row == in_row, ratio
        batch = trainer.data_collator([rows[i] for i in range(len(PLAIN))])
        assert ("kl_batch" in batch) == (not in_row)
    asked = make_trainer(FastKTOTrainer, PLAIN, tmp_path / "asked", perturb=False, ref_cache_dir=cache, kl_in_row=True)
    assert asked.kl_in_row and "kl_batch" not in asked.data_collator([asked.train_dataset[i] for i in range(2)])


def test_the_reference_of_both_replies_is_cached_and_equals_trls(tmp_path, tiny_model_path):
    """The cache holds the reference's log-probs of each reply and of its KL reply: equal to
    TRL's own precomputed values, computed once, reused by a second trainer on the same rows."""
    from trl import KTOTrainer

    from trainers.fastpref.kto_trainer import FastKTOTrainer

    cache = tmp_path / "cache"
    trl = make_trainer(KTOTrainer, PLAIN, tmp_path / "trl", perturb=False, kto={"precompute_ref_log_probs": True})
    first = make_trainer(FastKTOTrainer, PLAIN, tmp_path / "a", perturb=False, ref_cache_dir=cache)
    assert first.ref_forward_calls == 1 and first.ref_cache_seconds and (cache / f"{first.ref_cache_key}.npz").is_file()
    for column in ("ref_logps", "ref_KL_logps"):
        torch.testing.assert_close(
            torch.tensor(first.train_dataset[column]), torch.tensor(trl.train_dataset[column]), atol=1e-4, rtol=0
        )
    again = make_trainer(FastKTOTrainer, PLAIN, tmp_path / "b", perturb=False, ref_cache_dir=cache)
    assert again.ref_forward_calls == 0 and again.ref_cache_seconds == 0.0 and again.ref_cache_key == first.ref_cache_key
    other = make_trainer(FastKTOTrainer, [dict(PLAIN[0], completion=" Lyon."), *PLAIN[1:]], tmp_path / "c", ref_cache_dir=cache)
    assert other.ref_cache_key != first.ref_cache_key and other.ref_forward_calls == 1


def test_unsupported_settings_run_trls_own_path(tmp_path, tiny_model_path):
    """`fast=False`, or a setting the core does not cover (here a prompt-learning adapter, whose
    virtual tokens the bare body would not see): TRL's own step and collator, and TRL's precompute
    given back where it was asked for (the core had taken it over)."""
    from peft import PromptTuningConfig

    from trainers.fastpref.kto_trainer import FastKTOTrainer

    off = make_trainer(FastKTOTrainer, PLAIN, tmp_path / "off", fast=False, ref_cache_dir=tmp_path / "c")
    assert not off.fast and off.fast_off_reason == "fast: false" and off.ref_cache_seconds is None
    assert "KL_input_ids" in off.data_collator([off.train_dataset[i] for i in range(2)])  # TRL's padded collator

    trainer = make_trainer(
        FastKTOTrainer,
        PLAIN,
        tmp_path / "prompt",
        perturb=False,
        kto={"precompute_ref_log_probs": True},
        ref_cache_dir=tmp_path / "c",
        peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    )
    assert not trainer.fast and "prompt-learning" in trainer.fast_off_reason
    assert trainer.precompute_ref_logps and {"ref_logps", "ref_KL_logps"} <= set(trainer.train_dataset.column_names)
    assert trainer.ref_forward_calls == 0 and not (tmp_path / "c").exists()  # TRL's precompute, not the core's cache
    with pytest.raises(ValueError, match="attention"):
        make_trainer(FastKTOTrainer, PLAIN, tmp_path / "bad", attention="flash", ref_cache_dir=tmp_path / "c")
    # logits changed after the head, attention the packed pieces do not apply (a window < max_length, 24)
    for kind, fields, why in [
        ("gemma2", {}, "final_logit_softcapping"),
        ("granite", {"logits_scaling": 8.0}, "logits_scaling"),
        ("mistral", {"sliding_window": 8}, "sliding-window attention"),
    ]:
        other = make_trainer(
            FastKTOTrainer, PLAIN, tmp_path / kind, model=tiny_variant(kind, **fields), ref_cache_dir=tmp_path / "c"
        )
        assert not other.fast and why in other.fast_off_reason, (kind, other.fast_off_reason)
        assert "KL_input_ids" in other.data_collator([other.train_dataset[i] for i in range(2)])
    wide = make_trainer(
        FastKTOTrainer, PLAIN, tmp_path / "wide", model=tiny_variant("mistral", sliding_window=24), ref_cache_dir=tmp_path / "c"
    )
    assert wide.fast, wide.fast_off_reason  # a window no sequence reaches (max_length 24) hides nothing


def test_training_run_matches_trl_step_by_step(tmp_path, tiny_model_path):
    """trainer.train() end to end (TRL's loop, sequential sampler, optimizer, logging,
    checkpoints): the logged losses, KL and rewards of the core follow TRL's."""
    from trl import KTOTrainer

    from trainers.fastpref.kto_trainer import FastKTOTrainer

    rows = PLAIN + [dict(r, prompt=r["prompt"] + " Answer briefly.", label=not r["label"]) for r in PLAIN]
    common = {
        "max_steps": 4,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "save_steps": 2,
        "save_strategy": "steps",
        "per_device_train_batch_size": 3,
        "disable_tqdm": True,
    }
    histories = []
    for cls, extra in ((KTOTrainer, {}), (FastKTOTrainer, {"ref_cache_dir": tmp_path / "cache"})):
        trainer = make_trainer(cls, rows, tmp_path / cls.__name__, perturb=False, kto=common, **extra)
        trainer.train()
        histories.append([row for row in trainer.state.log_history if "loss" in row])
        assert (tmp_path / cls.__name__ / "out" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    trl, fast = histories
    assert len(trl) == len(fast) == 4
    for a, b in zip(trl, fast, strict=True):
        assert a.keys() == b.keys()  # a batch without desirable rows logs no rewards/chosen, in both
        for key in ("loss", "kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "num_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=2e-4, rel=1e-3), key
    assert trl[0]["kl"] == 0 and fast[-2]["kl"] > 0 and fast[-2]["rewards/chosen"] != 0  # the policy moved


@pytest.mark.parametrize("method", ["kto", "dpo"])
def test_qlora_reference_cache_leaves_the_4bit_layers_trainable(method, tmp_path, tiny_model_path):
    """The cache's forward passes run at construction, the model still in eval mode. On a CPU with
    AVX512-BF16 a 4-bit layer called in eval mode without gradient repacks its weights for inference,
    and training then goes through an op without a backward (bitsandbytes 0.50): the gradients below
    it were silently wrong (0.01 off on `tiny`). Checked on any CPU: no 4-bit layer is called so
    while the trainer is built or evaluates, their modes are given back, and the gradients equal
    those of a trainer without the cache (on a CPU with AVX512-BF16, also: nothing was repacked)."""
    import tempfile

    from bitsandbytes.nn import Linear4bit
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, KTOConfig

    from pipeline.models import device_policy, load_causal_lm, load_tokenizer
    from trainers.fastpref.kto_trainer import FastKTOTrainer
    from trainers.fastpref.trainer import FastDPOTrainer

    from .test_preference_core import PLAIN as PAIRS

    cls, config, rows = (FastKTOTrainer, KTOConfig, PLAIN[:4]) if method == "kto" else (FastDPOTrainer, DPOConfig, PAIRS)

    repacking_calls = []

    def watch(layer, args):  # the condition under which bitsandbytes repacks for inference (Linear4bit.forward)
        if not layer.training and not args[0].requires_grad:
            repacking_calls.append(layer)

    def one_step(cache: bool):
        model = load_causal_lm("tiny", device_policy("cpu"), qlora=True, trainable_adapter=True)
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert layers and not any(m.training for m in layers)  # eval mode, as from_pretrained leaves it
        hooks = [m.register_forward_pre_hook(watch) for m in layers]
        trainer = cls(
            model=model,
            args=config(
                output_dir=tempfile.mkdtemp(dir=tmp_path),
                per_device_train_batch_size=4,
                max_length=32,
                use_cpu=True,
                bf16=False,
                report_to="none",
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=load_tokenizer("tiny"),
            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
            ref_cache=cache,
            ref_cache_dir=tmp_path / f"cache-{cache}",
        )
        assert trainer.fast and (trainer.ref_cache_seconds is not None) == cache
        trainer.model.eval()
        trainer.prediction_step(trainer.model, trainer.data_collator([trainer.train_dataset[i] for i in range(2)]), True)
        assert repacking_calls == [] and not any(m.training for m in layers)  # the modes given back
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for name, param in sorted(trainer.model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        return loss_and_grads(trainer, len(rows))

    cached_loss, cached = one_step(True)
    plain_loss, plain = one_step(False)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, atol=1e-5, rtol=1e-4, msg=name)
