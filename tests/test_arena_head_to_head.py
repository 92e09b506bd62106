"""Trained rows head to head (pipeline/arena_head_to_head.py): every two finished trained rows of a
seed paired on their shared items, by hand; Holm's adjustment over a metric's pairs; a comparison
read the other way round; rows of different seeds, failed rows and unknown names."""

from __future__ import annotations

import pytest


def test_holm_by_hand():
    """m = 4: the k-th smallest p times (m - k + 1), never below the one before, capped at 1."""
    from pipeline.stats import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # 0.9 x 1 would fall below 0.5 x 2: it takes that
    assert holm([]) == []


def rows_and_items():
    """Three trained rows of seed 0 (one failed), one of seed 1, and the base: yes/no adherence on
    four prompts and a reward score on three."""

    def row(condition, method, seed, status="done"):
        return {"condition": condition, "method": method, "seed": seed, "status": status}

    rows = [
        row("base", None, None),
        row("dpo_s0", "dpo", 0),
        row("cut_s0", "cut", 0),
        row("kto_s0", "kto", 0, status="failed"),
        row("sft_s0", "sft", 0),
        row("dpo_s1", "dpo", 1),
    ]
    yes = {"p1": True, "p2": True, "p3": True, "p4": True}
    no = dict.fromkeys(yes, False)
    items = {
        "base": {"adherence": no},
        "dpo_s0": {"adherence": no, "reward/fine_grained": {"p1": 0.0, "p2": 0.5, "p3": 1.0}},
        "cut_s0": {"adherence": yes, "reward/fine_grained": {"p1": 1.0, "p2": 1.0, "p3": 2.0}},
        "kto_s0": {"adherence": yes},
        "sft_s0": {"adherence": {**no, "p1": True}},  # no scores: paired on adherence only
        "dpo_s1": {"adherence": yes},
    }
    return rows, items


def test_every_two_trained_rows_of_a_seed_are_paired_by_hand():
    from pipeline.arena_head_to_head import head_to_head
    from pipeline.stats import holm, paired_difference, paired_score_difference

    rows, items = rows_and_items()
    pairs = head_to_head(rows, items)
    # not the base, not the failed kto_s0, not across seeds (dpo_s1 has no partner of its seed)
    assert [(p["a"], p["b"], p["seed"]) for p in pairs] == [
        ("dpo_s0", "cut_s0", 0),
        ("dpo_s0", "sft_s0", 0),
        ("cut_s0", "sft_s0", 0),
    ]
    dpo_cut = pairs[0]["paired"]
    by_hand = paired_difference(items["dpo_s0"]["adherence"], items["cut_s0"]["adherence"])
    assert {k: dpo_cut["adherence"][k] for k in by_hand} == by_hand
    assert by_hand["value"] == -1.0 and by_hand["turned_no"] == 4 and dpo_cut["adherence"]["worse"] == 4
    score = paired_score_difference([items["dpo_s0"]["reward/fine_grained"]], items["cut_s0"]["reward/fine_grained"])
    assert dpo_cut["reward/fine_grained"]["value"] == pytest.approx(-5 / 6) == score["value"]
    assert set(pairs[1]["paired"]) == {"adherence"}  # sft_s0 has no scores
    raw = [p["paired"]["adherence"]["p"] for p in pairs]
    assert [p["paired"]["adherence"]["p_holm"] for p in pairs] == pytest.approx(holm(raw))
    assert raw[0] == pytest.approx(0.125) and pairs[0]["paired"]["adherence"]["p_holm"] == pytest.approx(0.375)
    assert pairs[0]["paired"]["reward/fine_grained"]["p_holm"] == dpo_cut["reward/fine_grained"]["p"]  # a family of one


def test_a_comparison_read_the_other_way_round():
    """b - a is a - b negated: interval mirrored, better and worse swapped, the same p."""
    from pipeline.arena_head_to_head import flipped, head_to_head

    rows, items = rows_and_items()
    forward = head_to_head(rows, items)[0]["paired"]
    backward = head_to_head([rows[2], rows[1]], items)[0]["paired"]  # cut_s0 listed first
    for metric in ("adherence", "reward/fine_grained"):
        mirrored = flipped(forward)[metric]
        for key in ("value", "lo", "hi", "n", "better", "worse", "turned_yes", "turned_no", "p"):
            assert mirrored[key] == pytest.approx(backward[metric][key]), (metric, key)


def test_findings_are_the_holm_adjusted_ones():
    from pipeline.arena_head_to_head import findings

    table = {
        "head_to_head": [
            {
                "a": "x",
                "b": "y",
                "seed": 0,
                "paired": {"adherence": {"p": 0.01, "p_holm": 0.03}, "unfinished": {"p": 0.02, "p_holm": 0.06}},
            }
        ]
    }
    assert [(metric, d["p_holm"]) for _, metric, d in findings(table)] == [("adherence", 0.03)]


def test_replication_counts_the_seeds_where_the_same_methods_differ_the_same_way():
    """dpo vs kto: Holm-significant and negative in seeds 0 and 2, positive in seed 1 (not the same
    way), not significant in seed 3; a pair of other methods is not counted; one seed: ''."""
    from pipeline.arena_head_to_head import replication

    def pair(seed, value, p_holm, methods=("dpo", "kto")):
        d = {"value": value, "p": p_holm, "p_holm": p_holm}
        return {
            "a": f"{methods[0]}_s{seed}",
            "b": f"{methods[1]}_s{seed}",
            "seed": seed,
            "methods": list(methods),
            "paired": {"adherence": d},
        }

    pairs = [
        pair(0, -0.3, 0.01),
        pair(1, 0.4, 0.01),
        pair(2, -0.2, 0.04),
        pair(3, -0.1, 0.5),
        pair(0, -0.5, 0.001, ("cut", "kto")),
    ]
    table = {"head_to_head": pairs}
    assert replication(table, pairs[0], "adherence") == "seeds 0, 2 of 0, 1, 2, 3"
    assert replication(table, pairs[1], "adherence") == "seeds 1 of 0, 1, 2, 3"
    assert replication(table, pairs[4], "adherence") == ""


def test_compare_reads_a_pair_either_way_and_says_what_it_cannot_tell(monkeypatch):
    """`heedful compare`'s reading: a trained pair of one seed comes from the table (with its Holm
    p), the other way round flipped; other rows are paired on the spot (no Holm p); different
    methods of different seeds carry a note; an unknown or unfinished row is an error naming the rows."""
    from pipeline import arena_table
    from pipeline.arena_head_to_head import compare, flipped, head_to_head

    rows, items = rows_and_items()
    table = {"rows": rows, "head_to_head": head_to_head(rows, items)}
    monkeypatch.setattr(arena_table, "collect_with_items", lambda run_root: (table, items))
    forward = compare("run", "dpo_s0", "cut_s0")
    assert forward["seed"] == 0 and forward["paired"] == table["head_to_head"][0]["paired"] and not forward["notes"]
    assert compare("run", "cut_s0", "dpo_s0")["paired"] == flipped(forward["paired"])
    crossed = compare("run", "cut_s0", "dpo_s1")
    assert crossed["seed"] is None and "p_holm" not in crossed["paired"]["adherence"]
    assert "different methods of different seeds" in crossed["notes"][0]
    assert not compare("run", "dpo_s0", "dpo_s1")["notes"]  # two seeds of one method: what a user compares on purpose
    with pytest.raises(ValueError, match="no finished arena row 'dpo'.*one row per seed: dpo_s0, dpo_s1"):
        compare("run", "dpo", "cut_s0")
    with pytest.raises(ValueError, match="no finished arena row 'kto_s0'"):
        compare("run", "kto_s0", "cut_s0")  # failed
