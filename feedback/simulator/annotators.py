"""The simulator as an Argilla annotator: judgment functions for `feedback.argilla_annotate.annotate`.

`annotate(dataset, fn, client=...)` hands every pending record to `fn(task)` and submits
what it returns as that user's response, through the same API the web UI uses. So a
simulated annotator's work is pulled back by `argilla_pull` into exactly the records a
person's would be (source argilla, annotator = the simulator's Argilla user).

The need behind a record is looked up by record id or prompt text in `needs` (e.g. from
the needs file the replies were sampled for); without one, the prompt stands in for it.
"""

from __future__ import annotations

from typing import Any, Literal

from pipeline.generation import SamplingSettings
from pipeline.llm_cache import CachedLLM

from . import prompts
from .protocol import _POSITIVE_OPENINGS, Judge, clean_user_text, fact_coverage, reaction_for


class SimulatedAnnotator:
    """`fn(task) -> {question: value}` for the `reaction` and `verbal` templates."""

    def __init__(
        self,
        simulator: CachedLLM,
        judge: Judge,
        kind: Literal["reaction", "verbal"],
        needs: dict[str, dict[str, Any]] | None = None,
        threshold: float = 0.5,
        neutral_band: float = 0.5,
        min_fact_coverage: float = 0.5,
        sampling: SamplingSettings | None = None,
        seed: int = 0,
    ):
        self.simulator, self.judge, self.kind = simulator, judge, kind
        self.needs = needs or {}
        self.threshold, self.neutral_band, self.min_fact_coverage = threshold, neutral_band, min_fact_coverage
        self.sampling = sampling or SamplingSettings(max_new_tokens=40, temperature=0.7)
        self.seed = seed
        self.count = 0

    def _need(self, task) -> tuple[str, list[str]]:
        prompt = str(task.fields.get("prompt", ""))
        entry = self.needs.get(task.id) or self.needs.get(prompt) or {}
        return str(entry.get("need") or prompt), list(entry.get("facts") or [])

    def judge_one(self, task) -> dict[str, Any]:
        """The simulator's view of one record: satisfaction, satisfied, and (verbal) its words."""
        prompt, response = str(task.fields.get("prompt", "")), str(task.fields.get("response", ""))
        need, facts = self._need(task)
        salt = f"argilla:{task.id}"
        sat = self.judge.satisfaction([(need, prompt, response)], salts=[salt])[0]
        coverage = fact_coverage(response, facts)
        satisfied = sat >= self.threshold and (coverage is None or coverage >= self.min_fact_coverage)
        out = {
            "satisfaction": sat,
            "satisfied": satisfied,
            "reaction": reaction_for(sat, self.threshold, self.neutral_band, satisfied),
        }
        if self.kind == "verbal":
            if satisfied:
                critique = prompts.THANKS[""]
            else:
                note = self.simulator.generate(
                    [prompts.feedback_messages(need, prompt, response)], self.sampling, seed=self.seed, salts=[f"{salt}:feedback"]
                )[0]
                critique = clean_user_text(note.text)
                if not critique or critique.lower().startswith(_POSITIVE_OPENINGS):
                    critique = f"That is not what I need. I want {need.rstrip('.')}."
            out["critique"] = critique
        return out

    def __call__(self, task) -> dict[str, Any]:
        self.count += 1
        view = self.judge_one(task)
        if self.kind == "reaction":
            return {"reaction": view["reaction"]}
        return {"critique": view["critique"], "judgment": "good" if view["satisfied"] else "needs_work"}
