"""SFT on the tiny model: training on fixed replies lowers their NLL (base vs adapter on the same
prompts), the prompt tokens get no loss, c3po_data rows become the right examples (revisions
in scope, baselines elsewhere, cut-off rows left out), and wiring both or neither input is a
clear error."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import pipeline_from_dict
from pipeline.errors import DataError, UserError
from pipeline.records import write_jsonl
from pipeline.runner import Runner
from trainers.sft import encode, from_c3po_data, read_examples

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
]
REPLY = "The capital of {country} is {city}. Bon voyage!"


def c3po_rows() -> list[dict]:
    """c3po_data's row shape, by hand: scope, prompt, baseline, revised, finished flags."""
    return [
        {"scope": "in_scope", "prompt": "Plan a day in Paris.", "baseline": "Walk.", "revised": "Walk. Bon voyage!"},
        {
            "scope": "in_scope",
            "prompt": [{"role": "user", "content": "Plan a day in Rome."}],
            "baseline": "See the Forum.",
            "revised": "See the Forum. Bon voyage!",
            "baseline_finished": True,
            "revised_finished": True,
        },
        {
            "scope": "in_scope",
            "prompt": "Plan Lima.",
            "baseline": "Eat ceviche and",
            "revised": "Eat ceviche and Bon voyage!",
            "baseline_finished": False,
            "revised_finished": False,
        },  # fmt: skip
        {"scope": "near_scope", "prompt": "How do trains work?", "baseline": "Wheels on rails.", "revised": ""},
        {"scope": "out_of_scope", "prompt": "What is 2+2?", "baseline": "Four.", "revised": "", "baseline_finished": True},
        {"scope": "out_of_scope", "prompt": "Name a colour.", "baseline": "Red, green, blue and", "baseline_finished": False},
    ]


def test_c3po_data_rows_become_revisions_in_scope_and_baselines_elsewhere():
    examples = from_c3po_data(c3po_rows(), finished_only=True, other_scopes=True, where="d.jsonl")
    assert [(e["scope"], e["reply"]) for e in examples] == [
        ("in_scope", "Walk. Bon voyage!"),
        ("in_scope", "See the Forum. Bon voyage!"),
        ("near_scope", "Wheels on rails."),
        ("out_of_scope", "Four."),
    ]  # the cut-off rows (Lima, colours) are left out, as feedback_views leaves them out
    assert examples[1]["prompt"] == [{"role": "user", "content": "Plan a day in Rome."}]

    kept = from_c3po_data(c3po_rows(), finished_only=False, other_scopes=False, where="d.jsonl")
    assert [(e["reply"], e["finished"]) for e in kept] == [
        ("Walk. Bon voyage!", True),
        ("See the Forum. Bon voyage!", True),
        ("Eat ceviche and Bon voyage!", False),
    ]

    with pytest.raises(DataError, match=r"d.jsonl row 0: field 'revised' is missing"):
        from_c3po_data([{"scope": "in_scope", "prompt": "p", "baseline": "b"}], True, True, "d.jsonl")
    with pytest.raises(DataError, match=r"d.jsonl row 0: field 'scope': 'nearby'"):
        from_c3po_data([{"scope": "nearby", "prompt": "p", "baseline": "b"}], True, True, "d.jsonl")
    with pytest.raises(DataError, match=r"no in-scope row left.*finished_only: false"):
        from_c3po_data(c3po_rows()[2:], True, True, "d.jsonl")


def test_prompt_tokens_get_no_loss_and_a_cut_off_reply_no_end_token(tmp_path, tiny_model_path):
    """The trainer's own batch (TRL's dataset preparation + collator with the stage's keys):
    labels are -100 on every prompt position and the reply's own tokens elsewhere."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.chat import render_ids
    from pipeline.models import load_causal_lm, load_tokenizer
    from trainers.sft_config import SFTMethodConfig

    tok = load_tokenizer("tiny", padding_side="right")
    examples = from_c3po_data(c3po_rows(), finished_only=False, other_scopes=True, where="d")
    encoded = encode(tok, examples, max_length=64)
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, use_cpu=True, report_to="none", **SFTMethodConfig().trl_kwargs())
    trainer = SFTTrainer(model=load_causal_lm("tiny"), args=args, train_dataset=Dataset.from_list(encoded), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(encoded))])

    for i, example in enumerate(examples):
        prompt = render_ids(tok, example["prompt"])
        reply = tok(example["reply"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if example["finished"] else [])
        n = len(prompt) + len(reply)
        assert batch["input_ids"][i, :n].tolist() == prompt + reply
        labels = batch["labels"][i]
        assert (labels[: len(prompt)] == -100).all()  # no loss on the prompt (chat template included)
        assert labels[len(prompt) : n].tolist() == reply  # the whole reply, end-of-turn included when it finished
        assert (labels[n:] == -100).all()  # nor on padding
    assert examples[2]["finished"] is False and batch["labels"][2].tolist().count(tok.eos_token_id) == 0


def nll_per_token(model, tok, pairs) -> float:
    """Mean NLL per reply token (end-of-turn included) of `pairs` (prompt, reply) under `model`."""
    from pipeline.chat import render_ids
    from trainers.sequences import completion_ids

    total, count = 0.0, 0
    for prompt, reply in pairs:
        p, r = render_ids(tok, prompt), completion_ids(tok, reply)
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        total -= logps[len(p) - 1 :].sum().item()
        count += len(r)
    return total / count


def run_sft(tmp_path, inputs: dict, steps: int = 10):
    spec = {
        "run_name": "sft-toy",
        "model": "tiny",
        "stages": [
            {
                "name": "align",
                "uses": "sft",
                "inputs": inputs,
                "with": {
                    "max_steps": steps,
                    "learning_rate": 1e-2,
                    "per_device_train_batch_size": 4,
                    "max_length": 64,
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                },
            }
        ],
    }
    return Runner(pipeline_from_dict(spec, tmp_path), tmp_path / "runs", use_ray=False).execute()


def test_training_on_fixed_replies_lowers_their_nll(tmp_path, tiny_model_path):
    from peft import PeftModel

    from pipeline.models import load_causal_lm, load_tokenizer

    pairs = [(f"What is the capital of {c}?", REPLY.format(country=c, city=y)) for c, y in CAPITALS]
    rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": r}], "rejected": "Banana."} for p, r in pairs]
    write_jsonl(rows, tmp_path / "prefs.jsonl")
    result = run_sft(tmp_path, {"preferences": str(tmp_path / "prefs.jsonl")})
    assert result.ok, [r.error for r in result.records]
    metrics = json.loads((result.run_dir / "align" / "manifest.json").read_text())["metrics"]
    assert metrics["examples"] == len(pairs) and metrics["steps"] == 10
    assert "only the reply tokens through the LM head" in (result.run_dir / "logs" / "align.log").read_text()

    tok = load_tokenizer("tiny")
    base = load_causal_lm("tiny").eval()
    before = nll_per_token(base, tok, pairs)
    tuned = PeftModel.from_pretrained(base, str(result.run_dir / "align" / "adapter")).eval()
    after = nll_per_token(tuned, tok, pairs)
    assert after < before - 0.5, (before, after)  # the random tiny model starts near log(49152) ~ 10.8; 10 steps: ~10.15


def test_data_input_trains_on_the_scoped_rows(tmp_path, tiny_model_path):
    write_jsonl(c3po_rows(), tmp_path / "data.jsonl")
    result = run_sft(tmp_path, {"data": str(tmp_path / "data.jsonl")}, steps=2)
    assert result.ok, [r.error for r in result.records]
    metrics = json.loads((result.run_dir / "align" / "manifest.json").read_text())["metrics"]
    assert (metrics["in_scope_rows"], metrics["near_scope_rows"], metrics["out_of_scope_rows"]) == (2, 1, 1)
    assert (result.run_dir / "align" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("wired", ["both", "neither"])
def test_wiring_both_or_neither_input_is_a_clear_error(wired, tmp_path):
    write_jsonl([{"prompt": "p", "chosen": "c", "rejected": "r"}], tmp_path / "prefs.jsonl")
    write_jsonl(c3po_rows(), tmp_path / "data.jsonl")
    inputs = {"preferences": str(tmp_path / "prefs.jsonl"), "data": str(tmp_path / "data.jsonl")} if wired == "both" else {}
    result = run_sft(tmp_path, inputs)
    assert not result.ok
    (record,) = result.records
    assert "wire exactly one input, `preferences`" in record.error and f"got {wired}" in record.error
    assert "unexpected error" not in record.error  # a user error: the message alone
    with pytest.raises(UserError, match=f"got {wired}"):
        read_examples(*((tmp_path / "prefs.jsonl", tmp_path / "data.jsonl") if wired == "both" else (None, None)), True, True)
