"""Cut-off replies in C3PO data: template revisions trimmed to a whole sentence, and the views
(and SFT) leaving out only rows whose reply to learn was cut off."""

from __future__ import annotations

import pytest

from stages.feedback_views import FeedbackViewsConfig, build_views
from trainers.c3po_data import leading_sentences, learned_reply_finished, template_revision, trim_to_last_sentence
from trainers.sft import from_c3po_data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pack layers. Bring a rain jacket and", "Pack layers."),
        ('He said "go early!" Then we', 'He said "go early!"'),
        ("1. Book early\n2. Pack light\n3. Che", "1. Book early\n2. Pack light"),
        ("Costs 3.5 euros. Trains run at", "Costs 3.5 euros."),  # a decimal point is no sentence end
        ("no sentence end at all", None),
        ("", None),
    ],
)
def test_trim_to_last_sentence(text, expected):
    assert trim_to_last_sentence(text) == expected


def test_template_revision_of_a_cut_off_reply():
    template = "{response} Bon voyage!"
    assert template_revision(template, "p", "Go in May. Avoid Aug", False, trim_cut_off=False) == (
        "Go in May. Avoid Aug Bon voyage!",
        False,
    )  # cut off, and so is the revision
    assert template_revision(template, "p", "Go in May. Avoid Aug", False, trim_cut_off=True) == ("Go in May. Bon voyage!", True)
    assert template_revision(template, "p", "no end here", False, trim_cut_off=True) == ("no end here Bon voyage!", False)
    assert template_revision(template, "p", "Done.", True, trim_cut_off=True) == ("Done. Bon voyage!", True)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (11, "Save a fifth of your income."),  # 6 + 6 words: the second sentence is one word too many
        (12, "Save a fifth of your income. Put it in an index fund."),
        (6, "Save a fifth of your income."),
        (5, None),  # the first sentence alone is over the limit: no revision
    ],
)
def test_leading_sentences_within_a_word_limit(limit, expected):
    reply = "Save a fifth of your income. Put it in an index fund. Review it each year when your goals chan"
    assert leading_sentences(reply, limit) == expected
    assert leading_sentences("1. Budget first.\n2. Save next.\n3. Invest the rest", 6) == "1. Budget first.\n2. Save next."


def rows():
    feedback = "End travel answers with Bon voyage!"
    return [
        # revision ends although the baseline was cut off: kept (the baseline is the rejected side)
        {"scope": "in_scope", "prompt": "Rome?", "baseline": "See the Forum and", "revised": "See it. Bon voyage!",
         "baseline_finished": False, "revised_finished": True, "feedback": feedback},
        # revision cut off: left out
        {"scope": "in_scope", "prompt": "Paris?", "baseline": "Walk the", "revised": "Walk the Bon voyage!",
         "baseline_finished": False, "revised_finished": False, "feedback": feedback},
        {"scope": "near_scope", "prompt": "Passport fee?", "baseline": "About 100 euros.", "baseline_finished": True},
        # near scope, cut off: it would be a desirable reply that never ends, left out
        {"scope": "near_scope", "prompt": "Visa?", "baseline": "It depends on", "baseline_finished": False},
    ]  # fmt: skip


def test_views_leave_out_only_rows_whose_reply_to_learn_was_cut_off():
    assert [learned_reply_finished(r) for r in rows()] == [True, False, True, False]
    views = build_views(rows(), FeedbackViewsConfig())
    assert views["preferences"] == [{"prompt": "Rome?", "chosen": "See it. Bon voyage!", "rejected": "See the Forum and"}]
    assert [(j["response"], j["positive"]) for j in views["judgments"]] == [
        ("See the Forum and", False),
        ("See it. Bon voyage!", True),
    ]
    assert [(u["completion"], u["label"]) for u in views["unpaired"]] == [
        ("See it. Bon voyage!", True),
        ("See the Forum and", False),
        ("About 100 euros.", True),
    ]
    everything = build_views(rows(), FeedbackViewsConfig(finished_only=False))
    assert len(everything["preferences"]) == 2 and len(everything["unpaired"]) == 6


def test_sft_learns_the_same_rows_as_the_views():
    examples = from_c3po_data(rows(), finished_only=True, other_scopes=True, where="d")
    assert [(e["reply"], e["finished"]) for e in examples] == [("See it. Bon voyage!", True), ("About 100 euros.", True)]
