"""combine.py: running z-scores by hand, dense rows and the end (scalar-only models) that sum to the scalar, the dominance guard,
save/load through load_reward_model; function rewards; the score stage's best-of-n pairs."""

from __future__ import annotations

import pytest
import torch

from reward_models.base import RewardBatch, Rewards, load_reward_model
from reward_models.combine import CombinedReward, Objective, RunningMeanStd, capped_weights
from reward_models.function import FunctionReward


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


def polite_reward(prompts, responses):
    return [1.0 if "please" in r.lower() else 0.0 for r in responses]


class PerWordDense:
    """A dense reward: +1 at each token whose decoded text ends a word 'good' (protocol-complete)."""

    kind = "per_word"

    def score(self, batch):
        rows = [
            [1.0 if batch.policy_tokenizer.decode([t]).strip() == "good" else 0.0 for t in ids]
            for ids in batch.response_token_ids
        ]
        width = max(len(r) for r in rows)
        dense = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])
        return Rewards(scalar=dense.sum(1), dense=dense)

    def save(self, path):
        raise NotImplementedError


def test_running_mean_std_matches_numpy():
    stats = RunningMeanStd()
    values = [1.0, 4.0, 2.0, 8.0, 5.0]
    stats.update(values[:2])
    stats.update(values[2:])
    t = torch.tensor(values)
    assert stats.mean == pytest.approx(t.mean().item())
    assert stats.std == pytest.approx(t.std(unbiased=False).item())


def test_weighted_sum_of_z_scores_by_hand():
    combined = CombinedReward(
        [
            Objective("len", FunctionReward("tests.test_reward_combine:length_reward"), 2.0),
            Objective("polite", FunctionReward("tests.test_reward_combine:polite_reward"), 1.0),
        ],
        clip=None,
        max_share=None,
    )
    responses = ["yes", "please do it now", "no no", "ok please"]
    out = combined.score(RewardBatch(["q"] * 4, responses))
    lengths = torch.tensor([1.0, 4.0, 2.0, 2.0])
    polite = torch.tensor([0.0, 1.0, 0.0, 1.0])

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    assert torch.allclose(out.scalar, 2 * z(lengths) + z(polite), atol=1e-5)
    assert torch.allclose(out.components["len"], lengths)
    assert out.dense is None  # no policy tokens given
    assert combined.last_stats["len/weight"] == 2.0
    assert combined.last_stats["len/share"] + combined.last_stats["polite/share"] == pytest.approx(1.0)


def test_guard_caps_a_dominating_objective():
    assert capped_weights([9.0, 1.0], [1.0, 1.0], 0.75) == pytest.approx([3.0, 1.0])  # 3 / (3 + 1) = 0.75
    assert capped_weights([1.0, 1.0], [1.0, 1.0], 0.75) == [1.0, 1.0]
    assert capped_weights([9.0, 1.0], [1.0, 0.0], 0.75) == [9.0, 1.0]  # nothing to balance against
    combined = CombinedReward(
        [
            Objective("len", FunctionReward("tests.test_reward_combine:length_reward"), 9.0),
            Objective("polite", FunctionReward("tests.test_reward_combine:polite_reward"), 1.0),
        ],
        clip=None,
        max_share=0.75,
    )
    combined.score(RewardBatch(["q"] * 4, ["a", "please b c", "d e", "please"]))
    assert combined.last_stats["len/share"] == pytest.approx(0.75)
    assert combined.last_stats["len/weight"] < 9.0


def test_dense_rows_and_the_end_sum_to_the_scalar_and_keep_token_positions(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    responses = ["this is good and good", "bad", "good"]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    combined = CombinedReward(
        [
            Objective("dense", PerWordDense(), 1.0),
            Objective("len", FunctionReward("tests.test_reward_combine:length_reward"), 0.5),
        ],
        clip=None,
        max_share=None,
    )
    out = combined.score(RewardBatch(["q"] * 3, responses, ids, tok))
    assert out.dense.shape == (3, max(len(i) for i in ids))
    # the scalar-only objective is earned at the EOS (PPO places `at_end` there), not on text tokens
    assert torch.allclose(out.dense.sum(1) + out.at_end, out.scalar, atol=1e-5)
    assert torch.allclose(out.at_end, 0.5 * out.components["len/z"], atol=1e-6)
    std = combined.stats["dense"].std
    good_positions = [t for t, token in enumerate(ids[0]) if tok.decode([token]).strip() == "good"]
    assert len(good_positions) == 2
    assert out.dense[0, good_positions[0]] == pytest.approx(1 / std, rel=1e-5)  # the per-token shape survives
    assert (out.dense[1, len(ids[1]) :] == 0).all()  # padding stays zero


def test_save_load_round_trip_with_statistics(tmp_path):
    folders = []
    for name in ("length_reward", "polite_reward"):
        folder = tmp_path / name
        FunctionReward(f"tests.test_reward_combine:{name}").save(folder)
        folders.append(folder)
    from reward_models.combine import CombineSettings

    combined = CombinedReward.from_settings(CombineSettings(objectives=[{"path": str(f), "weight": 1.0} for f in folders]))
    assert [o.name for o in combined.objectives] == ["function", "function_2"]
    batch = RewardBatch(["q"] * 3, ["a b", "please", "c d e"])
    first = combined.score(batch).scalar
    combined.save(tmp_path / "combined")
    again = load_reward_model(tmp_path / "combined")
    again.update_stats = combined.update_stats = False
    assert torch.allclose(again.score(batch).scalar, combined.score(batch).scalar)
    assert again.stats["function"].count == 3
    assert first.shape == (3,)


def test_function_reward_errors_are_clear():
    with pytest.raises(ValueError, match="module:function"):
        FunctionReward("no_colon")
    with pytest.raises(ValueError, match="cannot be imported"):
        FunctionReward("tests.test_reward_combine:missing")


def test_score_stage_adds_column_and_best_of_n_pairs(tmp_path):
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows, write_jsonl
    from pipeline.runner import Runner

    rows = [{"prompt_id": "a", "prompt": "Say hi", "response": r} for r in ("hi", "hi there friend", "hello you")]
    rows += [{"prompt_id": "b", "prompt": "Say bye", "response": "bye"}]
    write_jsonl(rows, tmp_path / "responses.jsonl")
    data = {
        "run_name": "s",
        "model": "tiny",
        "stages": [
            {
                "name": "score",
                "uses": "score",
                "inputs": {"responses": str(tmp_path / "responses.jsonl")},
                "with": {"function": "tests.test_reward_combine:length_reward"},
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    scored = load_rows(result.run_dir / "score" / "responses")
    assert [r["reward"] for r in scored] == [1.0, 3.0, 2.0, 1.0]
    pairs = load_rows(result.run_dir / "score" / "preferences")
    assert len(pairs) == 1  # prompt b has one reply only
    assert pairs[0]["chosen"][0]["content"] == "hi there friend" and pairs[0]["rejected"][0]["content"] == "hi"


def love_probability(prompts, responses):
    return [0.9 if "thanks" in r else 0.2 for r in responses]


def test_score_stage_writes_argilla_suggestions(tmp_path):
    """`suggest` turns the reward into a reaction pre-annotation that argilla_push's item
    builder picks up as an Argilla suggestion (value, score in [0, 1], agent)."""
    from feedback.argilla_items import to_items
    from pipeline.config import pipeline_from_dict
    from pipeline.records import load_rows, write_jsonl
    from pipeline.runner import Runner

    write_jsonl(
        [{"prompt_id": "a", "prompt": "Help", "response": r} for r in ("sure, thanks for asking", "no")],
        tmp_path / "responses.jsonl",
    )
    data = {
        "run_name": "s",
        "model": "tiny",
        "stages": [
            {
                "name": "score",
                "uses": "score",
                "inputs": {"responses": str(tmp_path / "responses.jsonl")},
                "with": {
                    "function": "tests.test_reward_combine:love_probability",
                    "best_of_n": False,
                    "suggest": {"question": "reaction", "threshold": 0.5},
                },
            }
        ],
    }
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    scored = load_rows(result.run_dir / "score" / "responses")
    first = scored[0]["suggestions"]["reaction"]
    assert (first["value"], first["agent"], first["score"]) == ("love", "heedful:function", pytest.approx(0.9))
    assert scored[1]["suggestions"]["reaction"]["value"] == "dislike"
    assert scored[1]["suggestions"]["reaction"]["score"] == pytest.approx(0.8)
    items = to_items(scored, "reaction", "auto", {"model": "tiny", "run": "s", "stage": "score"})
    assert [i.suggestions["reaction"]["value"] for i in items] == ["love", "dislike"]
