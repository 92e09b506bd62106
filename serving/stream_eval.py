"""MemPrompt's streaming evaluation, run through the real serving path.

A stream of lexical queries (synonym / antonym / homophone of a word, from WordNet-style
rows `{"meta": {"word1", "word2"}, "type": "syn"|"ant"|"hom"}`) is asked with *ambiguous
phrasings* ("What is akin to < roomy > ?" does not say "synonym"). The model is shown a
few worked examples and must say which relation it answers ("the synonym for roomy is
..."). A simulated user checks the relation the reply names; when it is wrong, the user
clarifies ("when I ask 'akin to', I mean a synonym") through `MemPromptService.feedback`,
exactly like `POST /v1/feedback`. Later queries with the same phrasing (other words)
retrieve the clarification and get it attached to their prompt.

Reported, over the same stream: accuracy without memory, with memory (the growing
memory), and with the right clarification always attached (an upper bound on what the
model can do with a clarification). Accuracy = the first relation named in the reply is
the asked one, as in the paper's task check; `answer_match` (the reply also contains the
reference word) is reported too.

The replies come from the engine `heedful serve` would use (`engine`, default `auto`: on a CPU what
the engine probe found faster here), so the stream measures the served path, CTranslate2's cache of
the few-shot start shared by every query included (docs/serving.md). Only `memory` must ask in stream
order; `no_memory` and `oracle` ask concurrently (`CONCURRENT` requests in flight), as many users of
one server would, and the engine's micro-batcher batches them: their `seconds` are batched time
(`concurrent: true` in the summary). With `engine: hf+ct2` a batch runs on HF and a lone request on
CTranslate2, so name one engine when the conditions' replies must come from the same one.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import DataError
from pipeline.generation import ServeEngineSetting
from pipeline.records import load_rows

from .prompting import PAPER_TEMPLATE

RELATIONS = {"syn": "synonym", "ant": "antonym", "hom": "homophone"}
#: alternative names a reply may use for the same relation
ALIASES = {"syn": ("synonym",), "ant": ("antonym", "opposite"), "hom": ("homophone", "homonym")}

#: ambiguous phrasings per relation: none of them names the relation
PHRASINGS: dict[str, list[str]] = {
    "syn": ["What is akin to < {w} > ?", "Give me a word resembling < {w} > .", "What goes along with < {w} > ?"],
    "ant": ["What is contrary to < {w} > ?", "Which word is the reverse of < {w} > ?", "What is far from < {w} > ?"],
    "hom": ["What rings like < {w} > ?", "What could one mishear as < {w} > ?", "Which word is an echo of < {w} > ?"],
}

SYSTEM = (
    "You answer questions about words. Always start your answer with 'the synonym for WORD is', "
    "'the antonym for WORD is' or 'the homophone for WORD is', then give one word."
)

#: worked examples: explicit questions, and ambiguous ones carrying a clarification (in the serving template)
FEWSHOT = [
    ("What is the synonym for < surrogate > ?", None, "the synonym for surrogate is substitute"),
    ("What is the antonym for < permit > ?", None, "the antonym for permit is forbid"),
    ("What is the homophone for < wring > ?", None, "the homophone for wring is ring"),
    ("What sounds the same as < {w} > ?", "sighted", "the homophone for sighted is cited"),
    ("What is close to < {w} > ?", "provident", "the synonym for provident is prudent"),
    ("What stands against < {w} > ?", "citation", "the antonym for citation is award"),
]


Condition = Literal["no_memory", "memory", "oracle"]
#: requests in flight at once for the conditions whose queries do not depend on each other: a few times
#: the engine's batch (16 by default), so a backlog is waiting whenever a batch ends and the next one
#: fills at once (16 threads re-submitting one by one after each batch made small batches)
CONCURRENT = 64
_ALL_CONDITIONS: tuple[Condition, ...] = ("no_memory", "memory", "oracle")


class StreamEvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = "smollm2-135m"
    adapter: str | None = None
    n: int = Field(default=200, ge=1)
    seed: int = 0
    clarify_prob: float = Field(default=1.0, ge=0, le=1)
    threshold: float = 0.9
    key_mask: str | None = "<[^>]*>"
    template: str = PAPER_TEMPLATE
    max_tokens: int = 12
    engine: ServeEngineSetting = "auto"
    conditions: list[Condition] = Field(default_factory=lambda: list(_ALL_CONDITIONS), min_length=1)


def clarification_for(phrasing: str, relation: str) -> str:
    ask = phrasing.replace("< {w} >", "a word").rstrip(" ?.")
    article = "an" if relation[0] in "aeiou" else "a"
    return f"when I ask '{ask}', I want {article} {relation}."


def make_stream(path: Path, n: int, seed: int) -> list[dict[str, Any]]:
    rows = load_rows(path, required=["meta", "type"], what="lexical tasks")
    usable = []
    for i, row in enumerate(rows):
        meta = row["meta"]
        if not isinstance(meta, dict) or "word1" not in meta or "word2" not in meta:
            raise DataError(f"{path}:{i + 1}: meta must hold word1 and word2")
        if row["type"] in PHRASINGS:
            usable.append(row)
    rng = random.Random(seed)
    rng.shuffle(usable)
    stream = []
    for row in usable[:n]:
        j = rng.randrange(len(PHRASINGS[row["type"]]))
        phrasing = PHRASINGS[row["type"]][j]
        stream.append(
            {
                "type": row["type"],
                "word1": row["meta"]["word1"],
                "word2": row["meta"]["word2"],
                "phrasing": f"{row['type']}{j}",
                "query": phrasing.replace("{w}", row["meta"]["word1"]),
                "clarification": clarification_for(phrasing, RELATIONS[row["type"]]),
            }
        )
    return stream


def named_relation(reply: str) -> str | None:
    """The relation the reply names first (None when it names none)."""
    text = reply.lower()
    found = [(text.find(alias), rel) for rel, aliases in ALIASES.items() for alias in aliases if alias in text]
    return min(found)[1] if found else None


def fewshot_messages(template: str) -> list[dict[str, str]]:
    from .prompting import render
    from .retrieval import MemoryHit
    from .store import MemoryEntry

    messages = [{"role": "system", "content": SYSTEM}]
    for phrasing, word, answer in FEWSHOT:
        if word is None:
            content = phrasing
        else:
            query = phrasing.replace("{w}", word)
            relation = answer.split()[1]
            hit = MemoryHit(MemoryEntry(0, query, clarification_for(phrasing, relation)), 1.0, "embedding")
            content = render(template, query, [hit])
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def run_stream_eval(
    path: Path,
    settings: StreamEvalSettings,
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
    engine=None,
    embedder=None,
) -> dict[str, Any]:
    import tempfile

    from .embedder import MiniLMEmbedder
    from .engine import ChatEngine
    from .prompting import render
    from .retrieval import MemoryHit, RetrievalSettings
    from .schemas import ChatRequest, FeedbackRequest
    from .service import MemPromptService, ServeSettings
    from .store import MemoryEntry

    say = progress or (lambda m: None)
    stream = make_stream(Path(path), settings.n, settings.seed)
    owned = contextlib.ExitStack()  # an engine made here is closed here (its batcher thread would keep it alive)
    if engine is None:
        engine = ChatEngine(settings.model, settings.adapter, engine=settings.engine)
        owned.callback(engine.close)
    embedder = embedder or MiniLMEmbedder()
    prefix = fewshot_messages(settings.template)
    rng = random.Random(settings.seed + 1)
    results: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    with owned, tempfile.TemporaryDirectory() as tmp:
        for condition in settings.conditions:
            serve = ServeSettings(
                model=settings.model,
                adapter=settings.adapter,
                memory=f"{tmp}/{condition}.db",
                memory_enabled=condition == "memory",
                template=settings.template,
                retrieval=RetrievalSettings(threshold=settings.threshold, key_mask=settings.key_mask, lexical_fallback=False),
            )
            service = MemPromptService(serve, engine=engine, embedder=embedder)

            def ask(
                task: dict[str, Any], condition: Condition = condition, service: MemPromptService = service
            ) -> dict[str, Any]:
                query = task["query"]
                if condition == "oracle":
                    hit = MemoryHit(MemoryEntry(0, query, task["clarification"]), 1.0, "embedding")
                    query = render(settings.template, query, [hit], engine.special_tokens)
                request = ChatRequest(
                    model=service.settings.name,
                    messages=prefix + [{"role": "user", "content": query}],
                    temperature=0,
                    max_tokens=settings.max_tokens,
                    user="simulated-user",
                )
                return service.chat(request)

            rows, correct, start = [], 0, time.perf_counter()
            # with memory each query waits for the clarifications before it; without, no query depends on
            # another, so they are asked concurrently and the engine's micro-batcher runs them as batches
            concurrent = condition != "memory"
            asked = (
                _asked_together(ask, stream, _answered(say, f"{condition}: {{}}/{len(stream)} answered")) if concurrent else None
            )
            for i, task in enumerate(stream):
                reply = asked[i] if asked is not None else ask(task)
                text = reply["choices"][0]["message"]["content"]
                named = named_relation(text)
                ok = named == task["type"]
                correct += ok
                clarified = False
                if not ok and condition == "memory" and rng.random() < settings.clarify_prob:
                    service.feedback(
                        FeedbackRequest(conversation_id=reply["id"], clarification=task["clarification"], user="simulated-user")
                    )
                    clarified = True
                rows.append(
                    {
                        **task,
                        "reply": text,
                        "named": named,
                        "correct": ok,
                        "answer_match": task["word2"].lower() in text.lower(),
                        "clarified": clarified,
                        "memory": reply["memory"],
                    }
                )
                if not concurrent and ((i + 1) % 25 == 0 or i + 1 == len(stream)):
                    say(f"{condition}: {i + 1}/{len(stream)} accuracy so far {correct / (i + 1):.3f}")
            if concurrent:
                say(f"{condition}: accuracy {correct / max(len(stream), 1):.3f}")
            timings[condition] = time.perf_counter() - start
            results[condition] = rows
            service.store.close()
    summary = summarize(results, settings, timings)
    report = {"summary": summary, "settings": settings.model_dump(), "results": results}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_text(json.dumps(report, indent=1))
        tmp_out.replace(out)
    return report


def _answered(say: Callable[[str], None], template: str) -> Callable[[int], None]:
    """A progress callback: `template` with the number of replies in, said."""
    return lambda done: say(template.format(done))


def _asked_together(
    ask: Callable[[dict[str, Any]], dict[str, Any]],
    stream: list[dict[str, Any]],
    progress: Callable[[int], None] = lambda done: None,
) -> list[dict[str, Any]]:
    """The stream's queries asked by up to `CONCURRENT` threads at once, as concurrent users of
    `heedful serve` would; the replies in stream order. Greedy, so each is the reply it gets alone (up
    to float rounding in a padded batch). `progress(answered)` every 25 replies and at the end."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    replies: list[dict[str, Any] | None] = [None] * len(stream)
    with ThreadPoolExecutor(max_workers=min(len(stream), CONCURRENT) or 1, thread_name_prefix="stream-eval") as pool:
        pending = {pool.submit(ask, task): i for i, task in enumerate(stream)}
        try:
            for done, future in enumerate(as_completed(pending), 1):
                replies[pending[future]] = future.result()
                if done % 25 == 0 or done == len(stream):
                    progress(done)
        except BaseException:  # the first error (or ^C): the queries not yet started are dropped, it is raised
            for future in pending:
                future.cancel()
            raise
    return [r for r in replies if r is not None]


def summarize(
    results: dict[str, list[dict[str, Any]]], settings: StreamEvalSettings, timings: dict[str, float]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": settings.model,
        "queries": settings.n,
        "threshold": settings.threshold,
        "key_mask": settings.key_mask,
        "clarify_prob": settings.clarify_prob,
    }
    for condition, rows in results.items():
        n = len(rows)
        half = n // 2
        acc = sum(r["correct"] for r in rows) / max(n, 1)
        out[condition] = {
            "accuracy": round(acc, 4),
            "accuracy_first_half": round(sum(r["correct"] for r in rows[:half]) / max(half, 1), 4),
            "accuracy_second_half": round(sum(r["correct"] for r in rows[half:]) / max(n - half, 1), 4),
            "answer_match": round(sum(r["answer_match"] for r in rows) / max(n, 1), 4),
            "no_relation_named": round(sum(r["named"] is None for r in rows) / max(n, 1), 4),
            "by_type": {
                t: round(sum(r["correct"] for r in rows if r["type"] == t) / max(sum(r["type"] == t for r in rows), 1), 4)
                for t in RELATIONS
            },
            "memory_used": sum(bool(r["memory"]) for r in rows),
            "memory_used_correct_clarification": sum(
                bool(r["memory"]) and r["memory"][0]["clarification"] == r["clarification"] for r in rows
            ),
            "clarifications_given": sum(r["clarified"] for r in rows),
            "seconds": round(timings.get(condition, 0.0), 1),
            # asked concurrently (no query depends on another): `seconds` is then the batched time, not
            # comparable with the sequential memory condition's
            "concurrent": condition != "memory",
        }
    if "memory" in out and "no_memory" in out and out["no_memory"]["accuracy"] > 0:
        out["memory_over_no_memory"] = round(out["memory"]["accuracy"] / out["no_memory"]["accuracy"], 3)
    return out


def plot_stream(results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Cumulative accuracy along the stream, one line per condition (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for condition, rows in results.items():
        correct, curve = 0, []
        for i, row in enumerate(rows, 1):
            correct += row["correct"]
            curve.append(correct / i)
        ax.plot(range(1, len(curve) + 1), curve, label=condition.replace("_", " "))
    ax.set_xlabel("query in the stream")
    ax.set_ylabel("accuracy so far")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
