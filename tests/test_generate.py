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
