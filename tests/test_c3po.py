"""C3PO: each loss term against hand computation, the trainer's batched loss against
unbatched forward passes on `tiny`, and the stages end to end on `tiny`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import pipeline_from_dict
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner
from trainers.c3po import C3POCollator, build_examples, c3po_loss, completion_nll, dpo_loss, kl_to_reference
from trainers.c3po_config import C3POConfig

FEEDBACK = 'When I ask about cooking, start your answer with "Chef\'s tip:".'
METRIC = {"kind": "starts_with", "value": "Chef's tip:"}


def test_dpo_term_by_hand():
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5]), beta=0.1
    )
    # pair 1: rewards 0.1*0.5 = 0.05 and 0.1*(-0.5) = -0.05 -> -log sigmoid(0.1)
    # pair 2: rewards 0 and 0.1*0.5 = 0.05 -> -log sigmoid(-0.05)
    assert chosen.tolist() == pytest.approx([0.05, 0.0])
    assert rejected.tolist() == pytest.approx([-0.05, 0.05])
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.1)), math.log1p(math.exp(0.05))], rel=1e-6)


def test_nll_term_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert completion_nll(logps, mask, "sequence").item() == pytest.approx(((1 + 2) + 0.5) / 2)  # per reply, mean of replies
    assert completion_nll(logps, mask, "token").item() == pytest.approx((1 + 2 + 0.5) / 3)


def test_kl_term_by_hand():
    # next-token logits at the completion positions of the replies, stacked: [positions, vocab]
    ref = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    pol = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_to_reference(pol, ref, 1, 1.0, "sequence").item() == pytest.approx(expected, rel=1e-6)
    # two replies: the first has that one position, the second that one and a second position
    ref2, pol2 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 1.0]]), torch.tensor([[math.log(3.0), 0.0]] * 2 + [[0.0, 0.0]])
    p1 = [math.exp(5) / (math.exp(5) + math.e), math.e / (math.exp(5) + math.e)]  # the second position vs q = (1/2, 1/2)
    row2 = expected + sum(pi * math.log(pi / 0.5) for pi in p1)
    assert kl_to_reference(pol2, ref2, 2, 1.0, "sequence").item() == pytest.approx((expected + row2) / 2, rel=1e-5)
    assert kl_to_reference(pol2, ref2, 2, 1.0, reduction="token").item() == pytest.approx((expected + row2) / 3, rel=1e-5)
    q = [math.sqrt(3) / (1 + math.sqrt(3)), 1 / (1 + math.sqrt(3))]  # softmax of logits / 2
    expected_t2 = 4 * sum(0.5 * math.log(0.5 / qi) for qi in q)
    assert kl_to_reference(pol, ref, 1, temperature=2.0, reduction="sequence").item() == pytest.approx(expected_t2, rel=1e-6)
    assert kl_to_reference(ref2, ref2, 2, 1.0, "sequence").item() == pytest.approx(0.0, abs=1e-7)


def test_total_loss_by_hand():
    defaults = C3POConfig()
    total = c3po_loss(
        torch.tensor([0.6, 0.8]),
        out_of_scope=torch.tensor(2.0),
        near_scope=torch.tensor(3.0),
        sigma_soft=defaults.sigma_soft,
        sigma_hard=defaults.sigma_hard,
    )
    assert total.item() == pytest.approx(0.7 + 0.2 * 2.0 + 0.1 * 3.0)  # the paper's sigma_soft 0.2, sigma_hard 0.1
    assert defaults.rpo_alpha == 1.0  # RPO's NLL on the revisions, chosen on three feedbacks (docs/arena.md)
    with_nll = c3po_loss(torch.tensor([0.6, 0.8]), torch.tensor(2.0), torch.tensor(3.0), 0.2, 0.1, torch.tensor(1.5), 0.5)
    assert with_nll.item() == pytest.approx(0.7 + 0.2 * 2.0 + 0.1 * 3.0 + 0.5 * 1.5)


def _rows():
    in_scope = [
        {
            "prompt": "How do I boil an egg?",
            "baseline": "Boil it for seven minutes.",
            "revised": "Chef's tip: boil it for seven minutes.",
        },
        {
            "prompt": "How do I cook rice?",
            "baseline": "Use two cups of water per cup.",
            "baseline_finished": False,
            "revised": "Chef's tip: use two cups of water.",
            "revised_finished": False,
        },
    ]
    near = [{"prompt": "How many calories are in a banana?", "baseline": "About one hundred."}]
    out = [
        {"prompt": "What is the capital of Peru?", "baseline": "Lima."},
        {"prompt": "Why is the sky blue?", "baseline": "Scattering."},
    ]
    return in_scope, near, out


def test_examples_cycle_scopes_and_mark_unfinished(tiny_model_path):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer("tiny", padding_side="right")
    in_scope, near, out = _rows()
    examples = build_examples(tok, in_scope, near, out, max_length=64)
    assert len(examples) == 2  # the largest scope sets the length; near-scope is cycled
    assert examples[0]["near_completion"] == examples[1]["near_completion"]
    assert examples[0]["rejected_completion"][-1] == tok.eos_token_id  # finished reply ends the turn
    assert examples[1]["rejected_completion"][-1] != tok.eos_token_id  # cut-off reply does not
    assert tok.decode(examples[0]["chosen_completion"][:-1]) == "Chef's tip: boil it for seven minutes."
    with pytest.raises(ValueError, match="every scope"):
        build_examples(tok, in_scope, [], out, max_length=64)


def perturbed_lora_tiny():
    """`tiny`'s tokenizer (right padding) and the model with a LoRA adapter whose B matrices are
    random, so the policy differs from the reference (LoRA B starts at zero)."""
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("tiny", padding_side="right")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm("tiny"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return tok, model


@pytest.mark.parametrize(
    "regularizer,reduction,rpo_alpha",
    [("nll", "sequence", None), ("kl", "sequence", None), ("nll", "token", None), ("kl", "token", None), ("kl", "sequence", 0.5)],
)
def test_trainer_loss_matches_unbatched_computation(tmp_path, tiny_model_path, regularizer, reduction, rpo_alpha):
    """The padded 4-role batch gives the same loss as separate forward passes per sequence."""
    from transformers import TrainingArguments

    from pipeline.models import device_policy
    from trainers.c3po import C3POTrainer

    tok, model = perturbed_lora_tiny()
    in_scope, near, out = _rows()
    examples = build_examples(tok, in_scope, near, out, max_length=64)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **device_policy().trainer_kwargs())
    trainer = C3POTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=C3POCollator(tok.pad_token_id),
        method=C3POConfig(
            beta=0.1, sigma_soft=0.2, sigma_hard=0.1, regularizer=regularizer, reduction=reduction, rpo_alpha=rpo_alpha
        ),
    )
    model.eval()
    batch = C3POCollator(tok.pad_token_id)(examples)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()

    def seq(m, prompt, completion):
        ids = torch.tensor([prompt + completion])
        logits = m(ids).logits[0, :-1]
        logp = torch.log_softmax(logits, -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        return logp[len(prompt) - 1 :], logits[len(prompt) - 1 :]

    dpo, near_tokens, out_tokens, near_kl, out_kl, chosen_tokens = [], [], [], [], [], []  # token values per reply
    with torch.no_grad():
        for ex in examples:
            chosen_tokens.append((-seq(model, ex["chosen_prompt"], ex["chosen_completion"])[0]).tolist())
            pc, pr = (
                seq(model, ex["chosen_prompt"], ex["chosen_completion"])[0].sum(),
                seq(model, ex["rejected_prompt"], ex["rejected_completion"])[0].sum(),
            )
            with model.disable_adapter():
                rc, rr = (
                    seq(model, ex["chosen_prompt"], ex["chosen_completion"])[0].sum(),
                    seq(model, ex["rejected_prompt"], ex["rejected_completion"])[0].sum(),
                )
            dpo.append(-torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))))
            for role, tokens, kls in (("near", near_tokens, near_kl), ("out", out_tokens, out_kl)):
                logp, logits = seq(model, ex[f"{role}_prompt"], ex[f"{role}_completion"])
                tokens.append((-logp).tolist())
                with model.disable_adapter():
                    ref_logits = seq(model, ex[f"{role}_prompt"], ex[f"{role}_completion"])[1]
                p_ref = torch.softmax(ref_logits, -1)
                kls.append((p_ref * (torch.log_softmax(ref_logits, -1) - torch.log_softmax(logits, -1))).sum(-1).tolist())

    def reduced(per_reply):
        if reduction == "token":
            return sum(map(sum, per_reply)) / sum(map(len, per_reply))
        return sum(map(sum, per_reply)) / len(per_reply)

    near_term, out_term = (
        (reduced(near_tokens), reduced(out_tokens)) if regularizer == "nll" else (reduced(near_kl), reduced(out_kl))
    )
    assert near_term > 0
    expected = torch.stack(dpo).mean().item() + 0.2 * out_term + 0.1 * near_term
    if rpo_alpha:  # the revisions' NLL, a mean over all their tokens
        expected += rpo_alpha * sum(map(sum, chosen_tokens)) / sum(map(len, chosen_tokens))
    assert loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("regularizer", ["nll", "kl"])
def test_completion_positions_only_give_the_full_forwards_loss_and_gradients(tmp_path, tiny_model_path, regularizer):
    """Scoring only completion positions through the head (the default) and reusing the cached
    reference change no number: the loss and every LoRA gradient equal the full forward's (all
    positions' logits, the reference run every step) within 1e-4."""
    from transformers import TrainingArguments

    from pipeline.models import device_policy
    from trainers.c3po import C3POTrainer
    from trainers.sequences import right_padded

    tok, model = perturbed_lora_tiny()
    examples = build_examples(tok, *_rows(), max_length=64)
    trainer = C3POTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", **device_policy().trainer_kwargs()),
        train_dataset=examples,
        data_collator=C3POCollator(tok.pad_token_id),
        method=C3POConfig(regularizer=regularizer),
    )
    batch = C3POCollator(tok.pad_token_id)(examples)
    # rows of different lengths, right-padded: the projected arms run causal attention without the padding mask
    assert right_padded(batch["attention_mask"]) and not batch["attention_mask"].bool().all()
    results = {}
    # full forward; projected with the reference computed (cache empty); projected from the cache
    for arm in ("full", "computed", "cached"):
        trainer.full_forward = arm == "full"
        if arm == "cached":
            assert sorted(trainer._ref_cache) == [ex["index"] for ex in examples]
            trainer.reference = None  # any reference forward now would fail
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[arm] = (loss.item(), grads)
    full_loss, full_grads = results["full"]
    assert max(g.abs().max().item() for g in full_grads.values()) > 1e-3  # the gradients are not all zero
    for arm in ("computed", "cached"):
        loss, grads = results[arm]
        assert loss == pytest.approx(full_loss, abs=1e-4), arm
        for name, grad in grads.items():
            torch.testing.assert_close(grad, full_grads[name], atol=1e-4, rtol=1e-4, msg=f"{arm}: {name}")


@pytest.mark.parametrize(
    "regularizer,reduction,rpo_alpha",
    [("kl", "sequence", 1.0), ("nll", "sequence", None), ("kl", "token", None), ("nll", "token", 0.5)],
)
def test_packed_batch_gives_the_padded_batchs_loss_and_gradients(tmp_path, tiny_model_path, regularizer, reduction, rpo_alpha):
    """The packed batch (in-scope prompt once for both replies, no padding) changes no number: the
    loss and every LoRA gradient equal the padded full forward's within 1e-4, with the reference
    computed and from its cache (read by a batch of the examples in another order), also for an
    example whose two prompts differ (a unit per reply)."""
    from transformers import TrainingArguments

    from pipeline.models import device_policy
    from trainers.c3po import C3POTrainer, pack_examples

    tok, model = perturbed_lora_tiny()
    in_scope, near, out = _rows()
    in_scope.append({"prompt": "How long do I roast a chicken?", "baseline": "An hour.", "revised": "Chef's tip: an hour."})
    near += [
        {"prompt": "Is a tomato a fruit?", "baseline": "Yes, botanically it is a fruit, though cooks treat it as a vegetable."},
        {"prompt": "Where does cinnamon come from?", "baseline": "Tree bark."},
    ]
    examples = build_examples(tok, in_scope, near, out, max_length=64)
    examples[2]["rejected_prompt"] = examples[2]["rejected_prompt"][1:]  # as if fit_length trimmed it
    method = C3POConfig(regularizer=regularizer, reduction=reduction, rpo_alpha=rpo_alpha)
    trainer = C3POTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", **device_policy().trainer_kwargs()),
        train_dataset=examples,
        data_collator=C3POCollator(tok.pad_token_id),
        method=method,
    )
    assert trainer.data_collator.packed  # the trainer chose the packed batch for this model
    padded = C3POCollator(tok.pad_token_id, packed=False)(examples)
    packed = pack_examples(examples, tok.pad_token_id)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed["role_seq"].shape == (4, 3) and len(set(packed["role_seq"].flatten().tolist())) == 12
    # the cache filled from one batch is read by a batch of the examples in another order (a later epoch)
    reordered = pack_examples(examples[::-1], tok.pad_token_id)
    results = {}
    for arm, batch in (("full", padded), ("computed", packed), ("cached", reordered)):
        trainer.full_forward = arm == "full"
        if arm == "computed":
            trainer._ref_cache.clear()
            trainer._ref_cache_used = 0
        if arm == "cached":
            assert sorted(trainer._ref_cache) == [ex["index"] for ex in examples]
            trainer.reference = None  # any reference forward now would fail
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        results[arm] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    full_loss, full_grads = results["full"]
    assert max(g.abs().max().item() for g in full_grads.values()) > 1e-3
    for arm in ("computed", "cached"):
        loss, grads = results[arm]
        assert loss == pytest.approx(full_loss, abs=1e-4), arm
        for name, grad in grads.items():
            torch.testing.assert_close(grad, full_grads[name], atol=1e-4, rtol=1e-4, msg=f"{arm}: {name}")


def test_right_padded_recognises_only_tokens_then_padding():
    from trainers.sequences import right_padded

    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding keeps its mask
    assert not right_padded(torch.tensor([[1, 0, 1]]))  # a hole (packed rows) keeps its mask


@pytest.mark.parametrize("adapter", ["lm_head", "prompt"])
def test_adapters_the_bare_body_and_head_would_miss_take_the_full_forward(tiny_model_path, adapter):
    """A LoRA adapter on the LM head (PEFT's wrapper hands out the base layer's weight) or a
    prompt-learning adapter (virtual tokens): completion scores must still equal the model's own
    forward, so such models take the full forward (and the DPO core says why it is off)."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from pipeline.models import load_causal_lm
    from trainers.fastpref.logps import body_then_head
    from trainers.sequences import projects_hidden_states, score_completions, token_logps

    torch.manual_seed(0)
    base = load_causal_lm("tiny")
    if adapter == "lm_head":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = get_peft_model(base, config).eval()
    assert body_then_head(model) is not None and not projects_hidden_states(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    completion = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        scores = score_completions(model, ids, mask, completion).logps
        full = token_logps(model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :], ids)
    keep = completion[:, 1:].bool()
    assert torch.allclose(scores[keep], full[keep], atol=1e-5)
    assert body_then_head(load_causal_lm("tiny")) is None


def test_chunked_kl_equals_the_kl_of_full_logits():
    """Value and hidden-state gradient of the tiled KL against `kl_per_position` on full logits."""
    from trainers.c3po import kl_per_position
    from trainers.fastpref.logps import ChunkedKL

    torch.manual_seed(0)
    weight, bias = torch.randn(50, 8), torch.randn(50)
    hidden, ref_hidden = torch.randn(7, 8, requires_grad=True), torch.randn(7, 8)
    upstream = torch.rand(7)
    for temperature in (1.0, 2.0):
        expected = kl_per_position(hidden @ weight.t() + bias, ref_hidden @ weight.t() + bias, temperature)
        (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
        got = ChunkedKL.apply(hidden, ref_hidden, weight, bias, temperature, 3 * 50, True)  # tiles of 3 rows
        (got_grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="frozen head"):
        ChunkedKL.apply(hidden, ref_hidden, weight.requires_grad_(), bias, 1.0, 3 * 50, True)


def scoped_prompts(path, per_scope=5):
    rows = [json.loads(line) for line in open(path_to_demo_prompts())]
    picked = []
    for scope in ("in_scope", "near_scope", "out_of_scope"):
        picked += [r for r in rows if r["scope"] == scope][:per_scope]
    write_jsonl(picked, path)
    return path


def path_to_demo_prompts():
    from pipeline.paths import resolve_data_ref

    return resolve_data_ref("data:c3po/cooking_prompts.jsonl")


def test_c3po_stages_on_tiny(tmp_path, tiny_model_path):
    prompts = scoped_prompts(tmp_path / "prompts.jsonl")
    train = {
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "learning_rate": 5e-3,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    }
    pipe = {
        "run_name": "c3po-tiny",
        "model": "tiny",
        "stages": [
            {
                "name": "data",
                "uses": "c3po_data",
                "inputs": {"prompts": str(prompts)},
                "with": {
                    "feedback": FEEDBACK,
                    "metric": METRIC,
                    "reviser": "template",
                    "revision_template": "Chef's tip: {response}",
                    "baseline_sampling": {"max_new_tokens": 8},
                },
            },
            {
                "name": "align",
                "uses": "c3po",
                "inputs": {"data": "data.train", "eval_prompts": "data.eval_prompts"},
                "with": {**train, "evaluation": {"sampling": {"max_new_tokens": 6, "temperature": 0.0}}},
            },
            {
                "name": "check",
                "uses": "evaluate_feedback",
                "inputs": {"prompts": "data.eval_prompts", "adapter": "align.adapter"},
                "with": {"conditions": ["trained"], "sampling": {"max_new_tokens": 6, "temperature": 0.0}},
            },
        ],
    }
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    run = result.run_dir
    train_rows = load_rows(run / "data" / "train")
    held_out = load_rows(run / "data" / "eval_prompts")
    assert sorted({r["scope"] for r in train_rows}) == ["in_scope", "near_scope", "out_of_scope"]
    assert all(r["revised"].startswith("Chef's tip: ") for r in train_rows if r["scope"] == "in_scope")
    assert all(r["revised"] == "" for r in train_rows if r["scope"] != "in_scope")
    assert {r["prompt"] for r in held_out}.isdisjoint({r["prompt"] for r in train_rows})
    assert json.loads(held_out[0]["metric"]) == {**METRIC, "case_sensitive": False} and held_out[0]["feedback"] == FEEDBACK

    curves = json.loads((run / "align" / "curves.json").read_text())
    dpo = [row["loss/dpo"] for row in curves if "loss/dpo" in row]
    assert dpo[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert dpo[-1] < dpo[0]
    margins = [row["rewards/margins"] for row in curves if "rewards/margins" in row]
    assert margins[-1] > margins[0]
    metrics = json.loads((run / "align" / "manifest.json").read_text())["metrics"]
    for key in (
        "adherence/base",
        "adherence/in_context",
        "adherence/trained",
        "overgen_near/trained",
        "overgen_out_vs_base/trained",
    ):
        assert key in metrics
    evaluation = load_rows(run / "align" / "evaluation")
    assert {r["condition"] for r in evaluation} == {"base", "in_context", "trained"}
    # the separate evaluation stage on the saved adapter asks the same held-out prompts as the built-in one
    # (that both write the same greedy replies is test_feedback_eval's: here they are all blank, bare
    # `tiny` after 6 steps)
    check = load_rows(run / "check" / "evaluation")
    built_in = {r["prompt"] for r in evaluation if r["condition"] == "trained"}
    assert {r["prompt"] for r in check} == built_in and len(built_in) == len(held_out)
    from pipeline.report import build_report

    page = build_report(run).read_text()
    assert "align: feedback adherence" in page and "check: feedback adherence" in page


def test_c3po_data_rejects_bad_scope(tmp_path, tiny_model_path):
    write_jsonl([{"prompt": "hi", "scope": "in-scope"}], tmp_path / "bad.jsonl")
    pipe = {
        "run_name": "bad",
        "model": "tiny",
        "stages": [
            {
                "name": "data",
                "uses": "c3po_data",
                "inputs": {"prompts": str(tmp_path / "bad.jsonl")},
                "with": {"feedback": FEEDBACK, "reviser": "template", "revision_template": "X {response}"},
            }
        ],
    }
    result = Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert not result.ok
    assert "bad.jsonl row 0: field 'scope'" in result.records[0].error


def test_feedback_comes_from_config_or_one_verbal_record(tmp_path):
    from stages.c3po_data import C3poDataConfig, pick_feedback

    prov = {"source": "convsim", "timestamp": "2024-01-01T00:00:00Z"}
    write_jsonl(
        [
            {
                "id": "a",
                "prompt": "p",
                "response": "r",
                "critique": "Use British spelling.",
                "scope": "emails to UK customers",
                "kind": "verbal",
                "provenance": prov,
            },
            {"id": "b", "prompt": "p", "response": "r", "critique": "Be brief.", "kind": "verbal", "provenance": prov},
        ],
        tmp_path / "fb.jsonl",
    )
    assert pick_feedback(C3poDataConfig(feedback="Be kind."), None) == ("Be kind.", None)
    assert pick_feedback(C3poDataConfig(feedback_id="a"), tmp_path / "fb.jsonl") == (
        "Use British spelling.",
        "emails to UK customers",
    )
    with pytest.raises(ValueError, match="2 different feedbacks; C3PO learns one at a time"):
        pick_feedback(C3poDataConfig(), tmp_path / "fb.jsonl")


def test_local_generator_runs_with_or_without_the_adapter_as_configured(tiny_model_path):
    """c3po_data's local generator is the current policy (base + `adapter`) by default; with
    `generator_adapter: false` it loads the base model instead."""
    from pipeline.llm import build_client
    from stages.c3po_data import C3poDataConfig, local_generator_model

    policy = object()  # stands for the loaded base + adapter model
    assert local_generator_model(C3poDataConfig(), "adapter-dir", policy) is policy
    assert local_generator_model(C3poDataConfig(generator_adapter=False), None, policy) is policy  # no adapter: same model
    cfg = C3poDataConfig(generator_adapter=False)
    assert local_generator_model(cfg, "adapter-dir", policy) is None
    generator = build_client(cfg.generator, "tiny", "cpu", local_generator_model(cfg, "adapter-dir", policy))
    assert generator.model is not policy and not hasattr(generator.model, "peft_config")  # the base, loaded afresh


def test_the_pipelines_own_generator_runs_on_the_engine_it_picks():
    """A local generator that is the pipeline's model writes on the engine its settings pick; with
    `auto` and the baselines on HF it shares the loaded HF model (one copy of the weights); any other
    generator is built as configured."""
    from stages.c3po_data import C3poDataConfig, own_generator_engine

    def engine(baselines="ct2", **generator):
        return own_generator_engine(C3poDataConfig(generator=generator), "tiny", "cpu", baselines)

    assert engine(engine="ct2") == "ct2" and engine(engine="hf") == "hf" and engine(model="tiny", engine="ct2") == "ct2"
    assert engine("hf", engine="auto") == "hf" and engine("hf", engine="ct2") == "ct2"
    assert engine(model="smollm2-135m") is None and engine(adapter="some/adapter") is None
    assert engine(kind="openai", base_url="http://127.0.0.1:9/v1", model="m") is None


def test_c3po_data_with_its_own_generator_on_ct2_never_loads_the_hf_model(tmp_path, tiny_model_path, lora_adapter, monkeypatch):
    """Baselines and revisions both on CTranslate2 (the policy: `tiny` + adapter, merged): the stage
    writes what that engine writes and never loads the HF model (it would refuse here). The random
    adapter makes the greedy replies differ by prompt (bare `tiny` writes blanks)."""
    import pipeline.ct2_engine
    import pipeline.models
    from pipeline.generation import SamplingSettings
    from pipeline.llm import HFClient
    from trainers.c3po_data import REVISE_PROMPT

    greedy = {"max_new_tokens": 8, "temperature": 0.0}
    engine = HFClient("tiny", adapter=lora_adapter, engine="ct2", sampling=SamplingSettings(**greedy))
    engine.complete([[{"role": "user", "content": "hi"}]])  # converts tiny + adapter once; the cache keeps it
    asked = [("How do I sear a steak?", "in_scope"), ("What knife for tomatoes?", "in_scope")]
    asked += [("How do I sharpen a chisel?", "near_scope"), ("Why is the sky blue?", "out_of_scope")]
    write_jsonl([{"prompt": p, "scope": scope, "split": "train"} for p, scope in asked], tmp_path / "prompts.jsonl")

    def refuse(*args, **kwargs):
        raise AssertionError("c3po_data loaded the HF model")

    monkeypatch.setattr(pipeline.models, "load_causal_lm", refuse)
    loaded: list[str] = []  # CTranslate2 copies of the weights the stage holds: one, shared
    load = pipeline.ct2_engine.Ct2Generator.__init__
    monkeypatch.setattr(
        pipeline.ct2_engine.Ct2Generator, "__init__", lambda self, *a, **k: loaded.append(a[0]) or load(self, *a, **k)
    )
    feedback = "Mention salt."
    stage = {
        "name": "data",
        "uses": "c3po_data",
        "inputs": {"prompts": str(tmp_path / "prompts.jsonl"), "adapter": str(lora_adapter)},
        "with": {
            "feedback": feedback,
            "engine": "ct2",
            "generator": {"engine": "ct2", "sampling": greedy},
            "baseline_sampling": greedy,
        },
    }
    result = Runner(
        pipeline_from_dict({"run_name": "own", "model": "tiny", "stages": [stage]}, tmp_path), tmp_path / "runs", use_ray=False
    ).execute()
    assert result.ok, [r.error for r in result.records]
    assert len(loaded) == 1, loaded
    rows = load_rows(result.run_dir / "data" / "train")
    assert [r["baseline"] for r in rows] == engine.complete([[{"role": "user", "content": p}] for p, _ in asked])
    in_scope = [r for r in rows if r["scope"] == "in_scope"]
    asks = [REVISE_PROMPT.format(feedback=feedback, prompt=r["prompt"], response=r["baseline"]) for r in in_scope]
    revised = engine.complete([[{"role": "user", "content": a}] for a in asks])
    assert [r["revised"] for r in in_scope] == revised and all(revised) and revised[0] != revised[1]
