"""Chain of Hindsight: label masks and forgetful causal masks by hand, the collator's random
order, the loss against an unbatched computation on `tiny`, and the stage on `tiny`."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import pipeline_from_dict
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner
from trainers.coh import CoHCollator, build_chain, build_examples, chains_from_feedback, forgetful_causal_mask
from trainers.coh_config import CoHConfig


def test_chain_label_mask_by_hand():
    ids, mask = build_chain([1, 2], [([10], [20, 21]), ([11, 12], [22])], separator_ids=[5], eos_id=2)
    #               prompt  phrase reply  sep  phrase   reply eos
    assert ids == [1, 2, 10, 20, 21, 5, 11, 12, 22, 2]
    assert mask == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    ids, mask = build_chain([1, 2], [([10], [20, 21])], [5], 2, max_length=4)
    assert ids == [1, 2, 10, 20] and mask == [0, 0, 0, 1]


def test_forgetful_causal_mask():
    attention = torch.tensor([[1, 1, 1, 1, 0]])
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    off = forgetful_causal_mask(attention, 0.0, 0.0)[0, 0]
    assert torch.equal(off, causal & attention.bool()[0][None, :])  # ratio 0: plain causal + padding
    everything = forgetful_causal_mask(attention, 1.0, 1.0)[0, 0]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:, 0] = True  # ratio 1: only the first token stays visible
    assert torch.equal(everything, expected)
    g = torch.Generator().manual_seed(0)
    big = forgetful_causal_mask(torch.ones(4, 200, dtype=torch.long), 0.5, 0.5, generator=g)
    past = torch.tril(torch.ones(200, 200, dtype=torch.bool), diagonal=-1)
    past[:, 0] = False
    kept = big[:, 0][:, past].float().mean().item()
    assert abs(kept - 0.5) < 0.01
    assert not big[:, 0][:, ~torch.tril(torch.ones(200, 200, dtype=torch.bool))].any()  # never the future


def test_a_reply_is_cut_where_the_first_phrase_begins():
    from pipeline.hindsight import Phrase

    phrase = Phrase("A helpful answer:", ("An unhelpful answer:", "A bad answer:"))
    reply = " Paris is the capital.\nA bad answer: Lyon\nAn unhelpful answer: Rome"
    assert phrase.cut(reply) == ("Paris is the capital.", True)
    assert phrase.cut(" Paris.") == ("Paris.", False)


def test_chains_from_feedback_use_critique_as_phrase():
    prov = {"source": "test"}
    records = [
        {
            "prompt": "Capital of Peru?",
            "response": "Lima.",
            "critique": "Correct and short.",
            "judgment": "good",
            "provenance": prov,
        },
        {
            "prompt": "Capital of Peru?",
            "response": "Cusco.",
            "critique": "Wrong city.",
            "judgment": "needs_work",
            "provenance": prov,
        },
        {"prompt": "Why?", "response": "Because.", "critique": "Vague.", "judgment": None, "provenance": prov},
    ]
    chains = chains_from_feedback(records, feedback_as_phrase=True)
    assert chains == [
        {
            "prompt": "Capital of Peru?",
            "positive": "Lima.",
            "negative": "Cusco.",
            "positive_phrase": "Feedback: Correct and short.\nAnswer:",
            "negative_phrase": "Feedback: Wrong city.\nAnswer:",
        }
    ]


def test_collator_orders_randomly_and_masks_replies_only(tiny_model_path):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer("tiny", padding_side="right")
    chains = [{"prompt": "Capital of Peru?", "positive": "Lima is the capital.", "negative": "Bananas are yellow."}]
    examples = build_examples(tok, chains)
    collator = CoHCollator(tok, max_length=256)
    torch.manual_seed(0)
    orders = set()
    for _ in range(20):
        batch = collator(examples)
        ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
        text = tok.decode(ids)
        learned = tok.decode(ids[mask.bool()])
        pos_at, neg_at = text.find("Lima is the capital."), text.find("Bananas are yellow.")
        orders.add("pn" if pos_at < neg_at else "np")
        # only the two replies (and the closing end-of-turn) carry loss; phrases and prompt do not
        assert sorted(learned.replace(tok.eos_token, "").split()) == sorted("Lima is the capital. Bananas are yellow.".split())
        assert learned.endswith(tok.eos_token)
        assert any(p in text for pair in collator.method.phrase_pairs for p in pair)
    assert orders == {"pn", "np"}


def test_trainer_loss_and_pretraining_term(tmp_path, tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from pipeline.models import device_policy, load_causal_lm, load_tokenizer
    from trainers.coh import CoHTrainer

    tok = load_tokenizer("tiny", padding_side="right")
    model = get_peft_model(
        load_causal_lm("tiny"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    ).eval()
    chains = [
        {"prompt": "Capital of Peru?", "positive": "Lima.", "negative": "Cusco, I think."},
        {"prompt": "Capital of Italy?", "positive": "Rome.", "negative": ""},
    ]
    examples = build_examples(tok, chains, pretraining=["The quick brown fox jumps over the lazy dog."])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **device_policy().trainer_kwargs())
    trainer = CoHTrainer(
        model=model, args=args, train_dataset=examples, data_collator=CoHCollator(tok, 128), method=CoHConfig(pretrain_weight=0.5)
    )
    torch.manual_seed(1)
    batch = CoHCollator(tok, 128)(examples)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        nll, count = 0.0, 0
        for row, mask, attn in zip(batch["input_ids"], batch["loss_mask"], batch["attention_mask"]):
            n = int(attn.sum())
            logp = torch.log_softmax(model(row[None, :n]).logits[0, :-1], -1)[torch.arange(n - 1), row[1:n]]
            nll += -(logp * mask[1:n]).sum().item()
            count += int(mask[1:n].sum())
        pt = batch["pretrain_input_ids"][0:1]
        pt_loss = model(pt, labels=pt).loss.item()
    assert loss == pytest.approx(nll / count + 0.5 * pt_loss, rel=1e-4)


def test_coh_stage_on_tiny_and_inference_phrase(tmp_path, tiny_model_path):
    prefs = [
        {
            "prompt": [{"role": "user", "content": f"What is the capital of {c}?"}],
            "chosen": [{"role": "assistant", "content": f"The capital of {c} is {t}."}],
            "rejected": [{"role": "assistant", "content": "I like trains."}],
        }
        for c, t in [("France", "Paris"), ("Peru", "Lima"), ("Italy", "Rome"), ("Japan", "Tokyo")]
    ]
    write_jsonl(prefs, tmp_path / "prefs.jsonl")
    write_jsonl([{"text": "Water boils at one hundred degrees Celsius at sea level."}], tmp_path / "pt.jsonl")
    write_jsonl(
        [{"prompt": "What is the capital of Chile?", "scope": "in_scope"}, {"prompt": "Name a fruit.", "scope": "out_of_scope"}],
        tmp_path / "eval.jsonl",
    )
    pipe = {
        "run_name": "coh-tiny",
        "model": "tiny",
        "stages": [
            {
                "name": "hindsight",
                "uses": "coh",
                "inputs": {"preferences": str(tmp_path / "prefs.jsonl"), "pretraining": str(tmp_path / "pt.jsonl")},
                "with": {
                    "max_steps": 8,
                    "per_device_train_batch_size": 2,
                    "max_length": 96,
                    "learning_rate": 5e-3,
                    "fcm_max_ratio": 0.15,
                    "pretrain_weight": 0.1,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                },
            },
            {
                "name": "check",
                "uses": "evaluate_feedback",
                "inputs": {"prompts": str(tmp_path / "eval.jsonl"), "adapter": "hindsight.adapter"},
                "with": {
                    "feedback": "Name the capital.",
                    "metric": {"kind": "contains", "value": "capital"},
                    "sampling": {"max_new_tokens": 8, "temperature": 0.0},
                },
            },
        ],
    }
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    run = result.run_dir
    coh = json.loads((run / "hindsight" / "adapter" / "coh.json").read_text())
    assert coh["phrase"] == "A helpful answer:" and "An unhelpful answer:" in coh["stop"]
    curves = json.loads((run / "hindsight" / "curves.json").read_text())
    feedback_loss = [row["loss/feedback"] for row in curves if "loss/feedback" in row]
    assert feedback_loss[-1] < feedback_loss[0]
    assert any("loss/pretrain" in row for row in curves)
    rows = load_rows(run / "check" / "evaluation")
    assert {r["condition"] for r in rows} == {"base", "in_context", "trained"}
    # that replies end before the next phrase: test_feedback_eval (these greedy replies of `tiny` are blank)


def test_the_model_honours_the_forgetful_mask(tiny_model_path):
    """Token by token: the 4-D mask reaches attention. With nothing hidden it equals the plain
    causal mask; hiding key 3 changes the logits at positions >= 3 and no earlier one."""
    from pipeline.models import load_causal_lm

    model = load_causal_lm("tiny").eval()
    ids = torch.tensor([[1, 200, 300, 400, 500, 600, 700, 2]])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits[0]
        none_hidden = model(input_ids=ids, attention_mask=forgetful_causal_mask(attention, 0.0, 0.0)).logits[0]
        mask = forgetful_causal_mask(attention, 0.0, 0.0)
        mask[..., 3] = False
        hidden = model(input_ids=ids, attention_mask=mask).logits[0]
    assert torch.allclose(plain, none_hidden, atol=1e-5)
    changed = [(hidden[t] - plain[t]).abs().max().item() > 1e-4 for t in range(ids.shape[1])]
    assert changed == [False, False, False, True, True, True, True, True]


def test_the_forgetful_mask_reaches_the_model_through_score_completions(tiny_model_path):
    """The trainer scores through `score_completions`: there too (the body and chunked head, as on
    the full forward) a hidden key changes the completion's log-probs after it, as the model's own
    forward with that mask does; it is not taken for a right-padded batch's mask and dropped."""
    from pipeline.models import load_causal_lm
    from trainers.sequences import score_completions, token_logps

    model = load_causal_lm("tiny").eval()
    ids = torch.tensor([[1, 200, 300, 400, 500, 600, 700, 2], [1, 210, 310, 410, 510, 0, 0, 0]])
    attention = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    completion = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0]])
    mask = forgetful_causal_mask(attention, 0.0, 0.0)
    mask[..., 3] = False
    keep = completion[:, 1:].bool()
    for full_forward in (False, True):
        with torch.no_grad():
            plain = score_completions(model, ids, attention, completion, full_forward=full_forward).logps
            forgetful = score_completions(model, ids, mask, completion, full_forward=full_forward).logps
            own = token_logps(model(input_ids=ids, attention_mask=mask).logits, ids)
        torch.testing.assert_close(forgetful[keep], own[keep], atol=1e-5, rtol=0)
        changed = (forgetful - plain).abs() > 1e-4  # position t scores token t + 1: from t = 3 on
        assert changed[:, 3:][keep[:, 3:]].all() and not changed[:, :3].any(), full_forward


def test_training_teaches_the_feedback_phrases(tmp_path, tiny_model_path):
    """Behaviour: after CoH training the positive phrase makes the good reply likelier than the
    negative phrase does, and the other way round for the bad reply (it was not so before)."""
    from transformers import TrainingArguments

    from pipeline.chat import render_ids
    from pipeline.models import device_policy, load_causal_lm, load_tokenizer
    from trainers.coh import CoHTrainer

    tok = load_tokenizer("tiny", padding_side="right")
    chains = [
        {"prompt": f"What is the capital of {c}?", "positive": f"The capital of {c} is {t}.", "negative": "I like trains."}
        for c, t in [("France", "Paris"), ("Peru", "Lima"), ("Italy", "Rome"), ("Japan", "Tokyo")]
    ]
    torch.manual_seed(0)
    model = load_causal_lm("tiny")  # every weight trains: the random model learns in a few steps
    pairs = [("A helpful answer:", "An unhelpful answer:")]  # one pair, so the check below is the trained one

    def reply_logp(prompt, phrase, reply):
        context = render_ids(tok, prompt) + tok(phrase, add_special_tokens=False)["input_ids"]
        target = tok(" " + reply, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        return logp[len(context) - 1 :].sum().item()

    def preference_gaps():  # on a training prompt: does the phrase select the kind of reply?
        example = {
            "prompt": "What is the capital of Peru?",
            "positive": "The capital of Peru is Lima.",
            "negative": "I like trains.",
        }
        good = reply_logp(example["prompt"], pairs[0][0], example["positive"]) - reply_logp(
            example["prompt"], pairs[0][1], example["positive"]
        )
        bad = reply_logp(example["prompt"], pairs[0][1], example["negative"]) - reply_logp(
            example["prompt"], pairs[0][0], example["negative"]
        )
        return good, bad

    before = preference_gaps()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=40,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        save_strategy="no",
        logging_steps=5,
        remove_unused_columns=False,
        **device_policy().trainer_kwargs(),
    )
    trainer = CoHTrainer(
        model=model,
        args=args,
        train_dataset=build_examples(tok, chains),
        data_collator=CoHCollator(tok, 128, CoHConfig(phrase_pairs=pairs)),
    )
    trainer.train()
    model.eval()
    after = preference_gaps()
    assert after[0] > before[0] + 0.5 and after[1] > before[1] + 0.5, (before, after)
    assert after[0] > 0.5 and after[1] > 0.5


def test_chains_from_feedback_pair_up_several_replies_to_one_prompt():
    """good A, needs_work B, good C, needs_work D on one prompt: two full chains (A/B, C/D)."""
    records = [
        {"prompt": "Capital of France?", "response": r, "judgment": j}
        for r, j in (("A", "good"), ("B", "needs_work"), ("C", "good"), ("D", "needs_work"))
    ]
    chains = chains_from_feedback(records)
    assert [(c.get("positive"), c.get("negative")) for c in chains] == [("A", "B"), ("C", "D")]
