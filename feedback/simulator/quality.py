"""How well does the simulator answer clarifying questions? Compared to real ClariQ users.

For ClariQ rows (initial_request, facet_desc = the need, question, answer = what the real
user said), the simulator answers the question from the need; we report the mean cosine
similarity (all-MiniLM-L6-v2) between its answers and the real ones, next to a baseline
that answers every question with the information need verbatim (ConvSim's reference
point), and how often the yes/no polarity of the answer agrees with the real user's.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.generation import SamplingSettings
from pipeline.llm_cache import CachedLLM
from pipeline.records import load_rows

from . import prompts
from .protocol import clean_user_text

_POLARITY = re.compile(r"^\W*(yes|yeah|yep|sure|correct|no|nope|not)\b", re.I)


def polarity(text: str) -> str | None:
    m = _POLARITY.match(text or "")
    if not m:
        return None
    return "no" if m.group(1).lower() in ("no", "nope", "not") else "yes"


def clariq_questions(path: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded sample of ClariQ rows that have a clarifying question and a real answer."""
    rows = load_rows(path, required=["initial_request", "facet_desc", "question", "answer"], what="ClariQ rows")
    usable = [r for r in rows if str(r["question"]).strip() and str(r["answer"]).strip() and str(r["facet_desc"]).strip()]
    if not usable:
        raise DataError(f"{path}: no row has a question and an answer")
    rng = random.Random(seed)
    return rng.sample(usable, min(n, len(usable)))


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var / len(values))


def evaluate_clarifying_answers(
    rows: list[dict[str, Any]], simulator: CachedLLM, embedder, seed: int = 0, sampling: SamplingSettings | None = None
) -> dict[str, Any]:
    sampling = sampling or SamplingSettings(max_new_tokens=32, temperature=0.0)
    msgs = [prompts.answer_messages(str(r["facet_desc"]), str(r["initial_request"]), str(r["question"])) for r in rows]
    salts = [f"clariq-eval:{r.get('facet_id', '')}:{r.get('question_id', i)}" for i, r in enumerate(rows)]
    generated = simulator.generate(msgs, sampling, seed=seed, salts=salts)
    answers = [clean_user_text(g.text) or "(no answer)" for g in generated]
    real = [str(r["answer"]) for r in rows]
    needs = [str(r["facet_desc"]) for r in rows]
    emb_real = embedder.encode(real)
    sim = (embedder.encode(answers) * emb_real).sum(-1).tolist()
    base = (embedder.encode(needs) * emb_real).sum(-1).tolist()
    sim_mean, sim_se = _mean_stderr(sim)
    base_mean, base_se = _mean_stderr(base)
    with_polarity = [(polarity(a), polarity(b)) for a, b in zip(answers, real) if polarity(b)]
    real_yes = sum(b == "yes" for _, b in with_polarity)
    return {
        "rows": len(rows),
        "simulator": simulator.identity,
        "prompt_version": prompts.PROMPT_VERSION,
        "similarity_simulator": sim_mean,
        "similarity_simulator_stderr": sim_se,
        "similarity_need_verbatim": base_mean,
        "similarity_need_verbatim_stderr": base_se,
        "simulator_wins": sum(s > b for s, b in zip(sim, base)) / len(rows),
        "polarity_rows": len(with_polarity),
        "polarity_agreement": (sum(a == b for a, b in with_polarity) / len(with_polarity)) if with_polarity else None,
        "polarity_majority_baseline": (max(real_yes, len(with_polarity) - real_yes) / len(with_polarity))
        if with_polarity
        else None,
        "examples": [
            {"need": n, "question": str(r["question"]), "real": b, "simulator": a, "sim": round(s, 4), "need_sim": round(x, 4)}
            for n, r, b, a, s, x in list(zip(needs, rows, real, answers, sim, base))[:8]
        ],
    }
