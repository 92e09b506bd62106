"""SmolLM2-135M as the simulated user: a deliberately wrong answer rarely earns thanks.

The model is small, so this asserts rates, not strings: over short question/answer pairs
(none from the prompt's examples or calibration set), most wrong or off-topic answers get
feedback instead of thanks, and correct answers are thanked more often than wrong ones.
"""

from __future__ import annotations

import pytest

from feedback.simulator.protocol import Judge, ProtocolSettings, SimulatedUser, run_conversations
from pipeline.llm import HFClient
from pipeline.llm_cache import CachedLLM

pytestmark = pytest.mark.slow

#: (need, request, correct answer, wrong answer)
CASES = [
    (
        "the capital city of Italy",
        "What is the capital of Italy?",
        "The capital of Italy is Rome.",
        "The capital of Italy is Oslo.",
    ),
    (
        "how many legs an insect has",
        "How many legs does an insect have?",
        "An insect has six legs.",
        "I enjoy watching football on Sundays.",
    ),
    (
        "the colour of a ripe banana",
        "What colour is a ripe banana?",
        "A ripe banana is yellow.",
        "A ripe banana is bright purple.",
    ),
    ("the animal that says moo", "Which animal says moo?", "A cow says moo.", "The stock market closed higher today."),
    (
        "the season after winter",
        "Which season comes after winter?",
        "Spring comes after winter.",
        "Summer comes right after winter.",
    ),
    ("the opposite of hot", "What is the opposite of hot?", "The opposite of hot is cold.", "My car needs new tyres."),
    ("what bees make", "What do bees produce?", "Bees produce honey.", "Bees produce electricity and steel."),
    ("the number of hours in a day", "How many hours are in a day?", "A day has 24 hours.", "Pizza is best with extra cheese."),
    (
        "where penguins mostly live",
        "Where do most penguins live?",
        "Most penguins live in the Southern Hemisphere, many in Antarctica.",
        "Most penguins live in the Sahara desert.",
    ),
    (
        "the tallest animal",
        "What is the tallest animal?",
        "The giraffe is the tallest animal.",
        "I forgot to water my plants yesterday.",
    ),
    (
        "the main language of Spain",
        "What language is spoken in Spain?",
        "Spanish is spoken in Spain.",
        "People in Spain mostly speak Japanese.",
    ),
    (
        "what a thermometer measures",
        "What does a thermometer measure?",
        "A thermometer measures temperature.",
        "The movie starts at eight tonight.",
    ),
]


def thanks_rate(simulator, policy, answers, judge):
    users = [
        SimulatedUser(id=f"u{i}", need=need, request=request, first_reply=answer)
        for i, ((need, request, *_), answer) in enumerate(zip(CASES, answers))
    ]
    settings = ProtocolSettings(max_rounds=1, user_sampling={"max_new_tokens": 32, "temperature": 0.7})
    transcripts = run_conversations(users, policy, simulator, settings, seed=0, judge=judge)
    for t in transcripts:
        assert [u.type for u in t.utterances] == ["question", "response", "feedback"]
        feedback = t.utterances[-1]
        assert feedback.satisfied == feedback.text.lower().startswith("thank")  # thanks iff satisfied
    return sum(t.satisfied for t in transcripts) / len(transcripts), transcripts


def test_wrong_answers_mostly_get_feedback_not_thanks(smollm2_path):
    backend = HFClient("smollm2-135m", batch_size=12)
    simulator = CachedLLM(backend, None)
    judge = Judge(simulator, "both").calibrate()
    assert judge.accuracy >= 0.7
    wrong_rate, wrong = thanks_rate(simulator, simulator, [c[3] for c in CASES], judge)
    right_rate, _ = thanks_rate(simulator, simulator, [c[2] for c in CASES], judge)
    print(f"calibration={judge.accuracy:.2f} thanks: wrong={wrong_rate:.2f} right={right_rate:.2f}")
    for t in wrong:
        print(repr(t.utterances[1].text), "->", repr(t.utterances[2].text), round(t.utterances[1].satisfaction, 3))
    assert wrong_rate <= 1 / 3  # at least two thirds of wrong answers draw feedback
    assert right_rate > wrong_rate  # and the judgment is not a constant "no"
    # the feedback is specific to the need more often than not (it mentions one of its words)
    specific = [
        t
        for t in wrong
        if not t.satisfied and any(w in t.utterances[-1].text.lower() for w in t.user.need.lower().split() if len(w) > 3)
    ]
    assert len(specific) >= len([t for t in wrong if not t.satisfied]) / 2
