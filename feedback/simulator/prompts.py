"""The simulator's prompts: short and few-shot, so a 135M model can follow them.

Every record the simulator writes names `PROMPT_VERSION`; change it whenever a template
or an example below changes, so cached generations and old datasets stay distinguishable.
The examples are invented (not from ClariQ or the quickstart), so evaluating on those
data does not test on the prompt.
"""

from __future__ import annotations

from pipeline.chat import Messages

PROMPT_VERSION = "convsim-small/2"

POLICY_SYSTEM = (
    "You are a helpful assistant. Answer the user's request in a few sentences. "
    "If the request is too vague to answer, ask one short clarifying question instead."
)

THANKS = {
    "": "Thanks, that is what I needed.",
    "terse": "Thanks, that's it.",
    "polite": "Thank you very much, that is exactly what I was looking for.",
    "casual": "Great, thanks!",
}


def persona_line(persona: str, style: str) -> str:
    parts = []
    if persona:
        parts.append(f"You are {persona}.")
    if style:
        parts.append(f"You write in a {style} style.")
    return " ".join(parts)


# ----------------------------------------------------------------------------- judging a reply

JUDGE_SYSTEM = (
    "You are a user judging an assistant's answer. Reply Yes if the answer gives what you need, No if it is wrong or off-topic."
)
#: (need, request, answer, label)
JUDGE_SHOTS = [
    ("the largest planet in the solar system", "Which planet is the largest?", "Jupiter is the largest planet.", "Yes"),
    ("the largest planet in the solar system", "Which planet is the largest?", "Mars is the largest planet.", "No"),
    ("how to boil an egg", "How do I boil an egg?", "Cats sleep a lot.", "No"),
    ("the color of grass", "What color is grass?", "Grass is green.", "Yes"),
]
#: labelled replies the satisfaction threshold is calibrated on (`satisfied_threshold: auto`)
CALIBRATION = [
    ("the author of Hamlet", "Who wrote Hamlet?", "Hamlet was written by William Shakespeare.", True),
    ("the author of Hamlet", "Who wrote Hamlet?", "Hamlet was written by Mark Twain.", False),
    ("the freezing point of water", "When does water freeze?", "Water freezes at 0 degrees Celsius.", True),
    ("the freezing point of water", "When does water freeze?", "My favourite sport is tennis.", False),
    ("how many legs a spider has", "How many legs does a spider have?", "A spider has eight legs.", True),
    ("how many legs a spider has", "How many legs does a spider have?", "A spider has three legs.", False),
    ("what bees make", "What do bees make?", "Bees make honey and wax.", True),
    ("what bees make", "What do bees make?", "Bees make plastic bottles.", False),
    ("the language spoken in Brazil", "What language do people speak in Brazil?", "People in Brazil speak Portuguese.", True),
    ("the language spoken in Brazil", "What language do people speak in Brazil?", "Trains run on rails.", False),
]


def expectation_context(need: str, request: str) -> Messages:
    """What the user asked, with the need in view: the simulator's likelihood of a reply here is
    how much it expects someone with this need to accept that reply."""
    return [{"role": "system", "content": f"The user wants {need.rstrip('.')}."}, {"role": "user", "content": request}]


def _judge_turn(need: str, request: str, answer: str) -> str:
    return f"I want: {need}.\nI asked: {request}\nAnswer: {answer}\nSatisfied?"


def judge_messages(need: str, request: str, answer: str) -> Messages:
    """The simulator says Yes/No; P(Yes) is its satisfaction with the reply."""
    messages = [{"role": "system", "content": JUDGE_SYSTEM}]
    for shot_need, shot_request, shot_answer, label in JUDGE_SHOTS:
        messages.append({"role": "user", "content": _judge_turn(shot_need, shot_request, shot_answer)})
        messages.append({"role": "assistant", "content": label})
    messages.append({"role": "user", "content": _judge_turn(need, request, _clip(answer, 600))})
    return messages


# ----------------------------------------------------------------------------- feedback on a reply

FEEDBACK_SHOTS = [
    (
        "the capital of Australia",
        "What is the capital of Australia?",
        "Sydney is the capital of Australia.",
        "That's wrong. I want the capital of Australia.",
    ),
    (
        "how long to boil an egg for a soft yolk",
        "How long should I boil an egg?",
        "Eggs are a good source of protein.",
        "That doesn't answer my question. I need how long to boil an egg for a soft yolk.",
    ),
    (
        "the names of the planets near the Sun",
        "Which planets are closest to the Sun?",
        "Mercury.",
        "That's only part of it. I want the names of the planets near the Sun.",
    ),
]


def _feedback_turn(need: str, request: str, answer: str) -> str:
    return f"I want: {need}.\nI asked: {request}\nAnswer: {answer}\nWhat is wrong or missing?"


def feedback_messages(need: str, request: str, answer: str, persona: str = "", style: str = "") -> Messages:
    """One sentence of specific feedback: what is wrong, missing or irrelevant."""
    system = "You are a user. The assistant's answer did not give you what you need. Say briefly what is wrong or missing. Do not thank."
    if extra := persona_line(persona, style):
        system += " " + extra
    messages = [{"role": "system", "content": system}]
    for shot_need, shot_request, shot_answer, feedback in FEEDBACK_SHOTS:
        messages.append({"role": "user", "content": _feedback_turn(shot_need, shot_request, shot_answer)})
        messages.append({"role": "assistant", "content": feedback})
    messages.append({"role": "user", "content": _feedback_turn(need, request, _clip(answer, 600))})
    return messages


# ----------------------------------------------------------------------------- answering a clarifying question

ANSWER_SHOTS = [
    (
        "the opening hours of the Louvre museum in Paris",
        "Tell me about the Louvre.",
        "Do you want to know when it is open?",
        "Yes, I want its opening hours.",
    ),
    (
        "the opening hours of the Louvre museum in Paris",
        "Tell me about the Louvre.",
        "Are you looking for the Louvre in Abu Dhabi?",
        "No, the one in Paris.",
    ),
    (
        "cheap flights from London to Rome",
        "Find me flights to Rome.",
        "Would you like to buy a new car?",
        "No, that's not what I'm asking. I want cheap flights from London to Rome.",
    ),
]


def _answer_turn(need: str, request: str, question: str) -> str:
    return f"I want: {need}.\nI asked: {request}\nAssistant asks: {question}\nMy reply:"


def answer_messages(need: str, request: str, question: str, persona: str = "", style: str = "") -> Messages:
    """Answer a clarifying question from the need only; refuse questions unrelated to it."""
    system = (
        "You are a user answering the assistant's question in one short sentence, using only what you want. "
        "If the question is unrelated to what you want, say so."
    )
    if extra := persona_line(persona, style):
        system += " " + extra
    messages = [{"role": "system", "content": system}]
    for shot_need, shot_request, shot_question, answer in ANSWER_SHOTS:
        messages.append({"role": "user", "content": _answer_turn(shot_need, shot_request, shot_question)})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": _answer_turn(need, request, _clip(question, 300))})
    return messages


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
