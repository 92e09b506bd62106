"""The fast DPO core (trainers/fastpref) is exact: packed log-probs equal separate forward
passes, and the loss and LoRA gradients equal TRL's DPOTrainer's on the same batch; the
reference log-probs are cached, reused and keyed by the data."""

from __future__ import annotations

import pytest
import torch

from .conftest import move_lora_b, tiny_variant

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PLAIN = [
    {"prompt": "The capital of France is", "chosen": " Paris, a city on the Seine.", "rejected": " Banana."},
    {
        "prompt": "Q: what is two plus two, written out in words, please?\nA:",
        "chosen": " Four.",
        "rejected": " It is five, or maybe seven, nobody can tell.",
    },
    {"prompt": "Hi", "chosen": " Hello there! How can I help you today?", "rejected": " Go away."},
    {"prompt": "List three colours:", "chosen": " red, green, blue", "rejected": " dog"},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }
    for row in PLAIN
]


def make_trainer(cls, rows, tmp_path, perturb=True, **kwargs):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from pipeline.models import prepare_tiny

    path = prepare_tiny()
    model = kwargs.pop("model", None) or AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    settings = {
        "per_device_train_batch_size": len(rows),
        "max_length": kwargs.pop("max_length", 48),
        "beta": 0.2,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "seed": 7,
        **kwargs.pop("dpo", {}),
    }
    args = DPOConfig(output_dir=str(tmp_path / "out"), **settings)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=lora,
        **kwargs,
    )
    if perturb:  # LoRA's B starts at zero (policy == reference): move it so the loss and both factors' gradients are non-trivial
        move_lora_b(trainer.model)
    return trainer


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


# plain text with sigmoid DPO, conversational with DPO + NLL (RPO): each data kind and loss term once
@pytest.mark.parametrize(
    ("rows", "max_length", "loss_types"),
    [(PLAIN, 24, ["sigmoid"]), (CONVERSATIONAL, 56, ["sigmoid", "sft"])],
    ids=["plain-dpo", "conversational-rpo"],
)
def test_loss_and_lora_gradients_equal_trl(rows, max_length, loss_types, tmp_path, tiny_model_path):
    from trl import DPOTrainer

    from trainers.fastpref.trainer import FastDPOTrainer

    dpo = {"loss_type": loss_types, "loss_weights": [1.0, 0.7][: len(loss_types)]}
    trl = make_trainer(DPOTrainer, rows, tmp_path / "trl", dpo=dpo, max_length=max_length)
    fast = make_trainer(FastDPOTrainer, rows, tmp_path / "fast", dpo=dpo, max_length=max_length, ref_cache_dir=tmp_path / "cache")
    assert fast.fast, fast.fast_off_reason
    examples = [fast.train_dataset[i] for i in range(len(rows))]
    assert {len(e["prompt_ids"]) for e in examples} != 1  # mixed prompt lengths
    assert len(examples) == len(rows)
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    assert longest > max_length  # truncation is exercised

    trl_loss, trl_grads = loss_and_grads(trl, trl.data_collator([trl.train_dataset[i] for i in range(len(rows))]))
    fast_loss, fast_grads = loss_and_grads(fast, fast.data_collator(examples))

    assert abs(trl_loss.item() - 0.6931) > 1e-3  # the policy differs from the reference
    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert trl_grads.keys() == fast_grads.keys() and len(fast_grads) > 0
    for name, grad in trl_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "entropy",
        "logits/chosen",
        "mean_token_accuracy",
        "num_tokens",
    ):
        assert fast._metrics["train"][key][-1] == pytest.approx(trl._metrics["train"][key][-1], abs=1e-4), key


def test_rpo_alpha_loss_and_gradients_equal_trl_and_add_the_chosen_nll(tmp_path, tiny_model_path):
    """`rpo_alpha` (trainers/dpo_config.py) as TRL runs it: loss and LoRA gradients of the fast
    core equal TRL DPOTrainer's within 1e-4, and the term added to DPO is alpha x the mean NLL
    per chosen-reply token (TRL's former rpo_alpha), checked against separate forward passes."""
    from trl import DPOTrainer

    from trainers.dpo_config import DPOMethodConfig
    from trainers.fastpref.trainer import FastDPOTrainer

    alpha, max_length = 0.5, 24
    rpo = DPOMethodConfig(beta=0.2, rpo_alpha=alpha).trl_kwargs()
    assert rpo["loss_type"] == ["sigmoid", "sft"] and rpo["loss_weights"] == [1.0, alpha]
    trl = make_trainer(DPOTrainer, PLAIN, tmp_path / "trl", dpo=rpo, max_length=max_length)
    fast = make_trainer(FastDPOTrainer, PLAIN, tmp_path / "fast", dpo=rpo, max_length=max_length, ref_cache_dir=tmp_path / "c")
    dpo_only = make_trainer(
        DPOTrainer, PLAIN, tmp_path / "dpo", dpo=DPOMethodConfig(beta=0.2).trl_kwargs(), max_length=max_length
    )
    assert fast.fast, fast.fast_off_reason

    examples = [trl.train_dataset[i] for i in range(len(PLAIN))]
    trl_loss, trl_grads = loss_and_grads(trl, trl.data_collator(examples))
    fast_loss, fast_grads = loss_and_grads(fast, fast.data_collator([fast.train_dataset[i] for i in range(len(PLAIN))]))
    dpo_loss, dpo_grads = loss_and_grads(dpo_only, dpo_only.data_collator(examples))

    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert trl_grads.keys() == fast_grads.keys() and len(fast_grads) > 0
    for name, grad in trl_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)

    model = trl.model.eval()  # the same (perturbed) policy in all three trainers
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            seq = (e["prompt_ids"] + e["chosen_ids"])[:max_length]  # TRL's keep_start truncation
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
            nll -= logp[len(e["prompt_ids"]) - 1 :].sum().item()
            tokens += len(seq) - len(e["prompt_ids"])
    assert fast_loss.item() - dpo_loss.item() == pytest.approx(alpha * nll / tokens, abs=1e-4)
    assert any((fast_grads[n] - dpo_grads[n]).abs().max() > 1e-4 for n in dpo_grads)  # the NLL term moves the adapter


def test_packed_logps_equal_separate_forward_passes(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from trainers.fastpref.logps import packed_logps
    from trainers.fastpref.packing import pack, truncate

    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(5, 40000, (n,), generator=gen).tolist()

    units = [
        truncate(ids(p), ids(c), ids(r), None)
        for p, c, r in [(7, 5, 9), (3, 12, 4), (15, 6, 6), (2, 2, 3), (4, 1, 1), (0, 4, 3), (3, 0, 2)]
    ]
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attn).eval()
        batch = pack(units, pad_token_id=0)
        assert batch["input_ids"].shape[0] < len(units)  # short pairs share a row (block-diagonal)
        with torch.no_grad():
            packed = packed_logps(model, batch, tile_elements=3 * 49152).seq_logps  # several tiles
            expected = []
            for side in ("chosen", "rejected"):
                for u in units:
                    seq = torch.tensor([u.prompt + getattr(u, side)])
                    logp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1).gather(1, seq[0, 1:, None])[:, 0]
                    expected.append(logp[max(len(u.prompt) - 1, 0) :].sum())  # an empty prompt: token 0 unscored
        torch.testing.assert_close(packed, torch.stack(expected), atol=1e-5, rtol=1e-6)


# a trainable head: the backward re-projects each tile; a frozen one (LoRA): the forward builds
# d logp / d hidden tile by tile (and the entropy from it) and the backward only scales it; no
# gradient (a reference pass): the entropy from the tile itself
@pytest.mark.parametrize("head", ["trainable", "frozen", "no-grad"])
def test_chunked_logps_gradient_matches_full_log_softmax(head):
    from trainers.fastpref.logps import ChunkedLogps

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, generator=gen, dtype=torch.float64, requires_grad=head == "trainable")
    bias = torch.randn(101, generator=gen, dtype=torch.float64, requires_grad=head == "trainable")
    targets = torch.randint(0, 101, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen, dtype=torch.float64)
    grad = head != "no-grad"
    logp, entropy, mean_logit, top1 = ChunkedLogps.apply(hidden, weight, bias, targets, 5 * 101, True, grad)
    params = {"trainable": (hidden, weight, bias), "frozen": (hidden,), "no-grad": ()}[head]
    # the path taken: a frozen head keeps only d logp / d hidden; the others what the backward re-projects
    assert len(logp.grad_fn.saved_tensors) == (1 if head == "frozen" else 5)
    if grad:
        (logp * upstream).sum().backward()
    got = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    logits = hidden @ weight.t() + bias
    full = torch.log_softmax(logits, -1)
    (full.gather(1, targets[:, None])[:, 0] * upstream).sum().backward()
    torch.testing.assert_close(logp.double(), full.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), -(full.exp() * full).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_logit.double(), logits.mean(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(top1, logits.argmax(-1) == targets)
    for g, t in zip(got, params, strict=True):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_chunked_logps_metrics_under_bf16_autocast_follow_the_rounded_logits():
    """Under autocast the logits are projected in bf16: the entropy is that distribution's (taken from
    the tile, not from the fp32 gradient product, which would mix the two and can go negative)."""
    from trainers.fastpref.logps import ChunkedLogps

    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(23, 16, generator=gen) * 3).requires_grad_(True)
    weight = torch.randn(101, 16, generator=gen)
    targets = torch.randint(0, 101, (23,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy, mean_logit, _ = ChunkedLogps.apply(hidden, weight, None, targets, 5 * 101, True, True)
    logits = (hidden.detach().bfloat16() @ weight.bfloat16().t()).float()
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logp.detach(), full.gather(1, targets[:, None])[:, 0], atol=1e-2, rtol=0)
    # bf16 rounds each logit (~0.05 here); tiles of 5 rows round a little differently from one matmul, so
    # 1e-2; the fp32 product E_p[W].h would be off by up to 0.18 here, and negative on a confident row
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), atol=1e-2, rtol=0)
    assert (entropy >= 0).all()
    torch.testing.assert_close(mean_logit, hidden.detach() @ weight.mean(0), atol=1e-4, rtol=1e-4)


def test_reference_logps_are_cached_reused_and_keyed(tmp_path, tiny_model_path):
    from trainers.fastpref.trainer import FastDPOTrainer

    cache = tmp_path / "cache"
    first = make_trainer(FastDPOTrainer, PLAIN, tmp_path / "a", ref_cache_dir=cache)
    assert first.ref_forward_calls == 1  # 4 pairs, one packed batch
    assert first.ref_cache_seconds is not None and first.ref_cache_seconds > 0  # what a run's cost adds
    assert (cache / f"{first.ref_cache_key}.npz").is_file()
    ref = torch.tensor(first.train_dataset["ref_chosen_logps"])

    again = make_trainer(FastDPOTrainer, PLAIN, tmp_path / "b", ref_cache_dir=cache)
    assert again.ref_forward_calls == 0 and again.ref_cache_key == first.ref_cache_key
    assert again.ref_cache_seconds == 0.0
    assert torch.equal(torch.tensor(again.train_dataset["ref_chosen_logps"]), ref)

    # the cached numbers are the reference's: equal to an on-the-fly reference forward of the batch
    batch = again._prepare_inputs(again.data_collator([again.train_dataset[i] for i in range(len(PLAIN))]))
    chosen, _ = again.reference_logps(again.model, batch)
    torch.testing.assert_close(chosen.double(), ref.double(), atol=1e-5, rtol=0)

    changed = [dict(PLAIN[0], chosen=" Lyon."), *PLAIN[1:]]
    other = make_trainer(FastDPOTrainer, changed, tmp_path / "c", ref_cache_dir=cache)
    assert other.ref_cache_key != first.ref_cache_key and other.ref_forward_calls == 1
    shorter = make_trainer(FastDPOTrainer, PLAIN, tmp_path / "d", ref_cache_dir=cache, max_length=16)
    assert shorter.ref_cache_key != first.ref_cache_key

    from trainers.fastpref.ref_cache import base_model_identity

    before = base_model_identity(first.model)
    with torch.no_grad():  # a base changed in memory (e.g. an adapter merged in) is another reference
        first.model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight[0, 0] += 1e-3
    assert base_model_identity(first.model) != before


def test_unsupported_settings_run_trls_own_path(tmp_path, tiny_model_path):
    from trainers.fastpref.trainer import FastDPOTrainer

    trainer = make_trainer(FastDPOTrainer, PLAIN, tmp_path, dpo={"loss_type": ["ipo"]}, ref_cache_dir=tmp_path / "cache")
    assert not trainer.fast and "ipo" in trainer.fast_off_reason
    assert trainer.ref_cache_seconds is None  # TRL computes the reference inside each step: nothing apart
    assert "pair_mask" not in trainer.data_collator([trainer.train_dataset[0]])
    # compute_metrics reads the logits of TRL's padded batches, which the core never builds
    metrics = make_trainer(FastDPOTrainer, PLAIN, tmp_path / "m", compute_metrics=lambda p: {}, ref_cache_dir=tmp_path / "c")
    assert not metrics.fast and "compute_metrics" in metrics.fast_off_reason
    assert "pair_mask" not in metrics.data_collator([metrics.train_dataset[0]])
    # logits the model changes after the head (the core's log-softmax is of the head's own product) and
    # attention the packed pieces do not apply (a sliding window shorter than max_length, 48 here)
    for kind, fields, why in VARIANTS_THE_CORE_LEAVES:
        other = make_trainer(
            FastDPOTrainer, PLAIN, tmp_path / kind, model=tiny_variant(kind, **fields), ref_cache_dir=tmp_path / "c"
        )
        assert not other.fast and why in other.fast_off_reason, (kind, other.fast_off_reason)
        assert "pair_mask" not in other.data_collator([other.train_dataset[0]])


#: tiny models of other families the packed core sends to TRL's path, and why (the reason's words)
VARIANTS_THE_CORE_LEAVES = [
    ("gemma2", {}, "final_logit_softcapping"),
    ("granite", {"logits_scaling": 8.0}, "logits_scaling"),
    ("mistral", {"sliding_window": 16}, "sliding-window attention"),
]


def test_a_window_no_sequence_reaches_keeps_the_core_and_equals_trl(tmp_path, tiny_model_path):
    """A sliding window of max_length tokens or more never hides a key (no token is that far from
    another): the core stays on for such a model and its loss and gradients equal TRL's."""
    from trl import DPOTrainer

    from trainers.fastpref.trainer import FastDPOTrainer

    trl = make_trainer(DPOTrainer, PLAIN, tmp_path / "trl", model=tiny_variant("mistral", sliding_window=24), max_length=24)
    fast = make_trainer(
        FastDPOTrainer,
        PLAIN,
        tmp_path / "fast",
        model=tiny_variant("mistral", sliding_window=24),
        max_length=24,
        ref_cache_dir=tmp_path / "cache",
    )
    assert fast.fast, fast.fast_off_reason
    trl_loss, trl_grads = loss_and_grads(trl, trl.data_collator([trl.train_dataset[i] for i in range(len(PLAIN))]))
    fast_loss, fast_grads = loss_and_grads(fast, fast.data_collator([fast.train_dataset[i] for i in range(len(PLAIN))]))
    assert abs(trl_loss.item() - 0.6931) > 1e-3
    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_checkpointing_probe_picks_the_faster_setting_once_per_host_and_shape(tmp_path):
    import time

    from trainers.grad_ckpt_probe import choose_gradient_checkpointing, probe_key, shape_bucket

    calls = []

    def step(on):  # checkpointing on is the slower setting here
        calls.append(on)
        time.sleep(0.03 if on else 0.005)

    cache = tmp_path / "probe.json"
    bucket = shape_bucket("cpu", "torch.float32", 4, 300)
    assert bucket.endswith("len<=512")
    # a run too short for ~6 probe steps to pay off: the default, nothing measured or cached
    assert choose_gradient_checkpointing("m", bucket, step, cache_path=cache, run_steps=6, default=True) is True
    assert calls == [] and not cache.exists()
    assert choose_gradient_checkpointing("m", bucket, step, cache_path=cache) is False
    assert calls.count(True) >= 2 and calls.count(False) >= 2
    calls.clear()
    assert choose_gradient_checkpointing("m", bucket, step, cache_path=cache) is False and calls == []  # cached
    assert choose_gradient_checkpointing("m", bucket, step, cache_path=cache, run_steps=6, default=True) is False
    assert probe_key("m", bucket) in cache.read_text()
    assert (
        choose_gradient_checkpointing(
            "m", bucket, lambda on: time.sleep(0.005 if on else 0.03), cache_path=cache.with_name("other.json")
        )
        is True
    )


def test_trainer_probe_measures_the_real_step_and_sets_the_flag(tmp_path, tiny_model_path):
    import json

    from trainers.fastpref.trainer import FastDPOTrainer

    probe = tmp_path / "probe.json"
    short = make_trainer(  # 4 pairs, batch 4, 3 epochs: 3 steps, too short to probe
        FastDPOTrainer,
        PLAIN,
        tmp_path / "short",
        ref_cache_dir=tmp_path / "cache",
        probe_checkpointing=True,
        probe_cache_path=probe,
        model_name="tiny",
        dpo={"gradient_checkpointing": False},
    )
    assert short.planned_steps() == 3 and not probe.exists()
    assert short.checkpointing_chosen is False and short.model.get_base_model().is_gradient_checkpointing is False

    trainer = make_trainer(
        FastDPOTrainer,
        PLAIN,
        tmp_path,
        ref_cache_dir=tmp_path / "cache",
        probe_checkpointing=True,
        probe_cache_path=probe,
        model_name="tiny",
        dpo={"max_steps": 50},
    )
    (entry,) = json.loads(probe.read_text()).values()
    assert entry["seconds_off"] > 0 and entry["seconds_on"] > 0
    assert trainer.args.gradient_checkpointing is entry["checkpointing"] is trainer.checkpointing_chosen
    base = trainer.model.get_base_model()
    assert base.is_gradient_checkpointing is entry["checkpointing"]


def test_training_run_matches_trl_step_by_step(tmp_path, tiny_model_path):
    """trainer.train() end to end (TRL's loop, sampler, optimizer, logging, checkpoints): the
    logged losses and rewards of the fast core follow TRL's."""
    from trl import DPOTrainer

    from trainers.fastpref.trainer import FastDPOTrainer

    rows = PLAIN + [dict(r, prompt=r["prompt"] + " Answer briefly.") for r in PLAIN]
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
    for cls, extra in ((DPOTrainer, {}), (FastDPOTrainer, {"ref_cache_dir": tmp_path / "cache"})):
        trainer = make_trainer(cls, rows, tmp_path / cls.__name__, perturb=False, dpo=common, **extra)
        trainer.train()
        histories.append([row for row in trainer.state.log_history if "loss" in row])
        assert (tmp_path / cls.__name__ / "out" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    trl, fast = histories
    assert len(trl) == len(fast) == 4
    assert trl[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    for a, b in zip(trl, fast):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected", "num_tokens"):
            assert b[key] == pytest.approx(a[key], abs=2e-4, rel=1e-3), key
    assert fast[-1]["rewards/margins"] != 0


def test_dpo_stage_runs_the_fast_core_and_matches_trls_path(tmp_path, tiny_model_path):
    """The `dpo` stage with `fast: true` (default) trains on the core: it caches the reference
    and logs the same losses as `fast: false` (TRL's own step)."""
    import json
    import uuid

    from pipeline.config import pipeline_from_dict
    from pipeline.records import write_jsonl
    from pipeline.runner import Runner
    from trainers.fastpref.ref_cache import default_root

    tag = uuid.uuid4().hex[:8]  # data no earlier run has cached
    write_jsonl([dict(r, prompt=f"[{tag}] {r['prompt']}") for r in PLAIN], tmp_path / "prefs.jsonl")
    before = set(default_root().glob("*.npz")) if default_root().is_dir() else set()
    losses = {}
    for fast in (True, False):
        stage = {
            "name": "align",
            "uses": "dpo",
            "inputs": {"preferences": str(tmp_path / "prefs.jsonl")},
            "with": {
                "max_steps": 3,
                "learning_rate": 5e-3,
                "per_device_train_batch_size": 2,
                "max_length": 48,
                "fast": fast,
                "gradient_checkpointing": False,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            },
        }
        data = {"run_name": f"fast-{fast}", "model": "tiny", "stages": [stage]}
        result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / f"runs-{fast}", use_ray=False).execute()
        assert result.ok, [r.error for r in result.records]
        curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
        losses[fast] = [row["loss"] for row in curves if "loss" in row]
        metrics = result.record("align").metrics
        if fast:
            # the reference of these pairs, cached (>= 1: other test processes may write theirs meanwhile)
            assert len(set(default_root().glob("*.npz")) - before) >= 1
            # computed before the first step, so no step's time holds it: the stage reports it apart
            assert metrics["reference_seconds"] > 0
        else:
            assert "reference_seconds" not in metrics  # TRL's own step computes it inside each step
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-3)


def test_continuing_an_adapter_uses_it_as_the_reference_like_trl(tmp_path, tiny_model_path):
    """A run that continues an adapter: TRL copies it as the "ref" adapter; the core uses the
    same reference (and keys its cache by that adapter), so loss and gradients still agree."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trainers.fastpref.trainer import FastDPOTrainer

    def build(cls, out, **extra):
        torch.manual_seed(5)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():  # the adapter being continued: not the identity
            for name, param in sorted(model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_length=48, beta=0.2, use_cpu=True, bf16=False)
        trainer = cls(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(PLAIN),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
            **extra,
        )
        gen = torch.Generator().manual_seed(12)
        with torch.no_grad():  # one training step's worth of change to the trained adapter only
            for name, param in sorted(trainer.model.named_parameters()):
                if ".default." in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.02)
        return trainer

    trl = build(DPOTrainer, tmp_path / "trl")
    fast = build(FastDPOTrainer, tmp_path / "fast", ref_cache_dir=tmp_path / "cache")
    assert fast.fast and "ref" in fast.model.peft_config and fast._reference_adapter() == "ref"
    trl_loss, trl_grads = loss_and_grads(trl, trl.data_collator([trl.train_dataset[i] for i in range(4)]))
    fast_loss, fast_grads = loss_and_grads(fast, fast.data_collator([fast.train_dataset[i] for i in range(4)]))
    assert abs(trl_loss.item() - 0.6931) > 1e-3
    assert fast_loss.item() == pytest.approx(trl_loss.item(), abs=1e-4)
    assert trl_grads.keys() == fast_grads.keys() and not any(".ref." in name for name in fast_grads)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def _odd_units_on_lora_tiny(tiny_model_path, seed: int):
    """Five pairs packed into shared, padded rows (an empty prompt and an empty chosen reply among
    them) and the tiny model (grouped-query attention) with an all-linear LoRA whose B is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainers.fastpref.packing import pack, truncate

    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, 40000, (n,), generator=gen).tolist()

    units = [truncate(ids(p), ids(c), ids(r), None) for p, c, r in [(9, 14, 11), (3, 5, 4), (0, 4, 3), (3, 0, 2), (6, 2, 8)]]
    batch = pack(units, pad_token_id=0)
    assert batch["input_ids"].shape[0] < len(units) and batch["segments"][0][0] == (0, 9, 14, 11)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa", dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=gen)
    return units, batch, model


def _logps_and_grads(model, batch, **options):
    """A packed batch's sequence logps and the LoRA gradients of a weighted sum of them."""
    from trainers.fastpref.logps import packed_logps

    model.zero_grad()
    logps = packed_logps(model, batch, **options).seq_logps
    (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_pair_attention_pieces_equal_the_masked_square_in_values_and_gradients(tiny_model_path, monkeypatch):
    """attention.py: two causal pieces per unit give the 4D mask's logps and LoRA gradients
    (rows shared by several units, padding, an empty prompt and an empty chosen reply included)."""
    from trainers.fastpref import attention

    _, batch, model = _odd_units_on_lora_tiny(tiny_model_path, seed=4)
    calls = []
    piece = attention._piece
    monkeypatch.setattr(attention, "_piece", lambda *a: calls.append(1) or piece(*a))
    split, split_grads = _logps_and_grads(model, batch)
    assert len(calls) > 0  # the pieces ran
    calls.clear()
    masked, masked_grads = _logps_and_grads(model, {k: v for k, v in batch.items() if k != "segments"})
    assert not calls  # without the layout: transformers' SDPA with the 4D mask
    torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-6)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_varlen_pieces_equal_the_sdpa_pieces_in_values_and_gradients(tiny_model_path):
    """attention.py's varlen path (two kernel calls per layer for the whole batch) gives the SDPA
    pieces' logps and LoRA gradients; the kernel is the CPU stand-in `varlen_reference` (grouped-query
    attention, rows shared by several units, padding, an empty prompt and an empty chosen reply)."""
    from trainers.fastpref.attention import varlen_reference

    units, batch, model = _odd_units_on_lora_tiny(tiny_model_path, seed=5)
    calls = []

    def kernel(*args):
        calls.append(len(args[0]))
        return varlen_reference(*args)

    varlen, varlen_grads = _logps_and_grads(model, batch, attention=kernel)
    own = sum(len(u.prompt) + len(u.chosen) for u in units)
    rejected = sum(len(u.rejected) for u in units)
    assert calls == [own, rejected] * model.config.num_hidden_layers  # two calls per layer, every unit's tokens
    pieces, pieces_grads = _logps_and_grads(model, batch, attention="sdpa")
    torch.testing.assert_close(varlen, pieces, atol=1e-5, rtol=1e-6)
    for name, grad in pieces_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_varlen_pieces_under_bf16_autocast_with_fp32_weights_and_after_inference_mode(tiny_model_path):
    """What a GPU run meets: fp32 weights under bf16 autocast (QLoRA's upcast layers) leave q and k
    in fp32 and v in bf16 after the rotary step; the kernels take one dtype, so the pieces go in
    the autocast dtype, as SDPA computes there. And a layout first seen under inference mode (an
    evaluation) still trains: the cached index tensors are not inference tensors."""
    from trainers.fastpref.attention import varlen_reference
    from trainers.fastpref.logps import packed_logps

    _, batch, model = _odd_units_on_lora_tiny(tiny_model_path, seed=6)
    dtypes = []

    def kernel(q, k, v, *rest):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return varlen_reference(q, k, v, *rest)

    with torch.inference_mode():
        packed_logps(model, batch, attention=kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        varlen, varlen_grads = _logps_and_grads(model, batch, attention=kernel)
        pieces, pieces_grads = _logps_and_grads(model, batch, attention="sdpa")
    assert dtypes[-1] == (torch.bfloat16,) * 3 and varlen.dtype == torch.float32
    tokens = torch.bincount(batch["score_seq"], minlength=len(varlen)).clamp(min=1)  # an empty reply scores none
    assert float(((varlen - pieces).abs() / tokens).max()) < 0.01  # bf16 rounding, per token
    for name, grad in pieces_grads.items():
        assert float((varlen_grads[name] - grad).norm() / grad.norm()) < 0.05, name


def test_torch_varlen_adapts_to_each_release_of_its_keywords(monkeypatch):
    """`varlen_attn` changed its keywords between PyTorch releases (causal as `is_causal`, then as
    `window_size`; `enable_gqa` and `scale` not in every one). Stand-ins with each signature (the
    real kernel needs a CUDA GPU) must give the contract's numbers: grouped heads and a non-default
    scale included."""
    import torch.nn.attention.varlen as varlen

    from trainers.fastpref.attention import _torch_varlen, varlen_reference

    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(9, 4, 8, generator=gen), torch.randn(13, 2, 8, generator=gen), torch.randn(13, 2, 8, generator=gen)
    cu_q, cu_k = torch.tensor([0, 3, 9], dtype=torch.int32), torch.tensor([0, 5, 13], dtype=torch.int32)
    want = varlen_reference(q, k, v, cu_q, cu_k, 6, 8, 0.3)

    def latest(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        assert window_size == (-1, 0) and enable_gqa == (query.shape[1] != key.shape[1])
        return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)

    def no_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0) and query.shape[1] == key.shape[1]
        return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)

    def first(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False):
        assert is_causal and query.shape[1] == key.shape[1]
        return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)

    for release in (latest, no_gqa, first):
        monkeypatch.setattr(varlen, "varlen_attn", release)
        torch.testing.assert_close(_torch_varlen(q, k, v, cu_q, cu_k, 6, 8, 0.3), want, msg=release.__name__)


def test_attention_choice_falls_back_to_sdpa_on_cpu_and_an_insisted_varlen_says_why(tiny_model_path):
    from pydantic import ValidationError

    from stages.dpo import DpoStageConfig
    from trainers.fastpref.attention import pair_kernel, varlen_reference, varlen_unavailable
    from trainers.fastpref.logps import packed_logps
    from trainers.fastpref.packing import pack, truncate

    cpu = torch.device("cpu")
    assert pair_kernel("auto", cpu, torch.float32, 64) is None and pair_kernel("sdpa", cpu, torch.bfloat16, 64) is None
    with pytest.raises(ValueError, match="attention: varlen: .*CUDA GPU.*use attention: auto or sdpa"):
        pair_kernel("varlen", cpu, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="'flash' is not one of auto, sdpa, varlen"):
        pair_kernel("flash", cpu, torch.float32, 64)
    q, k = torch.zeros(5, 4, 8), torch.zeros(7, 2, 8)  # the stand-in holds callers to the kernels' contract
    with pytest.raises(ValueError, match="do not partition"):
        varlen_reference(q, k, k, torch.tensor([0, 2, 5]), torch.tensor([0, 3, 7], dtype=torch.int32), 3, 4)
    with pytest.raises(ValueError, match="max length 2 is not the longest sequence, 3"):
        varlen_reference(q, k, k, torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32), 2, 4)
    cuda = torch.device("cuda")  # the reasons before the GPU is asked anything
    assert "fp16/bf16, not torch.float32" in (varlen_unavailable(cuda, torch.float32, 64) or "")
    assert "multiples of 8, not 12" in (varlen_unavailable(cuda, torch.bfloat16, 12) or "")
    assert DpoStageConfig(attention="sdpa").attention == "sdpa"
    from trainers.fastpref.trainer import FastDPOTrainer

    with pytest.raises(ValueError, match="'flash' is not one of auto, sdpa, varlen"):
        FastDPOTrainer(attention="flash")  # refused before TRL loads or tokenizes anything
    with pytest.raises(ValidationError, match="attention"):
        DpoStageConfig(attention="flash")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa", dtype=torch.float32)
    batch = pack([truncate([5, 6, 7], [8, 9], [10], None)], pad_token_id=0)
    with torch.no_grad():
        auto = packed_logps(model, batch).seq_logps
        torch.testing.assert_close(auto, packed_logps(model, batch, attention="sdpa").seq_logps, rtol=0, atol=0)
        with pytest.raises(ValueError, match="CUDA GPU"):
            packed_logps(model, batch, attention="varlen")


@pytest.mark.parametrize("causal", [True, False])
def test_small_bf16_pieces_in_training_are_fp32_products_as_close_to_float64_as_sdpa(causal, monkeypatch):
    """attention.py `_small_piece`: a short piece in bf16 on a CPU is computed as fp32 scores, softmax
    and product (faster than SDPA's flash backward there), its output and q/k/v gradients as close to
    a float64 SDPA as bf16 SDPA's are; a forward without gradient (the reference's) takes the same
    route and gives the same output (an untrained adapter's log-ratio stays 0); pieces in fp32 or
    longer than SMALL_PIECE_KEYS keep SDPA."""
    import torch.nn.functional as F

    from trainers.fastpref import attention

    gen = torch.Generator().manual_seed(11)
    lq, lk = (40, 40) if causal else (25, 60)
    mask = None if causal else attention._rejected_mask(lk - lq, lq, "cpu")
    q, k, v = (torch.randn(1, 9, n, 64, generator=gen) for n in (lq, lk, lk))
    weights = torch.randn(1, 9, lq, 64, generator=gen)

    def output_and_grads(fn, dtype):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask, 0.125, causal)
        (out.double() * weights).sum().backward()
        return [out.double(), *(t.grad.double() for t in leaves)]

    routed = []
    small = attention._small_piece
    monkeypatch.setattr(attention, "_small_piece", lambda *a: routed.append(1) or small(*a))
    exact = output_and_grads(
        lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3], scale=a[4], is_causal=a[5]), torch.float64
    )
    sdpa = output_and_grads(
        lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3], scale=a[4], is_causal=a[5]), torch.bfloat16
    )
    assert not routed
    new = output_and_grads(attention._piece, torch.bfloat16)
    assert routed
    for name, got, ref, want in zip(("out", "dq", "dk", "dv"), new, sdpa, exact, strict=True):
        err, sdpa_err = float((got - want).abs().max()), float((ref - want).abs().max())
        assert err <= 1.25 * sdpa_err + 1e-4, (name, err, sdpa_err)
    with torch.no_grad():  # a forward without gradient (the reference's): the same route, the same output
        routed.clear()
        reference = attention._piece(*(t.to(torch.bfloat16) for t in (q, k, v)), mask, 0.125, causal)
        assert routed and torch.equal(reference.double(), new[0])
    routed.clear()
    output_and_grads(attention._piece, torch.float32)  # fp32: SDPA, as fast there
    monkeypatch.setattr(attention, "SMALL_PIECE_KEYS", lk - 1)
    output_and_grads(attention._piece, torch.bfloat16)
    assert not routed


def test_lora_input_casts_are_off_under_autocast_and_change_no_value_or_gradient(tiny_model_path):
    """logps.autocast_forward: under bf16 autocast, PEFT's cast of each LoRA layer's input to fp32 (which
    autocast casts straight back) is skipped, with bit-equal log-probs and LoRA gradients for a bf16
    model with fp32 adapter weights (heedful's bf16 CPU training); outside autocast the casts stay.
    The accelerator is a stand-in with the two members the trainers use (an Accelerator's mixed
    precision is process-wide state)."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainers.fastpref.logps import autocast_forward

    _, batch, model = _odd_units_on_lora_tiny(tiny_model_path, seed=7)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers

    def accelerator(bf16):
        return SimpleNamespace(
            device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        )

    casts = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, before_grads = _logps_and_grads(model, batch)
    with autocast_forward(accelerator(True), model):
        casts = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
        after, after_grads = _logps_and_grads(model, batch)
    assert not any(casts) and all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)
    assert torch.equal(before, after)
    for name, grad in before_grads.items():
        assert torch.equal(after_grads[name], grad), name
    with autocast_forward(accelerator(False), model):
        assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
    )
    dora_layers = [m for m in dora.modules() if isinstance(m, BaseTunerLayer)]
    with autocast_forward(accelerator(True), dora):  # a LoRA variant computes more from the cast input: kept
        assert dora_layers and all(getattr(m, "cast_input_dtype_enabled", True) for m in dora_layers)
