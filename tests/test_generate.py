from __future__ import annotations

from pipeline.generation import SamplingSettings, chat_generate
from pipeline.models import load_causal_lm, load_tokenizer
from stages.make_pairs import keyword_score


def test_sampling_is_seeded_and_batch_shapes_hold(tiny_model_path):
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny").eval()
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0)
    a = chat_generate(model, tok, convs, settings, num_samples=2, batch_size=2, seed=7)
    b = chat_generate(model, tok, convs, settings, num_samples=2, batch_size=2, seed=7)
    c = chat_generate(model, tok, convs, settings, num_samples=2, batch_size=2, seed=8)
    assert [[r.text for r in x] for x in a] == [[r.text for r in x] for x in b]
    assert [[r.text for r in x] for x in a] != [[r.text for r in x] for x in c]
    assert len(a) == 3 and all(len(x) == 2 for x in a)
    assert all(r.num_tokens <= 6 for x in a for r in x)


def test_keyword_score_by_hand():
    # 2 of 3 keywords (the alternative 'co2' counts), no repeats, finished
    assert keyword_score("Plants use light and CO2.", ["sunlight|light", "co2|carbon dioxide", "water"], 0.5, 0.2, True) == round(
        2 / 3, 6
    )
    # words: a b c a b c -> trigrams abc bca cab abc: 1 of 4 repeated; cut off
    assert keyword_score("a b c a b c", ["z"], 0.5, 0.2, False) == round(0 - 0.5 * 0.25 - 0.2, 6)
    assert keyword_score("", ["z"], 0.5, 0.2, True) == -1.0


def test_generate_stage_default_engine_writes_hf_greedy_replies(tmp_path, tiny_model_path, lora_adapter):
    """`engine: ct2`, `engine: auto` (the default: the faster engine on this host) and `engine: hf` write
    the same greedy replies, token counts and finished flags, batch by batch. With an adapter, so the
    replies differ (bare `tiny` writes the same empty reply to every chat prompt)."""
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows, write_jsonl
    from pipeline.runner import Runner

    write_jsonl([{"prompt": p} for p in ("Name a colour.", "Why is the sea salty?", "x", "Count to five.")], tmp_path / "p.jsonl")
    greedy = {"num_samples": 1, "batch_size": 3, "device": "cpu", "sampling": {"max_new_tokens": 10, "temperature": 0}}
    inputs = {"prompts": str(tmp_path / "p.jsonl"), "adapter": str(lora_adapter)}
    stages = [
        {"name": engine, "uses": "generate", "inputs": inputs, "with": {**greedy, "engine": engine}}
        for engine in ("ct2", "auto", "hf")
    ]
    result = Runner(
        pipeline_from_dict({"run_name": "g", "model": "tiny", "stages": stages}, tmp_path), tmp_path / "runs", use_ray=False
    ).execute()
    assert result.ok, [r.error for r in result.records]
    assert [r.status for r in result.records] == ["done", "done", "done"]  # each sampled, none reused
    keep = ("prompt", "response", "num_tokens", "finished")
    ct2, auto, hf = (
        [{k: r[k] for k in keep} for r in load_rows(result.run_dir / name / "responses")] for name in ("ct2", "auto", "hf")
    )
    assert len(hf) == 4 and len({r["response"] for r in hf}) > 1
    assert ct2 == hf and auto == hf
