"""The evaluate stage's numbers against hand computation: Wilson and bootstrap intervals, KL,
degeneration measures, and the stage itself on `tiny` with fixed replies (adherence, firing
rates, unfinished replies, KL of the base to itself)."""

from __future__ import annotations

import html
import json
import math

import pytest
import torch

from feedback.simulator.protocol import fact_coverage
from pipeline.config import pipeline_from_dict
from pipeline.evaluation.summary import metric_value
from pipeline.records import save_rows, write_jsonl
from pipeline.runner import Runner
from pipeline.stats import bootstrap_mean, kl_divergence, repeated_ngram_share, token_kl, wilson

FEEDBACK = 'When I ask about cooking, start your answer with "Chef\'s tip:".'
METRIC = {"kind": "starts_with", "value": "Chef's tip:"}


def test_wilson_by_hand():
    # 5/10: centre (0.5 + z²/20) / (1 + z²/10) = 0.5; half-width z*sqrt(0.025 + z²/400) / (1 + z²/10)
    z2 = 1.959963984540054**2
    half = math.sqrt(z2) * math.sqrt(0.025 + z2 / 400) / (1 + z2 / 10)
    e = wilson(5, 10)
    assert e == pytest.approx({"value": 0.5, "n": 10, "lo": 0.5 - half, "hi": 0.5 + half})
    assert e["lo"] == pytest.approx(0.2366, abs=1e-4) and e["hi"] == pytest.approx(0.7634, abs=1e-4)
    # 0/20: the interval is not a point at 0 (the normal approximation's failure): upper = z²/n / (1 + z²/n)
    zero = wilson(0, 20)
    assert zero["value"] == 0 and zero["lo"] == pytest.approx(0.0, abs=1e-12)
    assert zero["hi"] == pytest.approx((z2 / 20) / (1 + z2 / 20))
    full = wilson(20, 20)
    assert full["hi"] == pytest.approx(1.0) and full["lo"] == pytest.approx(1 - zero["hi"])
    assert math.isnan(wilson(0, 0)["value"]) and wilson(0, 0)["n"] == 0
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_bootstrap_mean():
    # every resample of 2, 2, 2 is 2: no spread to read an interval from, and none is claimed
    constant = bootstrap_mean([2.0, 2.0, 2.0])
    assert (constant["value"], constant["n"]) == (2.0, 3) and math.isnan(constant["lo"]) and math.isnan(constant["hi"])
    assert constant["interval"].startswith("no spread")
    values = [0.0] * 10 + [1.0] * 10
    e = bootstrap_mean(values, seed=3)
    assert e["value"] == 0.5 and e["n"] == 20
    assert 0.2 < e["lo"] < 0.5 < e["hi"] < 0.8
    assert bootstrap_mean(values, seed=3) == e  # seeded: reproducible
    assert bootstrap_mean([1.0, float("nan")])["n"] == 1
    assert bootstrap_mean([])["n"] == 0


def test_a_mean_without_spread_is_no_point_interval():
    """All values alike (or one value): a percentile bootstrap reads x [x, x]. Values known to lie
    in [a, b] get the Wilson interval of the mean's share of that range: 20 replies that repeat no
    n-gram read 0 [0, 0.161] (0/20's Wilson upper bound, z²/20 / (1 + z²/20)); 4 users all
    satisfied in round 1 of 3 read 1 [1, 1 + 2 * 0.490] (0/4's upper bound z²/4 / (1 + z²/4));
    one value of 0.25 in [0, 1] is Wilson's 0.25 of 1; a range of one point is exact (rounds with
    max_rounds 1). Unbounded values (a length ratio, a score) get no interval: NaN bounds."""
    z2 = 1.959963984540054**2
    loops = bootstrap_mean([0.0] * 20, bounds=(0, 1))
    assert (loops["value"], loops["lo"]) == (0.0, 0.0) and loops["hi"] == pytest.approx((z2 / 20) / (1 + z2 / 20))
    assert loops["hi"] == pytest.approx(0.1611, abs=1e-4) and loops["hi"] > loops["lo"]
    rounds = bootstrap_mean([1, 1, 1, 1], bounds=(1, 3))
    assert (rounds["value"], rounds["lo"]) == (1.0, 1.0) and rounds["hi"] == pytest.approx(1 + 2 * (z2 / 4) / (1 + z2 / 4))
    one = bootstrap_mean([0.25], bounds=(0, 1))
    assert (one["value"], one["n"], one["lo"], one["hi"]) == pytest.approx(
        (0.25, 1, wilson(0.25, 1)["lo"], wilson(0.25, 1)["hi"])
    )
    assert one["lo"] < 0.25 < one["hi"]
    assert {k: bootstrap_mean([1, 1], bounds=(1, 1))[k] for k in ("value", "lo", "hi")} == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    single = bootstrap_mean([3.5])
    assert single["value"] == 3.5 and math.isnan(single["lo"]) and math.isnan(single["hi"])
    # every reply three times the base's: resampled ratios that differ only by float rounding are no spread
    from pipeline.stats import bootstrap_ratio

    bases = [0.1, 0.7, 1.3, 2.9, 0.33, 5.1]
    thrice = bootstrap_ratio([3 * b for b in bases], bases)
    assert thrice["value"] == pytest.approx(3.0) and math.isnan(thrice["lo"]) and math.isnan(thrice["hi"])
    # with spread the bootstrap stands, bounds or not
    assert bootstrap_mean([0.0] * 10 + [1.0] * 10, seed=3, bounds=(0, 1)) == bootstrap_mean([0.0] * 10 + [1.0] * 10, seed=3)


def test_mean_example_tokens_counts_every_token_list_but_masks():
    """The arena's tokens/s: a TRL pair's three id lists, heedful's own token examples (C3PO's
    prompt/completion pairs), an SFT row without its completion mask; nothing tokenized: None."""
    from datasets import Dataset

    from pipeline.training import mean_example_tokens

    pairs = Dataset.from_list(
        [{"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5, 6], "label": True}]
    )
    assert mean_example_tokens(pairs) == 6
    own = [
        {"index": 0, "chosen_prompt": [1, 2], "chosen_completion": [3]},
        {"index": 1, "chosen_prompt": [1], "chosen_completion": [3, 4, 5]},
    ]
    assert mean_example_tokens(own) == 3.5
    assert mean_example_tokens(Dataset.from_list([{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}])) == 3
    assert mean_example_tokens(Dataset.from_list([{"prompt": "hi", "completion": "there"}])) is None


def test_an_estimate_without_an_interval_reads_so():
    """Tables print a missing interval (NaN in memory, null in JSON) as such, not as 'nan' nor as a
    bare number that reads like a certain one; a rate of one item shows its Wilson interval."""
    from pipeline.evaluation.summary import fmt_estimate

    assert fmt_estimate({"value": 0.5, "n": 10, "lo": 0.24, "hi": 0.76}) == "0.5 [0.24, 0.76] n=10"
    assert fmt_estimate(bootstrap_mean([2.0, 2.0])) == "2 [no interval] n=2"
    assert fmt_estimate({"value": 2.0, "n": 2, "lo": None, "hi": None}) == "2 [no interval] n=2"
    assert fmt_estimate(wilson(1, 1)) == "1 [0.207, 1] n=1"
    assert fmt_estimate({"value": None, "n": 0, "lo": None, "hi": None}) == "–" and fmt_estimate(1.25) == "1.25"


def test_bootstrap_ratio_resamples_pairs_together():
    from pipeline.stats import bootstrap_ratio

    # every reply exactly twice the base's, whatever the prompt: the ratio is 2 in every resample, so
    # no interval (a ratio has no known range to put a Wilson interval in), not 2 [2, 2]
    same = bootstrap_ratio([2.0, 10.0, 40.0], [1.0, 5.0, 20.0])
    assert (same["value"], same["n"]) == (2.0, 3) and math.isnan(same["lo"]) and math.isnan(same["hi"])
    # half the prompts twice as long, half the same: 1.5 on equal bases, an interval around it
    e = bootstrap_ratio([2.0] * 10 + [1.0] * 10, [1.0] * 20, seed=3)
    assert e["value"] == 1.5 and e["n"] == 20 and 1.2 < e["lo"] < 1.5 < e["hi"] < 1.8
    assert bootstrap_ratio([], [])["n"] == 0 and math.isnan(bootstrap_ratio([1.0], [0.0])["value"])  # null in JSON


def test_paired_difference_and_mcnemar_by_hand():
    """Against the base on the same items: only shared keys count; turned_yes / turned_no count the
    items that changed; the exact McNemar p of 10 vs 2 discordant items is 2 * (1 + 12 + 66) / 2^12;
    Newcombe's paired interval by hand (its correlation term both ways), mirrored when the sides swap."""
    import math

    from pipeline.stats import mcnemar_p, paired_difference

    assert mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096) and mcnemar_p(2, 10) == mcnemar_p(10, 2)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 6) == pytest.approx(2 / 64)
    base = {f"n{i}": i < 4 for i in range(20)}  # 4 of 20 yes
    arm = {**{f"n{i}": i < 12 for i in range(20)}, "n3": False, "extra": True}  # 8 turned yes, 1 turned no
    d = paired_difference(arm, base)
    assert (d["n"], d["turned_yes"], d["turned_no"]) == (20, 8, 1)  # "extra" is no item of the base's
    # both yes 3, neither 8: p1 = 11/20, p2 = 4/20; a*d - b*c = 24 - 8 = 16 > n/2, so phi's numerator is 16 - 10
    p1, p2, w1, w2 = 11 / 20, 4 / 20, wilson(11, 20), wilson(4, 20)
    phi = 6 / math.sqrt(11 * 9 * 4 * 16)
    lo = p1 - p2 - math.sqrt((p1 - w1["lo"]) ** 2 - 2 * phi * (p1 - w1["lo"]) * (w2["hi"] - p2) + (w2["hi"] - p2) ** 2)
    hi = p1 - p2 + math.sqrt((w1["hi"] - p1) ** 2 - 2 * phi * (w1["hi"] - p1) * (p2 - w2["lo"]) + (p2 - w2["lo"]) ** 2)
    assert (d["value"], d["lo"], d["hi"]) == pytest.approx((7 / 20, lo, hi))
    assert d["p"] == pytest.approx(mcnemar_p(8, 1)) and d["p"] < 0.05 and d["lo"] > 0
    swapped = paired_difference(base, arm)
    assert (swapped["value"], swapped["lo"], swapped["hi"]) == pytest.approx((-d["value"], -d["hi"], -d["lo"]))
    # a*d < b*c: phi keeps its (negative) value; the interval is wider than with no correlation
    mixed = paired_difference({"a": True, "b": True, "c": False, "d": True}, {"a": True, "b": False, "c": True, "d": False})
    assert mixed["value"] == pytest.approx(0.25) and mixed["lo"] < 0 < mixed["hi"] <= 1 and mixed["p"] == 1.0
    same = paired_difference(base, base)
    assert (same["value"], same["turned_yes"], same["turned_no"], same["p"]) == (0.0, 0, 0, 1.0)
    assert same["lo"] < 0 < same["hi"]  # no change seen on 20 items still leaves room for one
    none = paired_difference({"a": True}, {"b": True})
    assert none["n"] == 0 and none["p"] == 1.0


def paired_table(both: int, turned_yes: int, turned_no: int, neither: int) -> tuple[dict[str, bool], dict[str, bool]]:
    """Outcomes of an arm and a baseline on the same items from a paired 2x2 table's four counts."""
    cells = [(True, True)] * both + [(True, False)] * turned_yes + [(False, True)] * turned_no + [(False, False)] * neither
    return {f"i{k}": a for k, (a, _) in enumerate(cells)}, {f"i{k}": b for k, (_, b) in enumerate(cells)}


def test_paired_difference_matches_a_published_example():
    """Fagerland, Lydersen & Laake (2017), ch. 8, complete response before and after consolidation
    therapy (Cavo et al., 2012: 59 / 6 / 16 / 80 of 161): Newcombe's square-and-add interval
    -0.0621 (-0.1186 to -0.0046), as the book and its R package print it; the exact McNemar
    p of 6 vs 16 discordant pairs is 0.0525."""
    from pipeline.stats import paired_difference

    arm, base = paired_table(59, 6, 16, 80)
    d = paired_difference(arm, base)
    assert (round(d["value"], 4), round(d["lo"], 4), round(d["hi"], 4)) == (-0.0621, -0.1186, -0.0046)
    assert round(d["p"], 4) == 0.0525 and (d["n"], d["turned_yes"], d["turned_no"]) == (161, 6, 16)


def test_paired_mean_difference_averages_seeds_per_item_by_hand():
    """Two seeds against the base: per item the seeds' share of yes less the base's (a: 1, b: 0.5,
    c: -0.5, d: -0.5; mean 0.125), 2 items up and 2 down; the interval Newcombe's on the seed-averaged
    table (both 1, up 1.5, down 1, neither 0.5 of 4 items), by hand; an item one seed lacks is left
    out; with one seed value, interval and p are paired_difference's. The p is the
    exact permutation test, by hand: an item both of two seeds said yes to and the base no has
    yes on 2 of its 3 runs, so with the baseline drawn among them its step is +2 (chance 1/3) or -1
    (2/3); one such item gives p = 1/3, two give p = 1/9 (only +2 +2 reaches 4). Six items up by half a seed and three down by a whole
    one average 0 (p = 1) though the up/down count alone (6 vs 3) leans one way."""
    from pipeline.stats import paired_difference, paired_mean_difference

    base = {"a": False, "b": False, "c": True, "d": True, "e": True}
    seeds = [{"a": True, "b": False, "c": True, "d": True, "e": True}, {"a": True, "b": True, "c": False, "d": False}]
    d = paired_mean_difference(seeds, base)
    assert (d["value"], d["n"], d["turned_yes"], d["turned_no"], d["seeds"]) == (0.125, 4, 2, 2, 2)
    assert d["p"] == pytest.approx(1.0)  # the steps (2, 1, -1, -1) sum to 1, and no draw sums to 0
    # p1 = 2.5/4, p2 = 2/4; a*d - b*c = 1 * 0.5 - 1.5 * 1 = -1 < 0, so phi = -1 / sqrt(2.5 * 1.5 * 2 * 2)
    p1, p2, w1, w2 = 2.5 / 4, 2 / 4, wilson(2.5, 4), wilson(2, 4)
    phi = -1 / math.sqrt(2.5 * 1.5 * 2 * 2)
    lo = p1 - p2 - math.sqrt((p1 - w1["lo"]) ** 2 - 2 * phi * (p1 - w1["lo"]) * (w2["hi"] - p2) + (w2["hi"] - p2) ** 2)
    hi = p1 - p2 + math.sqrt((w1["hi"] - p1) ** 2 - 2 * phi * (w1["hi"] - p1) * (p2 - w2["lo"]) + (p2 - w2["lo"]) ** 2)
    assert (d["lo"], d["hi"]) == pytest.approx((lo, hi)) and -1 <= d["lo"] < 0.125 < d["hi"] <= 1
    arm, baseline = paired_table(5, 7, 1, 7)
    one, two = paired_mean_difference([arm], baseline), paired_difference(arm, baseline)
    assert (one["value"], one["p"], one["turned_yes"], one["turned_no"]) == pytest.approx((two["value"], two["p"], 7, 1))
    assert (one["lo"], one["hi"], one["n"]) == pytest.approx((two["lo"], two["hi"], two["n"]))
    assert paired_mean_difference([], base)["n"] == 0
    up = {"a": True, "b": True}
    assert paired_mean_difference([up], {"a": False})["p"] == pytest.approx(1.0)  # one seed: McNemar(1, 0) = 1
    assert paired_mean_difference([up, up], {"a": False})["p"] == pytest.approx(1 / 3)
    assert paired_mean_difference([up, up], {"a": False, "b": False})["p"] == pytest.approx(1 / 9)
    assert paired_mean_difference([{"a": False, "b": False}] * 2, {"a": True, "b": True})["p"] == pytest.approx(1 / 9)
    # three seeds, mixed baselines: against a brute-force count over which run is the baseline
    import itertools

    from pipeline.stats import exchange_p

    items = [(3, 0), (2, 0), (1, 1), (0, 1), (2, 1)]
    runs = [[1] * yes + [0] * (3 - yes) + [base] for yes, base in items]  # each item's 4 runs
    observed = abs(sum(yes - 3 * base for yes, base in items))
    draws = list(itertools.product(range(4), repeat=len(items)))
    steps = [sum(sum(r) - r[i] - 3 * r[i] for r, i in zip(runs, draw)) for draw in draws]
    assert exchange_p(items, 3) == pytest.approx(sum(abs(s) >= observed for s in steps) / len(draws))
    half_up = {f"u{i}": False for i in range(6)} | {f"w{i}": True for i in range(3)}
    two = [{**{f"u{i}": i % 2 == s for i in range(6)}, **{f"w{i}": False for i in range(3)}} for s in (0, 1)]
    even = paired_mean_difference(two, half_up)
    assert (even["value"], even["turned_yes"], even["turned_no"], even["p"]) == (0.0, 6, 3, 1.0)


def test_seed_mean_at_a_ceiling_is_no_point_interval():
    """Two seeds and the base all satisfied on the same 20 needs: every item's difference is 0, and a
    bootstrap over the items read 0 [0, 0], certainty that 20 needs cannot give. The seed-averaged
    Newcombe interval is the one paired_difference gives 20/20 against 20/20 (its Wilson
    intervals are [0.84, 1]): it straddles 0 with room on both sides."""
    from pipeline.stats import paired_difference, paired_mean_difference

    everyone = {f"n{i}": True for i in range(20)}
    d = paired_mean_difference([everyone, everyone], everyone)
    assert (d["value"], d["n"], d["turned_yes"], d["turned_no"], d["p"]) == (0.0, 20, 0, 0, 1.0)
    assert d["lo"] < 0 < d["hi"] and d["hi"] - d["lo"] > 0.1
    assert (d["lo"], d["hi"]) == pytest.approx(
        (paired_difference(everyone, everyone)["lo"], paired_difference(everyone, everyone)["hi"])
    )
    # the method satisfied all 20 and the base none: +1, and still not certain (Wilson 20/20 and 0/20)
    nobody = dict.fromkeys(everyone, False)
    up = paired_mean_difference([everyone, everyone], nobody)
    assert up["value"] == 1.0 and 0 < up["lo"] < 1.0 and up["hi"] == 1.0
    assert up["lo"] == pytest.approx(1 - math.hypot(1 - wilson(20, 20)["lo"], wilson(0, 20)["hi"]))


def test_judge_win_rate_is_a_wilson_rate(monkeypatch):
    """A judge that prefers the condition's reply on all 20 prompts (the order alternating) reads
    1 [0.84, 1] (Wilson's 20/20), not the bootstrap's 1 [1, 1]; a tie counts half a win."""
    import logging
    from types import SimpleNamespace

    import pipeline.llm
    from pipeline.evaluation.metrics import judge_win_rates

    class Judge:
        def complete(self, asks, seed=0):
            # "A" when the first reply shown is the condition's ("good"), else "B"; prompt 7: neither
            return ["tie" if "#7" in a[0]["content"] else ("A" if "Reply A:\ngood" in a[0]["content"] else "B") for a in asks]

    monkeypatch.setattr(pipeline.llm, "build_client", lambda *args, **kwargs: Judge())
    rows = [
        {"condition": c, "prompt": f"prompt #{i}", "response": "good" if c == "kto" else "bad"}
        for c in ("base", "kto")
        for i in range(20)
    ]
    results = {"base": {}, "kto": {}}
    ans = SimpleNamespace(model_name="tiny", device=None, seed=0, resamples=200, log=logging.getLogger("test"))
    judge_win_rates(ans, [r for r in rows if "#7" not in r["prompt"]], results, {}, None)
    win = results["kto"]["judge_win_rate"]
    assert "judge_win_rate" not in results["base"]
    assert (win["value"], win["n"], win["hi"]) == (1.0, 19, 1.0) and win["lo"] == pytest.approx(wilson(19, 19)["lo"])
    assert win["lo"] < 0.9
    judge_win_rates(ans, rows, results, {}, None)
    win = results["kto"]["judge_win_rate"]
    assert win["value"] == pytest.approx(19.5 / 20) and win["n"] == 20
    assert (win["lo"], win["hi"]) == pytest.approx((wilson(19.5, 20)["lo"], wilson(19.5, 20)["hi"])) and win["hi"] < 1


def test_versus_counts_better_and_worse_by_each_metrics_direction():
    """A method that satisfies 3 needs the base did not (and loses 1) is 3 better; one that leaves
    3 replies unfinished the base finished (and finishes 1 the base did not) is 3 worse: turned yes
    is better for a higher-is-better rate and worse for a lower-is-better one. Every row is paired
    with the base and with the feedback in the prompt; in_context only with the base; base with neither."""
    from pipeline.arena_table import versus

    sat_arm, sat_base = paired_table(2, 3, 1, 4)
    unf_arm, unf_base = paired_table(0, 3, 1, 6)
    base = {"first_reply_satisfied": sat_base, "unfinished": unf_base}
    in_context = {"first_reply_satisfied": sat_arm}  # the arm's own outcomes: no change against it
    references = {"base": base, "in_context": in_context}
    arm = {"first_reply_satisfied": sat_arm, "unfinished": unf_arm, "rounds_only": {"x": True}}
    summary = {"outcomes": {"kto_s0": arm, "in_context": in_context, "base": base}}
    compared = versus("kto_s0", summary, references)
    paired = compared["vs_base"]
    assert set(paired) == {"first_reply_satisfied", "unfinished"}  # a metric the base lacks is not paired
    sat, unf = paired["first_reply_satisfied"], paired["unfinished"]
    assert (sat["turned_yes"], sat["turned_no"], sat["better"], sat["worse"]) == (3, 1, 3, 1)
    assert (unf["turned_yes"], unf["turned_no"], unf["better"], unf["worse"]) == (3, 1, 1, 3)
    assert (sat["value"], unf["value"]) == pytest.approx((0.2, 0.2))
    assert set(compared["vs_in_context"]) == {"first_reply_satisfied"}
    assert (
        compared["vs_in_context"]["first_reply_satisfied"]["value"],
        compared["vs_in_context"]["first_reply_satisfied"]["p"],
    ) == (0.0, 1.0)
    assert set(versus("in_context", summary, references)) == {"vs_base"}
    assert versus("base", summary, references) == {} and versus("kto_s0", None, references) == {}
    assert versus("kto_s0", summary, {}) == {}


def test_paired_score_difference_and_sign_flips_by_hand():
    """Scores against the base on the same items: differences 1, 2, 3, -1 (mean 1.25; item e only the
    base has); 3 up, 1 down. Sign flips by hand: of the 16 sign assignments of (1, 2, 3, 1), the sums
    at least 5 away from 0 are +-7 (all one sign) and +-5 (one of the two 1s flipped): 6 of 16, p =
    0.375. Two seeds average per item first; no difference at all gives p = 1."""
    from pipeline.stats import bootstrap_mean, paired_score_difference, sign_flip_p

    base = {"a": 0.0, "b": 1.0, "c": -1.0, "d": 2.0, "e": 5.0}
    arm = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 1.0}
    d = paired_score_difference([arm], base)
    assert (d["value"], d["n"], d["turned_yes"], d["turned_no"], d["seeds"]) == (1.25, 4, 3, 1, 1)
    assert d["p"] == pytest.approx(0.375)
    assert (d["lo"], d["hi"]) == pytest.approx((bootstrap_mean([1, 2, 3, -1])["lo"], bootstrap_mean([1, 2, 3, -1])["hi"]))
    two = paired_score_difference([arm, {k: v + 2 for k, v in arm.items()}], base)  # seed means: arm + 1
    assert two["value"] == pytest.approx(2.25) and two["seeds"] == 2
    assert paired_score_difference([base], base)["p"] == 1.0 and paired_score_difference([], base)["n"] == 0
    # the same score on every item: every difference 0, and a score has no known range: no interval, not 0 [0, 0]
    same = paired_score_difference([base], base)
    assert (same["value"], same["n"]) == (0.0, 5) and math.isnan(same["lo"]) and math.isnan(same["hi"])
    from pipeline.arena_table import directed, fmt_paired

    assert fmt_paired(directed("reward/plove", same)) == "+0.00 [no interval] 0 better, 0 worse, p = 1"
    from pipeline.arena_head_to_head import flipped  # b - a of a pair read back from arena.json (null bounds)

    back = flipped({"reward/plove": {**directed("reward/plove", same), "lo": None, "hi": None}})["reward/plove"]
    assert (back["value"], back["lo"], back["hi"]) == (-0.0, None, None)
    # a score stored as null (NaN in the summary) leaves its item out instead of failing or deciding
    assert paired_score_difference([{**arm, "b": None}], base)["n"] == 3
    assert paired_score_difference([arm], {**base, "a": float("nan")})["value"] == pytest.approx(4 / 3)
    # past the exact limit: seeded random flips, close to the exact count
    diffs = [0.5, -0.2, 0.9, 0.4, -0.1, 0.7, 0.3, 0.8, -0.4, 0.6]
    assert sign_flip_p(diffs, exact_up_to=4, draws=40000) == pytest.approx(sign_flip_p(diffs), abs=0.01)


def test_versus_pairs_scores_by_their_mean_difference():
    """A reward model's scores and ref_loglik pair as mean differences (higher is better), beside the
    yes/no outcomes, from the summary's `scores`."""
    from pipeline.arena_table import paired_items, versus

    base_summary = {
        "outcomes": {"base": {"unfinished": {"p": True, "q": False}}},
        "scores": {"base": {"reward/fine_grained": {"p": 0.0, "q": 1.0}, "ref_loglik": {"p": -2.0, "q": -3.0}}},
    }
    references = {"base": paired_items(base_summary, "base")}
    summary = {
        "outcomes": {"sft_s0": {"unfinished": {"p": False, "q": False}}},
        "scores": {"sft_s0": {"reward/fine_grained": {"p": 0.5, "q": 0.5}, "ref_loglik": {"p": -1.0, "q": -2.5}}},
    }
    paired = versus("sft_s0", summary, references)["vs_base"]
    assert set(paired) == {"unfinished", "reward/fine_grained", "ref_loglik"}
    rm, ll = paired["reward/fine_grained"], paired["ref_loglik"]
    assert (rm["value"], rm["better"], rm["worse"]) == (0.0, 1, 1)
    assert (ll["value"], ll["better"], ll["worse"], ll["p"]) == (0.75, 2, 0, 0.5)  # 2 of 4 sign flips reach +-1.5
    assert paired["unfinished"]["better"] == 1


def test_keyed_outcomes_pairs_the_kth_copy_of_a_repeated_item():
    """A prompt asked twice is two items, `p` and `p#2`, in every condition alike."""
    from pipeline.evaluation.metrics import keyed_outcomes

    assert keyed_outcomes([("p", True), ("q", False), ("p", False), ("p", True)]) == {
        "p": True,
        "q": False,
        "p#2": False,
        "p#3": True,
    }


def test_reply_outcomes_are_keyed_by_prompt_per_condition_and_metric():
    from pipeline.evaluation.metrics import reply_outcomes

    def row(condition, prompt, scope, applied, finished=True):
        return {"condition": condition, "prompt": prompt, "scope": scope, "applied": applied, "finished": finished}

    rows = [
        row("base", "a", "in_scope", False),
        row("base", "a", "in_scope", True),  # the same prompt twice: its second item is "a#2"
        row("base", "b", "out_of_scope", True, finished=False),
        row("base", "c", "general", False),
        row("dpo_s0", "a", "in_scope", True),
    ]
    out = reply_outcomes(rows, ["base", "dpo_s0", "memory"])
    assert out["base"] == {
        "adherence": {"a": False, "a#2": True},
        "overgen_out": {"b": True},
        "unfinished": {"a": False, "a#2": False, "b": True, "c": False},
    }
    assert out["dpo_s0"] == {"adherence": {"a": True}, "unfinished": {"a": False}} and "memory" not in out


def test_kl_on_a_known_pair():
    # KL((.5,.5) || (.9,.1)) = .5 ln(.5/.9) + .5 ln(.5/.1)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence([0.5, 0.5], [0.9, 0.1]) == pytest.approx(expected)
    assert expected == pytest.approx(0.5108, abs=1e-4)
    assert kl_divergence([1, 1], [1, 1]) == 0
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    logits_p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    logits_q = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1]]])) + 3.0  # logits up to a constant
    per_token = token_kl(logits_p, logits_q)
    assert per_token.shape == (1, 2)
    assert per_token[0].tolist() == pytest.approx([expected, 0.0], abs=1e-6)
    assert token_kl(logits_p, logits_q, torch.tensor([[0.0, 1.0]]))[0, 0].item() == 0.0


def test_repeated_ngrams_and_judge_scores():
    from pipeline.evaluation.metrics import win_score

    assert repeated_ngram_share("a b c a b c", 3) == pytest.approx(0.25)  # abc bca cab abc: 1 of 4 repeats
    assert repeated_ngram_share("one two three four", 3) == 0.0
    assert repeated_ngram_share("Chef's tip: Chef's tip: Chef's tip: Chef's tip:", 3) > 0.5
    assert win_score("A", flipped=False) == 1.0 and win_score("B.", flipped=False) == 0.0
    assert win_score("Reply B", flipped=True) == 1.0 and win_score("no idea", flipped=False) == 0.5


def test_evaluation_modules_import_light():
    """The stage's parts load torch and transformers only inside the functions that measure."""
    from .test_import_light import BLOCKER, run_python

    code = BLOCKER + (
        "import importlib, pkgutil\nimport pipeline.evaluation as package\n"
        "names = [i.name for i in pkgutil.iter_modules(package.__path__)]\n"
        "[importlib.import_module('pipeline.evaluation.' + n) for n in names]\nprint(sorted(names))"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(["conditions", "drift", "metrics", "report", "summary", "users"])


def test_metric_value_reads_one_estimate():
    estimate = {"value": 0.5, "n": 10, "lo": 0.24, "hi": 0.76}
    summary = {
        "conditions": {
            "base": {"adherence": estimate, "length_vs_base": 1, "satisfied": {"value": None, "n": 0, "lo": None, "hi": None}},
            "memory": {"memory_retrieved": {"in_scope": estimate}, "reward/plove": estimate},
        }
    }
    assert metric_value(summary, "base", "adherence") == estimate
    assert metric_value(summary, "base", "adherence") is not estimate  # a copy: the caller may change it
    assert metric_value(summary, "base", "length_vs_base") == {"value": 1, "n": None, "lo": None, "hi": None}
    assert metric_value(summary, "base", "satisfied") == {"value": None, "n": 0, "lo": None, "hi": None}  # measured on nobody
    assert metric_value(summary, "memory", "reward/plove") == estimate  # a metric name with a slash
    assert metric_value(summary, "memory", "memory_retrieved/in_scope") == estimate  # one estimate per scope
    assert metric_value(summary, "memory", "memory_retrieved") is None  # a group, not an estimate
    assert metric_value(summary, "memory", "memory_retrieved/out_of_scope") is None
    assert metric_value(summary, "base", "kl_to_base") is None and metric_value(summary, "adapter", "adherence") is None
    with pytest.raises(ValueError, match="not an evaluate summary"):
        metric_value({"cost": {}}, "base", "adherence")


SCOPED = [
    ("How do I boil an egg?", "in_scope"),
    ("How do I roast potatoes?", "in_scope"),
    ("How do I cook rice?", "in_scope"),
    ("Is a tomato a fruit?", "near_scope"),
    ("Where is coffee grown?", "near_scope"),
    ("What is the capital of France?", "out_of_scope"),
    ("How many legs has a spider?", "out_of_scope"),
]
# base: 1 of 3 in-scope applies; in_context: 3/3 in-scope, 1/2 near, 1/2 out
FIXED = {
    "base": ["Chef's tip: salt the water.", "Roast them.", "Rinse it.", "Yes.", "Brazil.", "Paris.", "Eight."],
    "in_context": [
        "Chef's tip: boil 9 min.",
        "chef's tip: hot oven.",
        "Chef's tip: rinse.",
        "Chef's tip: yes.",
        "Brazil.",
        "Paris.",
        "Chef's tip: eight.",
    ],
}
UNFINISHED = {("base", "Roast them."), ("in_context", "Brazil.")}


def fixed_reference(stage_dir, feedback=FEEDBACK, **settings):
    """FIXED's replies saved where an evaluate stage writes them (`stage_dir/evaluation`), with the
    manifest that says how they were made: on `tiny` with seed 0, the config's `settings` (sampling,
    batch_size) and in_context told `feedback` (each row's `system`)."""
    from stages.evaluate import EvaluateConfig
    from trainers.feedback_eval import IN_CONTEXT_TEMPLATE

    rows = []
    for condition, replies in FIXED.items():
        for (prompt, scope), reply in zip(SCOPED, replies):
            rows.append(
                {
                    "prompt": prompt,
                    "scope": scope,
                    "condition": condition,
                    "response": reply,
                    "applied": False,
                    "finished": (condition, reply) not in UNFINISHED,
                    "tokens": len(reply.split()),
                    "system": IN_CONTEXT_TEMPLATE.format(feedback=feedback) if condition == "in_context" else None,
                }
            )
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_rows(rows, stage_dir / "evaluation")
    config = EvaluateConfig.model_validate({"conditions": list(FIXED), **settings}).model_dump(mode="json")
    manifest = {"stage": stage_dir.name, "uses": "evaluate", "model": "tiny", "seed": 0, "config": config}
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))
    return stage_dir / "evaluation"


def word_count_reward(prompts, responses):
    """A reward model for the test: the number of words of each reply."""
    return [float(len(r.split())) for r in responses]


def write_scoped_prompts(folder):
    """The held-out prompts (SCOPED) with the feedback and its metric, as the evaluate stage reads them."""
    path = folder / "held_out.jsonl"
    write_jsonl([{"prompt": p, "scope": s, "feedback": FEEDBACK, "metric": json.dumps(METRIC)} for p, s in SCOPED], path)
    return path


def write_general(folder):
    """Two general questions with reference answers (the drift check)."""
    path = folder / "general.jsonl"
    write_jsonl([{"prompt": "What is 2+2?", "answer": "4."}, {"prompt": "Name a colour.", "answer": "Blue."}], path)
    return path


def run_evaluate(tmp_path, inputs: dict, with_: dict, model: str = "tiny"):
    """One `evaluate` stage named `check` on `tiny` (run `ev`, seed 0), run in this process."""
    pipe = {
        "run_name": "ev",
        "model": model,
        "seed": 0,
        "stages": [{"name": "check", "uses": "evaluate", "inputs": inputs, "with": with_}],
    }
    return Runner(pipeline_from_dict(pipe, tmp_path), tmp_path / "runs", use_ray=False).execute()


def test_evaluate_stage_on_fixed_replies(tmp_path, tiny_model_path):
    from reward_models.function import FunctionReward

    FunctionReward("tests.test_evaluate_metrics:word_count_reward").save(tmp_path / "words_rm")
    inputs = {
        "prompts": str(write_scoped_prompts(tmp_path)),
        "general": str(write_general(tmp_path)),
        "reference": str(fixed_reference(tmp_path / "eval_ref")),
        "reward_model": str(tmp_path / "words_rm"),
    }
    result = run_evaluate(tmp_path, inputs, {"conditions": ["base", "in_context"], "resamples": 200})
    assert result.ok, result.records[0].error
    from pipeline.evaluation.summary import read_summary

    summary = read_summary(result.run_dir / "check")
    base, ctx = summary["conditions"]["base"], summary["conditions"]["in_context"]
    assert base["adherence"] == pytest.approx(wilson(1, 3))
    assert base["overgen_near"] == pytest.approx(wilson(0, 2)) and base["overgen_out"] == pytest.approx(wilson(0, 2))
    assert ctx["adherence"] == pytest.approx(wilson(3, 3))  # starts_with is case-insensitive by default
    assert ctx["overgen_near"] == pytest.approx(wilson(1, 2)) and ctx["overgen_out"] == pytest.approx(wilson(1, 2))
    assert base["unfinished"] == pytest.approx(wilson(1, 7)) and ctx["unfinished"] == pytest.approx(wilson(1, 7))
    assert base["length"]["value"] == pytest.approx(sum(len(r.split()) for r in FIXED["base"]) / 7)
    ratio = sum(len(r.split()) for r in FIXED["in_context"]) / sum(len(r.split()) for r in FIXED["base"])
    assert ctx["length_vs_base"]["value"] == pytest.approx(ratio) and ctx["length_vs_base"]["n"] == 7
    assert ctx["length_vs_base"]["lo"] <= ratio <= ctx["length_vs_base"]["hi"] and base["length_vs_base"]["value"] == 1
    # the reward model's mean score per condition: here the mean word count of its replies
    for name, replies in FIXED.items():
        assert summary["conditions"][name]["reward/function"]["value"] == pytest.approx(sum(len(r.split()) for r in replies) / 7)
    # drift: the base against itself is exactly 0; the feedback in the prompt moves the distribution
    assert base["kl_to_base"] == {"value": 0.0, "n": 2, "lo": 0.0, "hi": 0.0}
    assert ctx["kl_to_base"]["value"] > 0 and ctx["ref_loglik"]["value"] < 0
    assert ctx["ref_loglik"]["n"] == 2
    metrics = result.records[0].metrics
    assert metrics["adherence/in_context"] == 1.0 and metrics["adherence/base/n"] == 3
    # what a deploy gate reads: the same estimates, one shape whatever the metric
    assert metric_value(summary, "in_context", "adherence") == pytest.approx(wilson(3, 3))
    assert metric_value(summary, "in_context", "length_vs_base") == ctx["length_vs_base"]
    assert metric_value(summary, "base", "reward/function")["n"] == 7
    assert metric_value(summary, "base", "judge_win_rate") is None  # no judge: not measured
    assert metric_value(summary, "dpo_s0", "adherence") is None  # no such condition
    from pipeline.records import load_rows

    rows = load_rows(result.run_dir / "check" / "evaluation")
    assert len(rows) == 14 and sum(r["applied"] for r in rows if r["condition"] == "in_context") == 5


SHORT = {"sampling": {"max_new_tokens": 6, "temperature": 0.0}}


def responses(run_dir, condition):
    from pipeline.records import load_rows

    return [r["response"] for r in load_rows(run_dir / "check" / "evaluation") if r["condition"] == condition]


@pytest.mark.parametrize("reference_feedback", [FEEDBACK, "Answer in French."])
def test_a_reference_stands_in_for_a_condition_only_with_its_system_prompts(tmp_path, tiny_model_path, reference_feedback):
    """A reference made with other feedback told its in_context condition something else: its replies
    are written anew (tiny's, not the reference's); its base replies (no system prompt) still stand."""
    from trainers.feedback_eval import IN_CONTEXT_TEMPLATE

    inputs = {
        "prompts": str(write_scoped_prompts(tmp_path)),
        "reference": str(fixed_reference(tmp_path / "eval_ref", reference_feedback, **SHORT)),
    }
    result = run_evaluate(tmp_path, inputs, {"conditions": ["base", "in_context"], "drift": False, "resamples": 200, **SHORT})
    assert result.ok, result.records[0].error
    assert responses(result.run_dir, "base") == FIXED["base"]
    if reference_feedback == FEEDBACK:
        assert responses(result.run_dir, "in_context") == FIXED["in_context"]
    else:
        written = responses(result.run_dir, "in_context")
        assert len(written) == len(SCOPED) and not set(written) & set(FIXED["in_context"])
        assert (
            "in_context: the reference evaluation's replies were given other system prompts"
            in (result.run_dir / "check" / "stage.log").read_text()
        )
    from pipeline.records import load_rows

    systems = {r["condition"]: r["system"] for r in load_rows(result.run_dir / "check" / "evaluation")}
    assert systems == {"base": None, "in_context": IN_CONTEXT_TEMPLATE.format(feedback=FEEDBACK)}


def test_a_reference_made_otherwise_is_not_reused_and_cannot_be_the_base(tmp_path, tiny_model_path):
    """Other sampling (or no manifest to say how it was made): none of the reference's replies stand
    in. An evaluation without a base condition of its own reads the reference's base replies as its
    base (the arena's eval_<method>): a matching one serves, another is an error naming the difference."""
    from pipeline.evaluation.summary import read_summary

    prompts = str(write_scoped_prompts(tmp_path))
    hot = fixed_reference(tmp_path / "eval_hot", sampling={"max_new_tokens": 6, "temperature": 0.7})
    result = run_evaluate(
        tmp_path, {"prompts": prompts, "reference": str(hot)}, {"conditions": ["base"], "drift": False, **SHORT}
    )
    assert result.ok, result.records[0].error
    assert not set(responses(result.run_dir, "base")) & set(FIXED["base"])
    log = (result.run_dir / "check" / "stage.log").read_text()
    assert "not reused: it was made with sampling.temperature 0.7, not 0.0" in log

    adapter = random_adapter(tmp_path / "dpo_s0", tiny_model_path)
    adapter_only = {"conditions": ["adapter"], "drift": False, "resamples": 200, **SHORT}
    result = run_evaluate(tmp_path, {"prompts": prompts, "adapter": str(adapter), "reference": str(hot)}, adapter_only)
    assert not result.ok and "its base replies cannot stand in" in result.records[0].error
    assert "sampling.temperature 0.7, not 0.0" in result.records[0].error

    bare = fixed_reference(tmp_path / "eval_bare", **SHORT)
    (bare.parent / "manifest.json").unlink()
    result = run_evaluate(tmp_path, {"prompts": prompts, "adapter": str(adapter), "reference": str(bare)}, adapter_only)
    assert not result.ok and "no manifest.json beside it" in result.records[0].error

    alike = fixed_reference(tmp_path / "eval_alike", **SHORT)
    result = run_evaluate(tmp_path, {"prompts": prompts, "adapter": str(adapter), "reference": str(alike)}, adapter_only)
    assert result.ok, result.records[0].error
    length = read_summary(result.run_dir / "check")["conditions"]["dpo_s0"]["length_vs_base"]
    assert length["n"] == len(SCOPED)  # against the reference's base replies


def test_a_reference_made_before_its_local_model_was_retrained_in_place_is_not_reused(tmp_path, tiny_model_path):
    """A local model folder is its content: a reference evaluated before the weights in that folder
    changed has the same model path but not the same model, so its replies do not stand in."""
    import shutil

    shutil.copytree(tiny_model_path, tmp_path / "mine")
    prompts = str(write_scoped_prompts(tmp_path))
    first = run_evaluate(
        tmp_path / "a", {"prompts": prompts}, {"conditions": ["base"], "drift": False, **SHORT}, model=str(tmp_path / "mine")
    )
    assert first.ok, first.records[0].error
    reference = str(first.run_dir / "check" / "evaluation")
    again = run_evaluate(
        tmp_path / "b",
        {"prompts": prompts, "reference": reference},
        {"conditions": ["base"], "drift": False, **SHORT},
        model=str(tmp_path / "mine"),
    )
    assert again.ok and "not reused" not in (again.run_dir / "check" / "stage.log").read_text()  # the same model: reused
    weights = next((tmp_path / "mine").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    retrained = run_evaluate(
        tmp_path / "c",
        {"prompts": prompts, "reference": reference},
        {"conditions": ["base"], "drift": False, **SHORT},
        model=str(tmp_path / "mine"),
    )
    assert retrained.ok, retrained.records[0].error
    assert "not reused: it was made with model 'sha256:" in (retrained.run_dir / "check" / "stage.log").read_text()


def test_evaluate_stage_needs_feedback_for_scoped_prompts(tmp_path, tiny_model_path):
    prompts = tmp_path / "held_out.jsonl"
    write_jsonl([{"prompt": p, "scope": s} for p, s in SCOPED], prompts)
    result = run_evaluate(tmp_path, {"prompts": str(prompts)}, {"drift": False})
    assert not result.ok and "no `feedback` column" in result.records[0].error
    assert not (result.run_dir / "check" / "summary").exists()  # nothing half-written


def random_adapter(stage_dir, tiny_model_path):
    """A LoRA adapter whose B matrices are not zero (so it changes the model: on every linear layer,
    so its greedy replies differ from prompt to prompt, serving/local.py), saved where a stage would
    write it, with a manifest recording its training cost."""
    from serving.local import random_lora_adapter

    random_lora_adapter(stage_dir / "adapter", 0)
    (stage_dir / "manifest.json").write_text(
        json.dumps(
            {
                "stage": stage_dir.name,
                "uses": "dpo",
                "timings": {"seconds": 12.5},
                "metrics": {"train_runtime": 10.0, "steps": 4, "train_samples_per_second": 1.6, "peak_memory_mb": 900.0},
            }
        )
    )
    return stage_dir / "adapter"


REQUESTS = ("What is the capital of France?", "How many legs has a spider?")


def test_evaluate_adapter_users_memory_and_judge(tmp_path, tiny_model_path, monkeypatch):
    from pipeline.evaluation.summary import read_summary
    from pipeline.records import load_rows

    from .openai_test_server import serve

    adapter = random_adapter(tmp_path / "dpo_s0", tiny_model_path)
    prompts = write_scoped_prompts(tmp_path)
    memory = tmp_path / "memory.jsonl"
    write_jsonl(
        [{"prompt": "How do I boil an egg?", "scope": "in_scope"}, {"prompt": "Is a tomato a fruit?", "scope": "near_scope"}],
        memory,
    )
    needs = tmp_path / "needs.jsonl"
    write_jsonl(
        [
            {"id": "n1", "prompt": "What is the capital of France?", "need": "the capital of France", "keywords": ["Paris"]},
            {"id": "n2", "prompt": "How many legs has a spider?", "need": "the number of legs", "keywords": ["eight|8"]},
        ],
        needs,
    )
    general = write_general(tmp_path)
    from pipeline.llm import HFClient

    asked: list[list[str]] = []  # the users' requests each policy call answered
    real_generate = HFClient.generate

    def noted(self, conversations, sampling, seed=0):
        asked.append([c[-1]["content"] for c in conversations if c[-1]["content"] in REQUESTS])
        return real_generate(self, conversations, sampling, seed)

    monkeypatch.setattr(HFClient, "generate", noted)
    with serve("tiny", "sk-judge") as (base_url, stats):
        key = tmp_path / "judge.key"
        key.write_text("sk-judge\n")
        key.chmod(0o600)
        inputs = {
            "prompts": str(prompts),
            "adapter": str(adapter),
            "memory": str(memory),
            "needs": str(needs),
            "general": str(general),
        }
        with_ = {
            "sampling": {"max_new_tokens": 6, "temperature": 0.0},
            "resamples": 200,
            "memory": {"embedder": "lexical", "threshold": 0.99},
            "users": {
                "max_rounds": 1,
                "simulator": {"model": "tiny"},
                "policy_sampling": {"max_new_tokens": 6},
                "user_sampling": {"max_new_tokens": 4},
            },
            "judge": {
                "kind": "openai",
                "base_url": base_url,
                "model": "tiny",
                "api_key_file": str(key),
                "sampling": {"max_new_tokens": 2, "temperature": 0.0},
            },
        }
        result = run_evaluate(tmp_path, inputs, with_)
        assert result.ok, result.records[0].error
        judge_requests = stats["requests"]
    summary = read_summary(result.run_dir / "check")
    conditions = summary["conditions"]
    assert list(conditions) == ["base", "in_context", "memory", "dpo_s0"]
    # the users' conversations side by side: the three conditions on the base weights answer in one
    # call (their 2 users each), the adapter in another; memory recalled nothing (threshold 0.99),
    # so its turns are the base's word for word, sampled once (2 + 2 + 0 of the 6 rows)
    assert conditions["memory"]["memory_retrieved"]["needs"]["value"] == 0
    assert sorted(len(rows) for rows in asked if rows) == [2, 4]
    rows = load_rows(result.run_dir / "check" / "evaluation")
    assert len(rows) == 4 * len(SCOPED)
    for name, metrics in conditions.items():
        mine = [r for r in rows if r["condition"] == name]
        assert metrics["unfinished"]["value"] == pytest.approx(sum(not r["finished"] for r in mine) / len(mine))
        assert metrics["adherence"]["n"] == 3 and metrics["overgen_near"]["n"] == 2
        assert metrics["satisfied"]["n"] == 2 and metrics["first_reply_satisfied"]["n"] == 2
        # item by item, for comparisons paired on the same prompts and needs
        items = summary["outcomes"][name]
        assert sum(items["unfinished"].values()) == sum(not r["finished"] for r in mine)
        assert sum(items["adherence"].values()) == round(metrics["adherence"]["value"] * 3)
        assert len(items["first_reply_satisfied"]) == 2 and len(items["satisfied"]) == 2
        assert sum(items["satisfied"].values()) == round(metrics["satisfied"]["value"] * 2)
    assert summary["outcomes"]["base"]["satisfied"].keys() == summary["outcomes"]["dpo_s0"]["satisfied"].keys()
    # every conversation is kept beside the rates, and each need's verdict is its first judged reply's
    talks = load_rows(result.run_dir / "check" / "conversations")
    assert sorted((t["condition"], t["conversation_id"]) for t in talks) == sorted(
        (c, n) for c in conditions for n in ("n1", "n2")
    )
    by = {(t["condition"], t["conversation_id"]): t["utterances"] for t in talks}
    assert all(by[("memory", n)] == by[("base", n)] for n in ("n1", "n2"))  # the same conversations: a paired tie
    from pipeline.evaluation.report import report_section

    page = report_section(result.run_dir, {"check": {"uses": "evaluate"}})
    assert "Simulated users, side by side" in page
    for talk in talks:
        judged = next(u for u in talk["utterances"] if u["type"] == "response" and u["satisfied"] is not None)
        mark = "✓" if judged["satisfied"] else "✗"
        assert html.escape(f"{mark} {judged['satisfaction']:.2f}: {judged['text']}") in page
        assert summary["outcomes"][talk["condition"]]["first_reply_satisfied"][talk["conversation_id"]] == judged["satisfied"]
        assert judged["fact_coverage"] == fact_coverage(
            judged["text"], [{"n1": "Paris", "n2": "eight|8"}[talk["conversation_id"]]]
        )
    # memory recalls the feedback only for the remembered prompt itself (threshold 0.99): 1 of 3 in-scope;
    # the near-scope memory row is no key (the feedback was not given on it)
    assert conditions["memory"]["memory_retrieved"]["in_scope"] == pytest.approx(wilson(1, 3))
    assert conditions["memory"]["memory_retrieved"]["near_scope"] == pytest.approx(wilson(0, 2))
    assert conditions["memory"]["memory_retrieved"]["out_of_scope"] == pytest.approx(wilson(0, 2))
    assert conditions["dpo_s0"]["kl_to_base"]["value"] > 0 and conditions["base"]["kl_to_base"]["value"] == 0
    # the judge saw every prompt once per non-base condition
    assert judge_requests == 3 * len(SCOPED)
    for name in ("in_context", "memory", "dpo_s0"):
        assert conditions[name]["judge_win_rate"]["n"] == len(SCOPED)
    assert "judge_win_rate" not in conditions["base"]
    cost = summary["cost"]
    assert cost["training"] == {
        "stage": "dpo_s0",
        "uses": "dpo",
        "seconds": 12.5,
        "train_runtime": 10.0,
        "steps": 4,
        "samples_per_second": 1.6,
        "tokens_per_second": None,
        "peak_memory_mb": 900.0,
    }
    assert cost["evaluation_seconds"] > 0
    report_html = __import__("pipeline.report", fromlist=["build_report"]).build_report(result.run_dir).read_text()
    assert "check: evaluation" in report_html and "dpo_s0" in report_html


def test_engine_replies_equal_hf_replies(tmp_path, tiny_model_path, monkeypatch):
    """The held-out replies, and the policy's replies in the simulated users' conversations, come
    from the generation engine (CTranslate2 on CPU, the adapter merged) unless `engine: hf`; greedy,
    both write the same replies under every condition."""
    import pipeline.ct2_engine
    from pipeline.records import load_rows

    adapter = random_adapter(tmp_path / "dpo_s0", tiny_model_path)
    needs = tmp_path / "needs.jsonl"
    write_jsonl([{"id": f"n{i}", "prompt": p, "need": f"an answer to: {p}"} for i, (p, _) in enumerate(SCOPED)], needs)
    inputs = {"prompts": str(write_scoped_prompts(tmp_path)), "adapter": str(adapter), "needs": str(needs)}
    users = {"max_rounds": 1, "simulator": {"model": "tiny"}, "policy_sampling": {"max_new_tokens": 12, "temperature": 0.0}}
    written: list[int] = []  # replies CTranslate2 wrote
    generate = pipeline.ct2_engine.Ct2Generator.generate
    monkeypatch.setattr(
        pipeline.ct2_engine.Ct2Generator,
        "generate",
        lambda self, conversations, *a, **k: written.append(len(conversations)) or generate(self, conversations, *a, **k),
    )
    replies, conversations, on_ct2 = {}, {}, {}
    for engine in ("hf", "ct2"):
        with_ = {"conditions": ["base", "in_context", "adapter"], "drift": False, "engine": engine, "resamples": 100}
        with_["sampling"] = {"max_new_tokens": 12, "temperature": 0.0}
        with_["users"] = users
        written.clear()
        result = run_evaluate(tmp_path / engine, inputs, with_)
        assert result.ok, result.records[0].error
        log = (result.run_dir / "check" / "stage.log").read_text()
        assert ("replies from CTranslate2" if engine == "ct2" else "replies from HF generate") in log
        rows = load_rows(result.run_dir / "check" / "evaluation")
        replies[engine] = {(r["condition"], r["prompt"]): (r["response"], r["tokens"], r["finished"]) for r in rows}
        talks = load_rows(result.run_dir / "check" / "conversations")
        conversations[engine] = {(t["condition"], t["request"]): t["utterances"][1]["text"] for t in talks}
        on_ct2[engine] = sum(written)
    assert len(replies["hf"]) == 3 * len(SCOPED) and replies["ct2"] == replies["hf"]
    assert len(conversations["hf"]) == 3 * len(SCOPED) and conversations["ct2"] == conversations["hf"]
    # the same conversations, so the simulator (on CTranslate2 itself under `auto`) wrote the same in both runs:
    # on ct2 the policy wrote every held-out reply and every reply to a user there too
    assert on_ct2["ct2"] - on_ct2["hf"] == 2 * 3 * len(SCOPED)
    assert len({reply for (condition, _), reply in replies["hf"].items() if condition == "dpo_s0"}) > 1  # each its own
    assert replies["hf"][("dpo_s0", SCOPED[0][0])] != replies["hf"][("base", SCOPED[0][0])]  # the adapter changes them


@pytest.mark.parametrize("engine", ["hf", "ct2"])
def test_a_chain_of_hindsight_adapter_answers_its_users_after_its_phrase(tmp_path, tiny_model_path, engine):
    """A CoH adapter's first turn to each simulated user is its held-out reply to the same request
    (greedy, no system prompt): both open with its phrase, on whichever engine the rest runs. The
    phrase changes the replies, so a conversation answered without it would differ; the base, on the
    same loaded model with the adapter switched off (HF), answers as it did without a phrase."""
    from pipeline.hindsight import COH_FILE
    from pipeline.records import load_rows

    adapter = random_adapter(tmp_path / "coh_s0", tiny_model_path)
    needs = tmp_path / "needs.jsonl"
    write_jsonl([{"id": f"n{i}", "prompt": p, "need": f"an answer to: {p}"} for i, (p, _) in enumerate(SCOPED)], needs)
    greedy = {"max_new_tokens": 10, "temperature": 0.0}
    with_ = {"conditions": ["base", "adapter"], "drift": False, "engine": engine, "resamples": 100, "sampling": greedy}
    with_["users"] = {"max_rounds": 1, "simulator": {"model": "tiny"}, "policy_sampling": greedy}
    inputs = {"prompts": str(write_scoped_prompts(tmp_path)), "adapter": str(adapter), "needs": str(needs)}
    replies = {}
    for phrase in (None, "A helpful answer:"):
        if phrase:
            (adapter / COH_FILE).write_text(json.dumps({"phrase": phrase, "stop": []}))
        result = run_evaluate(tmp_path / str(bool(phrase)), inputs, with_)
        assert result.ok, result.records[0].error
        rows = load_rows(result.run_dir / "check" / "evaluation")
        held_out = {(r["condition"], r["prompt"]): r["response"] for r in rows}
        talks = load_rows(result.run_dir / "check" / "conversations")
        assert {(t["condition"], t["request"]): t["utterances"][1]["text"] for t in talks} == held_out
        assert len(held_out) == 2 * len(SCOPED)
        replies[phrase] = held_out
    base = {key: text for key, text in replies[None].items() if key[0] == "base"}
    assert base and all(replies["A helpful answer:"][key] == text for key, text in base.items())  # no phrase
    assert replies[None] != replies["A helpful answer:"]


def test_drift_batched_equals_one_full_forward_per_item(tiny_model_path, lora_adapter):
    """drift() scores items in right-padded batches with only the answer positions through the
    head; each item's KL and log-likelihood equal one full forward of that item alone."""
    import logging

    from pipeline.chat import render_ids
    from pipeline.evaluation import conditions as cond
    from pipeline.evaluation.drift import answer_token_ids, drift
    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", adapter=lora_adapter).eval()
    conditions = [
        cond.Condition(name="base"),
        cond.Condition(name="in_context", system="feedback"),
        cond.Condition(name="a", adapter_on=True),
    ]
    ans = cond.Answering(
        model=model,
        tokenizer=tok,
        conditions=conditions,
        system_for=cond.system_prompts("Follow this feedback: {feedback}", FEEDBACK, None),
        model_name="tiny",
        adapter=lora_adapter,
        device="cpu",
        seed=0,
        batch_size=3,  # 5 items: a full batch and a short one, rows of different lengths
        resamples=50,
        log=logging.getLogger("drift-test"),
    )
    items = [
        {"prompt": "Boiling point of water?", "answer": "100 degrees Celsius at sea level."},
        {"prompt": "Who wrote Hamlet, the long tragedy about a Danish prince?", "answer": "Shakespeare."},
        {"prompt": "Continents?", "answer": "Seven: Africa, Antarctica, Asia, Australia, Europe and the two Americas."},
        {"prompt": "Name a primary colour.", "answer": "Red."},
        {"prompt": "What does a thermometer measure, and how?", "answer": "Temperature, by the expansion of a liquid."},
    ]
    results: dict = {c.name: {} for c in conditions}
    scores: dict = {}
    drift(ans, items, results, scores)

    def alone(condition, item):
        answer = answer_token_ids(tok, item["prompt"], item["answer"])
        prompt = render_ids(tok, item["prompt"], ans.system_for(condition, item["prompt"]))
        with ans.weights(condition), torch.no_grad():
            logits = model(torch.tensor([list(prompt) + answer])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(answer)]
        return logits, torch.tensor(answer)

    for condition in conditions:
        kls, lls = [], []
        for item in items:
            logits, target = alone(condition, item)
            base, _ = alone(conditions[0], item)
            lls.append(float(torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean()))
            kls.append(float(token_kl(logits, base).mean()))
        assert results[condition.name]["ref_loglik"]["value"] == pytest.approx(sum(lls) / 5, abs=1e-4)
        assert results[condition.name]["kl_to_base"]["value"] == pytest.approx(sum(kls) / 5, abs=1e-5)
        assert results[condition.name]["ref_loglik"]["n"] == 5
        # each answer's log-likelihood, keyed by its prompt: what the arena pairs with the base's
        per_item = scores[condition.name]["ref_loglik"]
        assert list(per_item) == [item["prompt"] for item in items]
        assert list(per_item.values()) == pytest.approx(lls, abs=1e-4)
    assert results["a"]["kl_to_base"]["value"] > 1e-4 and results["in_context"]["kl_to_base"]["value"] > 1e-4


def critique_record(rid, request, critique, judgment="needs_work", rounds=0, kind="critique"):
    """A user's verbal feedback record on a reply to `request` (after `rounds` earlier exchanges)."""
    prompt = [{"role": "user", "content": request}]
    for i in range(rounds):
        prompt += [{"role": "assistant", "content": f"reply {i}"}, {"role": "user", "content": f"follow-up {i}"}]
    return {
        "id": rid,
        "kind": "verbal",
        "prompt": prompt,
        "response": "a reply",
        "critique": critique,
        "judgment": judgment,
        "provenance": {"source": "convsim", "annotator": "convsim:tiny", "extra": json.dumps({"feedback": kind})},
    }


CRITIQUES = [
    critique_record("a1", "How do I boil an egg quickly?", "Give me the minutes, not a story."),
    critique_record("a2", "How do I boil an egg quickly?", "Still no minutes.", rounds=1),  # keyed by the first turn
    critique_record("a3", "How do I boil an egg quickly?", "Thanks, that helps.", judgment="good"),  # thanks: not kept
    critique_record("b1", "Which train goes to Lyon?", "Give me the minutes, not a story!"),  # recurs on another request
    critique_record("c1", "What is a good name for a cat?", "Too long.", judgment=None),  # no judgment: a critique
    critique_record("d1", "Where is the station?", "I meant the bus station.", kind="clarification"),  # not feedback
]


def test_memory_of_critiques_recalls_each_requests_own_critique(tmp_path):
    from pipeline.evaluation import conditions as cond

    log = __import__("logging").getLogger("t")
    path = tmp_path / "verbal_feedback.jsonl"
    write_jsonl(CRITIQUES, path)
    settings = cond.MemorySettings(embedder="lexical", threshold=0.5)
    memory = cond.load_memory(path)
    assert memory is not None and memory.critiques == {
        "How do I boil an egg quickly?": ["Give me the minutes, not a story.", "Still no minutes."],
        "Which train goes to Lyon?": ["Give me the minutes, not a story!"],
        "What is a good name for a cat?": ["Too long."],
    }
    recall = cond.memory_lookup(memory, settings, None, log)
    assert recall("How do I boil an egg quickly") == "Give me the minutes, not a story. Still no minutes."
    assert recall("Which train goes to Lyon today?") == "Give me the minutes, not a story!"
    assert recall("Where is the station?") is None  # a clarification is remembered by the served model, not here
    assert recall("What is the capital of France?") is None
    # in context: the critiques that recur over most requests first, at most `limit`
    feedback = cond.critiques_feedback(memory.critiques, 2)
    assert feedback == "(1) Give me the minutes, not a story. (2) Still no minutes."
    system_for = cond.system_prompts("Feedback: {feedback}", feedback, recall)
    memory_condition, in_context = (
        cond.Condition(name="memory", system="retrieved"),
        cond.Condition(name="in_context", system="feedback"),
    )
    assert system_for(memory_condition, "What is a good name for a cat?") == "Feedback: Too long."
    assert system_for(memory_condition, "What is the capital of France?") is None
    assert system_for(in_context, "What is the capital of France?").startswith("Feedback: (1) Give me the minutes")
    # a memory of prompts recalls the one feedback, and needs one
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt": "How do I boil an egg?", "scope": "in_scope"}], prompts)
    remembered = cond.load_memory(prompts)
    assert remembered is not None and remembered.critiques is None
    assert cond.memory_lookup(remembered, settings, "Say chef.", log)("How do I boil an egg?") == "Say chef."
    with pytest.raises(ValueError, match="recalls one feedback"):
        cond.memory_lookup(remembered, settings, None, log)
    # critiques, but every user was satisfied: nothing to recall, so the memory condition is skipped, even
    # with a feedback configured
    write_jsonl([critique_record("g", "Hi?", "Thanks!", judgment="good")], path)
    assert cond.load_memory(path) is None
    chosen = cond.choose_conditions(["base", "in_context", "memory"], "Be brief.", memory=None, adapter=None, label=None, log=log)
    assert [c.name for c in chosen] == ["base", "in_context"]
    # a memory of critiques recalls its own: the memory condition runs without any feedback (in_context does not)
    chosen = cond.choose_conditions(["base", "in_context", "memory"], None, memory=memory, adapter=None, label=None, log=log)
    assert [c.name for c in chosen] == ["base", "memory"]


def test_evaluate_users_source_in_context_and_memory_of_critiques(tmp_path, tiny_model_path):
    """Held-out needs with the training users' critiques as memory: the in-context condition is told
    the most recurring ones, the memory condition the critique of a similar remembered request."""
    from pipeline.evaluation.summary import read_summary

    memory = tmp_path / "verbal_feedback.jsonl"
    write_jsonl(CRITIQUES, memory)
    needs = tmp_path / "needs.jsonl"
    write_jsonl(
        [
            {"id": "n1", "prompt": "Which train goes to Lyon?", "need": "the train to Lyon", "keywords": ["TGV"]},
            {"id": "n2", "prompt": "How many legs has a spider?", "need": "the number of legs", "keywords": ["eight|8"]},
        ],
        needs,
    )
    with_ = {
        "conditions": ["base", "in_context", "memory"],
        "sampling": {"max_new_tokens": 4, "temperature": 0.0},
        "resamples": 200,
        "drift": False,
        "memory": {"embedder": "lexical", "threshold": 0.8, "max_critiques": 1},
        "users": {"max_rounds": 1, "simulator": {"model": "tiny"}, "policy_sampling": {"max_new_tokens": 4}},
    }
    result = run_evaluate(tmp_path, {"prompts": str(needs), "needs": str(needs), "memory": str(memory)}, with_)
    assert result.ok, result.records[0].error
    summary = read_summary(result.run_dir / "check")
    assert summary["feedback"] == "(1) Give me the minutes, not a story."
    conditions = summary["conditions"]
    assert list(conditions) == ["base", "in_context", "memory"]
    assert conditions["memory"]["memory_retrieved"] == {"needs": pytest.approx(wilson(1, 2))}  # the Lyon need only
    for metrics in conditions.values():
        assert metrics["first_reply_satisfied"]["n"] == 2


def test_need_outcomes_count_a_need_with_no_judged_reply_as_not_satisfied_first():
    """Need `a` asked twice: its first copy got only a clarifying question (no reply judged), its
    second a reply judged satisfied. The unjudged copy counts, as not satisfied by its first reply
    (the model never answered it); it was left out before, which made n 2 and the rate 1/2 here
    instead of 1/3. The second copy is `a#2` in both metrics (so it pairs with another condition's `a#2`)."""
    from feedback.simulator.protocol import SimulatedUser, Transcript, Utterance
    from pipeline.evaluation.users import need_outcomes
    from pipeline.stats import rate

    def transcript(need_id: str, judged: bool | None, satisfied: bool) -> Transcript:
        if judged is None:
            turns = [Utterance("system", "clarifying_question", "Which one?", 1), Utterance("user", "answer", "That one.", 1)]
        else:
            turns = [Utterance("system", "response", "an answer", 1, satisfied=judged)]
        return Transcript(SimulatedUser(need_id, "n", "r"), turns, satisfied=satisfied)

    out = need_outcomes([transcript("a", None, False), transcript("b", False, True), transcript("a", True, True)])
    assert out["satisfied"] == {"a": False, "b": True, "a#2": True}
    assert out["first_reply_satisfied"] == {"a": False, "b": False, "a#2": True}
    assert rate(out["first_reply_satisfied"].values()) == pytest.approx(wilson(1, 3))


def test_clarifying_questions_only_count_in_first_reply_satisfied():
    """max_rounds 1 with max_clarifications 1 and a policy whose first turn asks a question: the
    users answer it and the conversation ends with no reply judged. Both needs count in n as not
    satisfied by a first reply (0 of 2), where they had been dropped (n 0, no rate at all)."""
    from feedback.simulator.protocol import Judge, ProtocolSettings, SimulatedUser, run_conversations
    from pipeline.evaluation.users import need_outcomes
    from pipeline.generation import Completion
    from pipeline.llm_cache import CachedLLM
    from pipeline.stats import rate

    class User:
        identity = "scripted-user"

        def generate(self, conversations, sampling, seed=0):
            return [Completion("The blue one.", 3, True) for _ in conversations]

    simulator = CachedLLM(User(), None)
    users = [SimulatedUser(i, "a need", "a request", first_reply="Which one do you mean?") for i in ("u1", "u2")]
    settings = ProtocolSettings(max_rounds=1, max_clarifications=1)
    transcripts = run_conversations(users, simulator, simulator, settings, 0, Judge(simulator, "verbal"))
    assert [[u.type for u in t.utterances] for t in transcripts] == [["question", "clarifying_question", "answer"]] * 2
    first = need_outcomes(transcripts)["first_reply_satisfied"]
    assert first == {"u1": False, "u2": False} and rate(first.values()) == wilson(0, 2)
    from pipeline.evaluation.users import first_reply_outcomes  # what the simulate stage's rate reads

    assert first_reply_outcomes(transcripts) == [False, False]


def test_side_by_side_shows_a_need_answered_only_by_a_question_as_not_satisfied(tmp_path):
    """The report's side-by-side counts as the rate does: a conversation with no judged reply shows
    its clarifying question, not satisfied (it was left out, and the need looked agreed on)."""
    from pipeline.evaluation.report import users_side_by_side

    def talk(condition: str, utterances: list[dict]) -> dict:
        return {"condition": condition, "conversation_id": "n1", "request": "Which train?", "utterances": utterances}

    def said(kind: str, text: str, satisfied: bool | None = None, satisfaction: float | None = None) -> dict:
        who = "system" if kind in ("response", "clarifying_question") else "user"
        return {"participant": who, "type": kind, "text": text, "round": 1, "satisfied": satisfied, "satisfaction": satisfaction}

    rows = [
        talk("base", [said("question", "Which train?"), said("response", "The TGV.", True, 0.9)]),
        talk("kto", [said("question", "Which train?"), said("clarifying_question", "To where?"), said("answer", "Lyon.")]),
    ]
    save_rows(rows, tmp_path / "eval" / "conversations")
    section = users_side_by_side([tmp_path / "eval"])
    assert html.escape("✓ 0.90: The TGV.") in section
    assert html.escape("✗: (no reply, only a clarifying question) To where?") in section
    assert "Needs the conditions disagree on first (1 of 1)" in section


def test_a_misspelt_scope_is_an_error_not_a_silently_unscoped_prompt(tmp_path, tiny_model_path):
    """'in-scope' is none of the three scopes: kept, the row would count only toward degeneration,
    and adherence would be measured without it (or, every row misspelt, not at all)."""
    prompts = tmp_path / "held_out.jsonl"
    rows = [{"prompt": p, "scope": s, "feedback": FEEDBACK, "metric": json.dumps(METRIC)} for p, s in SCOPED]
    rows[1]["scope"] = "in-scope"
    write_jsonl(rows, prompts)
    result = run_evaluate(tmp_path, {"prompts": str(prompts)}, {"drift": False})
    assert not result.ok and "row 2: field 'scope': 'in-scope' is none of in_scope" in result.records[0].error
    assert not (result.run_dir / "check" / "summary").exists()


def test_memory_prompts_without_a_scope_are_remembered_after_a_save(tmp_path):
    """A memory of prompts where only some rows carry a scope, saved as a dataset (save_rows keeps
    every column, None where a row had none): the unscoped rows are in scope, as in the JSONL."""
    from pipeline.evaluation.conditions import load_memory
    from pipeline.records import save_rows

    rows = [{"prompt": "How do I boil an egg?"}, {"prompt": "What is 2+2?", "scope": "out_of_scope"}]
    save_rows(rows, tmp_path / "memory")
    write_jsonl(rows, tmp_path / "memory.jsonl")
    for path in (tmp_path / "memory", tmp_path / "memory.jsonl"):
        memory = load_memory(path)
        assert memory is not None and memory.keys == ["How do I boil an egg?"]


def test_an_exact_repeat_of_a_held_out_prompt_or_need_is_scored_once(tmp_path, tiny_model_path):
    """A held-out prompt and a held-out need each written twice word for word count once in n
    (evaluate v11: before, each weighed double in its rates); two needs behind one request (as
    ClariQ's facets of one `initial_request`) stay two items."""
    from pipeline.evaluation.summary import read_summary
    from pipeline.records import load_rows

    prompts = write_scoped_prompts(tmp_path)
    rows = load_rows(prompts)
    write_jsonl([*rows, rows[0]], prompts)  # "How do I boil an egg?" twice
    needs = tmp_path / "needs.jsonl"
    lyon = {"id": "n1", "prompt": "Which train goes to Lyon?", "need": "the train to Lyon", "keywords": ["TGV"]}
    write_jsonl(
        [
            lyon,
            {"id": "n2", "prompt": "Which train goes to Lyon?", "need": "the price of a ticket", "keywords": ["euros"]},
            lyon,
        ],
        needs,
    )
    with_ = {
        "conditions": ["base"],
        "sampling": {"max_new_tokens": 4, "temperature": 0.0},
        "resamples": 200,
        "drift": False,
        "users": {"max_rounds": 1, "simulator": {"model": "tiny"}, "policy_sampling": {"max_new_tokens": 4}},
    }
    result = run_evaluate(tmp_path, {"prompts": str(prompts), "needs": str(needs)}, with_)
    assert result.ok, result.records[0].error
    summary = read_summary(result.run_dir / "check")
    base = summary["conditions"]["base"]
    assert summary["counts"] == {"in_scope": 3, "near_scope": 2, "out_of_scope": 2}
    assert base["adherence"]["n"] == 3 and base["first_reply_satisfied"]["n"] == 2 and base["satisfied"]["n"] == 2
    assert len(load_rows(result.run_dir / "check" / "evaluation")) == 7
    assert sorted(load_rows(result.run_dir / "check" / "conversations")[k]["need"] for k in range(2)) == [
        "the price of a ticket",
        "the train to Lyon",
    ]
    metrics = result.records[0].metrics
    assert metrics["prompts_duplicates_dropped"] == 1 and metrics["needs_duplicates_dropped"] == 1
