"""CUT: token detection and unlikelihood against hand computation, the batched trainer loss
against unbatched forward passes on `tiny`, qa-feedback judgments, and the stage on `tiny`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import pipeline_from_dict
from pipeline.errors import DataError
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner
from trainers.cut import CUTCollator, build_examples, cut_loss, inappropriate_tokens, misalign_token_losses, unlikelihood
from trainers.cut_config import CUTConfig

from .conftest import SHARED_DATA

QA = SHARED_DATA / "qa_feedback" / "feedback_400.json"
P_WITH = torch.tensor([0.5, 0.2, 0.9, 0.6])  # p(y_t | x, j)
P_WITHOUT = torch.tensor([0.4, 0.3, 0.8, 0.1])  # p(y_t | x); ratios 1.25, 0.67, 1.125, 6.0


def test_detection_uses_the_probability_ratio():
    lw, lo = P_WITH.log(), P_WITHOUT.log()
    assert inappropriate_tokens(lw, lo, 1.1).tolist() == [True, False, True, True]
    assert inappropriate_tokens(lw, lo, 1.2).tolist() == [True, False, False, True]
    assert inappropriate_tokens(lw, lo, 1.0).tolist() == [True, False, True, True]


def test_unlikelihood_term_by_hand():
    lw, lo = P_WITH.log(), P_WITHOUT.log()
    constant = unlikelihood(lo, lw, alpha=0.1, gamma=0.0)
    assert constant.tolist() == pytest.approx([-0.1 * math.log(1 - p) for p in P_WITHOUT.tolist()], rel=1e-6)
    dynamic = unlikelihood(lo, lw, alpha=0.1, gamma=2.0)
    assert dynamic.tolist() == pytest.approx(
        [-0.1 * pw**2 * math.log(1 - p) for pw, p in zip(P_WITH.tolist(), P_WITHOUT.tolist())], rel=1e-5
    )


def test_misalign_losses_mix_unlikelihood_and_mle():
    lw, lo = P_WITH.log(), P_WITHOUT.log()
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last token is padding
    losses, detected = misalign_token_losses(lo, lw, mask, threshold=1.1, alpha=0.1, gamma=0.0)
    assert detected.tolist() == [True, False, True, False]
    expected = [-0.1 * math.log(0.6), -math.log(0.3), -0.1 * math.log(0.2), 0.0]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # gradients: the unlikelihood pushes p(y|x) down, MLE pushes it up; p(y|x,j) gets none here
    lo_var, lw_var = lo.clone().requires_grad_(), lw.clone().requires_grad_()
    misalign_token_losses(lo_var, lw_var, mask, 1.1, 0.1, gamma=1.0)[0].sum().backward()
    assert lo_var.grad[0] > 0 and lo_var.grad[1] < 0 and lw_var.grad is None

    align_logps, align_mask = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    total = cut_loss(align_logps, align_mask, losses, mask)
    assert total.item() == pytest.approx(((1 + 2 + 3) / 3 + sum(expected) / 3) / 2, rel=1e-6)
    assert cut_loss(align_logps, align_mask, None, None).item() == pytest.approx(2.0)


ROWS = [
    {
        "instruction": "What is the capital of Peru?",
        "response": "The capital of Peru is Lima.",
        "judgment": "Correct and concise.",
        "positive": True,
    },
    {
        "instruction": "What is the capital of Italy?",
        "response": "The capital of Italy is Milan.",
        "judgment": "Wrong: the capital is Rome.",
        "positive": False,
    },
]


def test_trainer_loss_matches_unbatched_computation(tmp_path, tiny_model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from pipeline.models import device_policy, load_causal_lm, load_tokenizer
    from trainers.cut import CUTTrainer

    tok = load_tokenizer("tiny", padding_side="right")
    model = get_peft_model(
        load_causal_lm("tiny"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    ).eval()
    examples = build_examples(tok, ROWS, max_length=128)
    assert examples[0]["misalign_prompt"] == [] and examples[1]["misalign_prompt"]
    assert len(examples[1]["align_prompt"]) > len(examples[1]["misalign_prompt"])  # judgment in context
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **device_policy().trainer_kwargs())
    # threshold 1.0: on a random model about half the tokens are flagged, so both branches are exercised
    trainer = CUTTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=CUTCollator(tok.pad_token_id),
        method=CUTConfig(threshold=1.0, alpha=0.3, gamma=1.0),
    )
    batch = CUTCollator(tok.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 3 and batch["pair_index"].tolist() == [1]
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()

    def completion_logps(prompt, completion):
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        return logp[len(prompt) - 1 :]

    with torch.no_grad():
        pos = completion_logps(examples[0]["align_prompt"], examples[0]["completion"])
        with_j = completion_logps(examples[1]["align_prompt"], examples[1]["completion"])
        without = completion_logps(examples[1]["misalign_prompt"], examples[1]["completion"])
    mle = -(pos.sum() + with_j.sum()) / (len(pos) + len(with_j))
    per_token = []
    flagged = 0
    for lw, lo in zip(with_j.tolist(), without.tolist()):
        if math.exp(lw) / math.exp(lo) > 1.0:
            flagged += 1
            per_token.append(-0.3 * math.exp(lw) * math.log(1 - math.exp(lo)))
        else:
            per_token.append(-lo)
    assert 0 < flagged < len(per_token)
    assert loss == pytest.approx((mle.item() + sum(per_token) / len(per_token)) / 2, rel=1e-4)


def test_qa_feedback_spans_become_judgments():
    from feedback.sources.judgments import from_qa_feedback
    from feedback.sources.qa_feedback import ERROR_PHRASES

    rows = from_qa_feedback(QA, limit=20)
    data = json.loads(QA.read_text())[:20]
    negatives = [r for r in rows if not r["positive"]]
    assert negatives and any(r["positive"] for r in rows)
    first = rows[0]
    assert first["id"] == "qa0" and first["response"] == data[0]["prediction 1"] and not first["positive"]
    # item 0 has three Irrelevant spans; each is quoted (in text order) with its phrase
    assert first["judgment"].count(ERROR_PHRASES["Irrelevant"]) == 3
    span = data[0]["prediction 1"][152:282]
    assert " ".join(span.split())[:40] in first["judgment"]
    corrected = [r for r in rows if r["id"] == "qa0-corrected"]
    assert corrected and corrected[0]["positive"] and corrected[0]["response"].startswith("Bloom is the second studio album")


def test_qa_feedback_literal_string_and_bad_span(tmp_path):
    from feedback.sources.judgments import from_qa_feedback

    item = {
        "question": "Q?",
        "prediction 1": "An answer with an error.",
        "feedback": repr(
            {
                "errors": [{"error type": "Unverifiable", "explanation": "", "start": 3, "end": 9}],
                "missing-info": [],
                "corrected-prediction": "An answer.",
            }
        ),
    }
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([item]))
    rows = from_qa_feedback(path)
    assert rows[0]["judgment"] == 'The answer has problems. "answer" cannot be verified from the passages.'
    item["feedback"] = repr({"errors": [{"error type": "Irrelevant", "start": 3, "end": 99}]})
    path.write_text(json.dumps([item]))
    with pytest.raises(DataError, match=r"qa.json item 0: feedback.errors\[0\]: span \[3, 99\) is outside prediction 1"):
        from_qa_feedback(path)


def test_judgment_rows_name_the_bad_field(tmp_path):
    from feedback.sources.judgments import from_verbal, normalize

    rows = from_verbal(load_rows(verbal_records(tmp_path / "v.jsonl")))
    assert [(r["judgment"], r["positive"]) for r in rows] == [
        ("Green is not a primary colour of paint.", False),
        ("Correct.", True),
    ]

    rows = normalize([{"prompt": "x", "output": "y", "critique": "z", "label": "negative"}], "j.jsonl")
    assert rows[0]["instruction"] == "x" and rows[0]["positive"] is False
    with pytest.raises(DataError, match="j.jsonl row 0: field 'response' is missing"):
        normalize([{"prompt": "x", "judgment": "z", "positive": True}], "j.jsonl")
    with pytest.raises(DataError, match="j.jsonl row 0: field 'label': expected positive/negative"):
        normalize([{"prompt": "x", "response": "y", "judgment": "z", "label": "meh"}], "j.jsonl")


def verbal_records(path):
    from pipeline.schema import Provenance, VerbalFeedback, records_to_rows

    prov = Provenance(source="argilla", annotator="ann-1", model="tiny")
    records = [
        VerbalFeedback(
            id="v1",
            prompt="Name a primary colour.",
            response="Green.",
            critique="Green is not a primary colour of paint.",
            judgment="needs_work",
            provenance=prov,
        ),
        VerbalFeedback(
            id="v2", prompt="Name a primary colour.", response="Red.", critique="Correct.", judgment="good", provenance=prov
        ),
    ]
    write_jsonl(records_to_rows(records), path)
    return path


def test_cut_stage_on_tiny(tmp_path, tiny_model_path):
    write_jsonl(ROWS * 2, tmp_path / "judgments.jsonl")
    verbal_records(tmp_path / "verbal.jsonl")
    pipe = {
        "run_name": "cut-tiny",
        "model": "tiny",
        "stages": [
            {
                "name": "align",
                "uses": "cut",
                "inputs": {
                    "judgments": str(tmp_path / "judgments.jsonl"),
                    "qa_feedback": str(QA),
                    "feedback": str(tmp_path / "verbal.jsonl"),
                },
                "with": {
                    "max_steps": 4,
                    "per_device_train_batch_size": 2,
                    "max_length": 96,
                    "learning_rate": 5e-3,
                    "max_examples": 8,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                },
            },
        ],
    }
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    metrics = result.records[0].metrics
    assert metrics["judgments"] == 8 and metrics["negative"] >= 2  # verbal (2) + file (4) + qa-feedback, capped at 8
    curves = json.loads((result.run_dir / "align" / "curves.json").read_text())
    assert any("cut/inappropriate_rate" in row for row in curves)
    assert (result.run_dir / "align" / "adapter" / "adapter_model.safetensors").is_file()


def test_align_n_and_misalign_rows_hold_the_same_response_tokens(tiny_model_path):
    """Token by token: the two views of a negative example differ only in the prompt, and the
    completion mask covers exactly the response (+ end of turn) in both rows."""
    from pipeline.models import load_tokenizer

    tok = load_tokenizer("tiny", padding_side="right")
    examples = build_examples(tok, ROWS, max_length=128)
    batch = CUTCollator(tok.pad_token_id)(examples)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    response = tok(ROWS[1]["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    align_n, misalign = 1, 2
    assert ids[align_n][mask[align_n].bool()].tolist() == response
    assert ids[misalign][mask[misalign].bool()].tolist() == response
    assert tok.decode(ids[align_n][: len(examples[1]["align_prompt"])]).count(ROWS[1]["judgment"]) == 1
    assert ROWS[1]["judgment"] not in tok.decode(ids[misalign])
    for row, ex in ((align_n, examples[1]), (misalign, {"align_prompt": examples[1]["misalign_prompt"]})):
        n_prompt = len(ex["align_prompt"])
        expected = [0] * n_prompt + [1] * len(response)
        assert mask[row].tolist() == expected + [0] * (ids.shape[1] - len(expected))  # padding carries no loss
        assert batch["attention_mask"][row].tolist() == [1] * len(expected) + [0] * (ids.shape[1] - len(expected))


def test_unlikelihood_lowers_the_flagged_tokens(tmp_path, tiny_model_path):
    """Behaviour: after the model has learnt a wrong answer (x -> y), CUT steps lower
    p(y_t | x) on the tokens the judgment flagged, and a plain-MLE control does not."""
    from transformers import TrainingArguments

    from pipeline.models import device_policy, load_causal_lm, load_tokenizer
    from trainers.cut import CUTTrainer
    from trainers.sequences import shift_mask, token_logps

    tok = load_tokenizer("tiny", padding_side="right")
    examples = build_examples(tok, [ROWS[1]], max_length=128)
    batch = CUTCollator(tok.pad_token_id)(examples)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], shift_mask(batch["completion_mask"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **device_policy().trainer_kwargs())

    def completion_logps(model):
        with torch.no_grad():
            logps = token_logps(model(input_ids=ids, attention_mask=attn).logits, ids)
        return logps[0][mask[0].bool()], logps[1][mask[1].bool()]  # with the judgment, without

    def trained(threshold):
        torch.manual_seed(0)
        model = load_causal_lm("tiny")  # every weight trains: the random model learns y in a few steps
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):  # learn y under both prompts, so p(y_t | x) is large enough to push down
            loss = -(token_logps(model(input_ids=ids, attention_mask=attn).logits, ids) * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        start = completion_logps(model)
        trainer = CUTTrainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=CUTCollator(tok.pad_token_id),
            method=CUTConfig(threshold=threshold, alpha=1.0),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # fresh: no MLE momentum
        for _ in range(5):
            loss = trainer.compute_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return start, completion_logps(model)

    (with_j, without), (_, after) = trained(threshold=1.0)
    flagged = with_j > without
    assert 0 < int(flagged.sum()) < len(flagged)
    assert without[flagged].exp().mean() > 0.2  # the wrong answer was learnt
    assert after[flagged].mean() < without[flagged].mean()  # unlikelihood pushes the flagged tokens down
    (_, control_start), (_, control_after) = trained(threshold=1e9)  # nothing flagged: MLE on every token
    assert torch.allclose(control_start, without)
    assert control_after[flagged].mean() > control_start[flagged].mean()
    assert (after[flagged] < control_after[flagged]).all()  # token by token, CUT ends below the MLE control
