"""Feedback sources: every reader that turns an outside or heedful feedback file into records.

formats.py     `detect_format` (one vocabulary for every reader), `load_feedback`, `RECORD_KINDS`
readers.py     reactions / span feedback / preference pairs for training, whatever the format
qa_feedback.py FineGrainedRLHF's qa-feedback: prompts, error spans, the six pairwise preferences
clariq.py      ClariQ: a yes/no answer to a clarifying question as a reaction
judgments.py   CUT/KTO judgment rows (instruction, response, judgment, positive) from records,
               files or qa-feedback

The Argilla bridge (feedback/argilla_*.py) and the simulator (feedback/simulator/) are the
other producers of feedback.
"""
