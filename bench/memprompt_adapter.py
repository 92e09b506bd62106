"""MemPrompt's loop closed: what users taught the memory becomes the next adapter; is memory still needed?

Offline, end to end, through heedful's own parts:
1. teach: a stream of lexical-relation queries (MemPrompt's WordNet tasks, asked with the
   ambiguous phrasings and few-shot prefix of `serving.stream_eval`) goes through the serving
   path (`MemPromptService`, memory on, one authenticated user). A scripted user checks the
   relation the reply names and loves every right reply; on a miss it sends the right
   clarification (as stream_eval's user does), then asks again: a reply that now names the
   right relation is the accepted answer, as is any later right reply that used a
   clarification. With `--edit`, a miss the clarification did not fix gets the user's own
   text (an edit).
2. export the memory file (`serving.export.export_memory`, quarantine included) and turn it into
   training rows (`feedback.memory_to_training`: request without the clarification -> accepted
   answer; with `--shape c3po_data`, the default, plus the loved replies that needed no memory
   as out-of-scope anchors).
3. train a LoRA adapter on them with the `sft` stage (a generated one-stage pipeline, in-process).
4. measure base, base+memory, adapter, adapter+memory on (a) the queries the memory saw
   (repeats, asked again verbatim) and (b) new words of the same relations and phrasings.
   lenient = the reply names the asked relation (MemPrompt's task check, stream_eval's
   accuracy); exact = and it contains the reference word. Wilson 95% intervals, with n.

Goal (issue 14): the adapter alone keeps >= 90% of the memory-on accuracy on repeats, so the
memory can be cleared without losing what users taught.

    nice -n 10 python bench/memprompt_adapter.py [--n-seen 80] [--n-new 80] [--edit]
Writes bench/results/memprompt_adapter.json and docs/figures/memprompt_adapter.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# the bootstrap (repo root on sys.path, offline settings, the shared data folder): bench.common when
# imported as bench.memprompt_adapter (the tests), common when run as `python bench/memprompt_adapter.py`
if __package__:
    from bench.common import ROOT, SHARED_DATA
else:
    from common import ROOT, SHARED_DATA

TASKS = SHARED_DATA / "memprompt" / "wordnet_raw.jsonl"
RESULTS = ROOT / "bench" / "results" / "memprompt_adapter.json"
FIGURE = ROOT / "docs" / "figures" / "memprompt_adapter.png"
USER = "learner"
CONDITIONS = ("base", "base+memory", "adapter", "adapter+memory")


class AdapterBenchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = "smollm2-135m"
    tasks: str = str(TASKS)
    n_seen: int = Field(default=80, ge=1, description="queries streamed through memory (the repeats)")
    n_new: int = Field(default=80, ge=1, description="queries with words the stream never asked")
    seed: int = 0
    threshold: float = 0.9
    key_mask: str | None = "<[^>]*>"
    max_tokens: int = 12
    reask: bool = Field(default=True, description="after clarifying, the user asks again (the fixed reply is accepted)")
    edit: bool = Field(default=False, description="a miss the clarification did not fix gets the user's own reply")
    max_per_user_per_hour: int = Field(
        default=10_000, ge=1, description="quarantine rate cap: the scripted user sends a day's feedback in minutes"
    )
    shape: Literal["preferences", "c3po_data"] = Field(
        default="c3po_data", description="memory rows only, or with the memory-free loved replies as anchors"
    )
    epochs: float = 3.0
    learning_rate: float = 2e-4
    batch_size: int = 4
    max_length: int = 512
    lora_r: int = 16
    eval_batch: int = Field(default=16, ge=1, description="evaluation prompts generated together")


def split_tasks(settings: AdapterBenchSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(seen, new): one seeded stream (serving.stream_eval.make_stream); new = later rows whose word was never seen."""
    from serving.stream_eval import make_stream

    stream = make_stream(Path(settings.tasks), settings.n_seen + 3 * settings.n_new, settings.seed)
    seen = stream[: settings.n_seen]
    words = {t["word1"].lower() for t in seen}
    new = [t for t in stream[settings.n_seen :] if t["word1"].lower() not in words][: settings.n_new]
    return seen, new


def reference_reply(task: dict[str, Any]) -> str:
    from serving.stream_eval import RELATIONS

    return f"the {RELATIONS[task['type']]} for {task['word1']} is {task['word2']}"


def judge(task: dict[str, Any], reply: str) -> dict[str, Any]:
    """lenient: the first relation named is the asked one; exact: and the reference word is in the reply."""
    from serving.stream_eval import named_relation

    named = named_relation(reply)
    lenient = named == task["type"]
    word = re.search(rf"(?<!\w){re.escape(task['word2'].lower())}(?!\w)", reply.lower()) is not None
    return {"named": named, "lenient": lenient, "exact": lenient and word}


class Session:
    """One user's requests to a MemPromptService (in-process: the HTTP app's `chat` and `feedback`)."""

    def __init__(self, settings: AdapterBenchSettings, memory: Path, engine, embedder, log: bool = True, use_memory=True):
        from serving.identity import Principal, UserEntry, hash_token, write_users
        from serving.prompting import PAPER_TEMPLATE
        from serving.retrieval import RetrievalSettings
        from serving.service import MemPromptService, ServeSettings
        from serving.stream_eval import fewshot_messages

        users = memory.parent.parent / "users.yaml"  # beside the memory folder, which stays the memory's own
        if not users.exists():
            write_users(users, [UserEntry(USER, "user", hash_token("learner-token-0123456789"))])
        serve = ServeSettings(
            model=settings.model,
            memory=str(memory),
            memory_enabled=use_memory,
            log=log,
            template=PAPER_TEMPLATE,
            users_file=str(users),
            retrieval=RetrievalSettings(threshold=settings.threshold, key_mask=settings.key_mask, lexical_fallback=False),
        )
        self.service = MemPromptService(serve, engine=engine, embedder=embedder)
        self.principal = Principal(USER, "user", verified=True, auth="users_file")
        self.prefix = fewshot_messages(PAPER_TEMPLATE)
        self.settings = settings

    def request(self, query: str):
        from serving.schemas import ChatRequest

        return ChatRequest(
            model=self.service.settings.name,
            messages=self.prefix + [{"role": "user", "content": query}],
            temperature=0,
            max_tokens=self.settings.max_tokens,
        )

    def ask(self, query: str) -> dict[str, Any]:
        return self.service.chat(self.request(query), self.principal)

    def prepare(self, query: str) -> tuple[list[dict[str, str]], list]:
        """(the messages the model gets, the memory hits attached) without generating."""
        _, sent, hits = self.service.prepare(self.request(query), self.principal)
        return sent, hits

    def feedback(self, completion_id: str, **fields: str) -> None:
        from serving.schemas import FeedbackRequest

        self.service.feedback(FeedbackRequest(completion_id=completion_id, **fields), self.principal)

    def close(self) -> None:
        self.service.close()


def teach(settings: AdapterBenchSettings, seen, memory: Path, engine, embedder, say) -> dict[str, Any]:
    """Stream the seen queries through memory with the scripted user; the memory file is what it taught."""
    session = Session(settings, memory, engine, embedder)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for i, task in enumerate(seen):
            reply = session.ask(task["query"])
            text = reply["choices"][0]["message"]["content"]
            row = {**task, "reply": text, **judge(task, text), "memory": bool(reply["memory"]), "feedback": []}
            if row["lenient"]:  # accepted: with memory it heeded a clarification; without, it needed none
                session.feedback(reply["id"], reaction="love")
                row["feedback"].append("love")
            else:
                session.feedback(reply["id"], clarification=task["clarification"])
                row["feedback"].append("clarification")
                fixed = False
                if settings.reask:
                    again = session.ask(task["query"])
                    row["reask_reply"] = again["choices"][0]["message"]["content"]
                    fixed = judge(task, row["reask_reply"])["lenient"]
                    row["reask_correct"] = fixed
                    if fixed:
                        session.feedback(again["id"], reaction="love")
                        row["feedback"].append("love reask")
                if not fixed and settings.edit:
                    session.feedback(reply["id"], edit=reference_reply(task))
                    row["feedback"].append("edit")
            rows.append(row)
            if (i + 1) % 20 == 0 or i + 1 == len(seen):
                say(f"teach {i + 1}/{len(seen)}: accuracy so far {sum(r['lenient'] for r in rows) / len(rows):.3f}")
    finally:
        session.close()
    from pipeline.stats import rate

    return {
        "queries": len(rows),
        "accuracy_along_stream": rate(r["lenient"] for r in rows),
        "clarifications": sum("clarification" in r["feedback"] for r in rows),
        "reasks_fixed": sum(bool(r.get("reask_correct")) for r in rows),
        "loves": sum(any(f.startswith("love") for f in r["feedback"]) for r in rows),
        "edits": sum("edit" in r["feedback"] for r in rows),
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


def train(settings: AdapterBenchSettings, rows_file: Path, work: Path, say) -> dict[str, Any]:
    """The `sft` stage on the rows, as a one-stage heedful pipeline run in-process (no Ray)."""
    from pipeline.config import pipeline_from_dict
    from pipeline.runner import Runner

    pipeline = {
        "run_name": "memprompt-adapter",
        "model": settings.model,
        "seed": settings.seed,
        "stages": [
            {
                "name": "heed",
                "uses": "sft",
                "inputs": {"preferences" if settings.shape == "preferences" else "data": str(rows_file)},
                "with": {
                    "num_train_epochs": settings.epochs,
                    "learning_rate": settings.learning_rate,
                    "per_device_train_batch_size": settings.batch_size,
                    "max_length": settings.max_length,
                    "save_steps": 1000,
                    "lora": {"r": settings.lora_r, "alpha": 2 * settings.lora_r, "dropout": 0.0},
                },
            }
        ],
    }
    (work / "pipeline.json").write_text(json.dumps(pipeline, indent=1))
    start = time.perf_counter()
    result = Runner(pipeline_from_dict(pipeline, work), work / "runs", use_ray=False).execute()
    if not result.ok:
        raise RuntimeError(f"training failed: {[r.error for r in result.records]}")
    seconds = time.perf_counter() - start
    say(f"trained in {seconds:.0f}s")
    metrics = result.record("heed").metrics
    return {"adapter": str(result.run_dir / "heed" / "adapter"), "seconds": round(seconds, 1), "metrics": metrics}


def answer_all(settings, tasks, memory: Path, engine, embedder, use_memory: bool) -> list[dict[str, Any]]:
    """Every task through the served prompt path (retrieval and prompt editing, `MemPromptService.prepare`,
    on a copy of the memory, read-only), then generated greedily in batches on the served engine's model
    (`pipeline.generation.chat_generate`), from one thread."""
    from pipeline.generation import SamplingSettings, chat_generate

    with_copy = memory.with_name(f"eval-{time.monotonic_ns()}.db")
    shutil.copy(memory, with_copy)
    session = Session(settings, with_copy, engine, embedder, log=False, use_memory=use_memory)
    try:
        prepared = [session.prepare(t["query"]) for t in tasks]
    finally:
        session.close()
    sampling = SamplingSettings(max_new_tokens=settings.max_tokens, temperature=0)
    replies = chat_generate(
        engine.model, engine.tokenizer, [sent for sent, _ in prepared], sampling, batch_size=settings.eval_batch
    )
    out = []
    for task, (_, hits), (reply,) in zip(tasks, prepared, replies):
        out.append({**task, "reply": reply.text, **judge(task, reply.text), "memory": bool(hits)})
    return out


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from pipeline.stats import rate
    from serving.stream_eval import RELATIONS

    return {
        "lenient": rate(r["lenient"] for r in rows),
        "exact": rate(r["exact"] for r in rows),
        "by_type": {t: rate(r["lenient"] for r in rows if r["type"] == t) for t in RELATIONS},
        "memory_used": sum(r["memory"] for r in rows),
    }


def goal(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Adapter alone vs. base with memory on the repeats: the ratio, and the paired difference of the
    lenient rates with Newcombe's interval (a bootstrap of 0/1 differences reads 0 [0, 0] when the
    two agree on every repeat)."""
    from pipeline.stats import paired_difference

    memory_on, alone = results["repeats"]["base+memory"], results["repeats"].get("adapter")
    if alone is None:
        return {"met": False, "why": "no adapter: the memory gave no training rows"}
    on, off = sum(r["lenient"] for r in memory_on), sum(r["lenient"] for r in alone)
    ratio = off / on if on else float("nan")
    return {
        "adapter_over_memory_on": round(ratio, 4),
        "target": 0.9,
        "met": bool(on and ratio >= 0.9),
        "paired_difference": paired_difference(
            {str(i): bool(b["lenient"]) for i, b in enumerate(alone)},
            {str(i): bool(a["lenient"]) for i, a in enumerate(memory_on)},
        ),
    }


def plot(report: dict[str, Any], path: Path, compare: dict[str, Any] | None = None) -> Path:
    """Two panels (lenient, exact): repeats and new queries, the four conditions, Wilson 95% bars;
    `compare` (a report of the other `shape`) adds its adapter alone as a fifth bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_only = "memory rows only"
    shape = {"preferences": rows_only, "c3po_data": "memory rows + anchors"}
    label = {"base": "base", "base+memory": "base + memory", "adapter": f"adapter ({shape[report['settings']['shape']]})"}
    label["adapter+memory"] = label["adapter"].replace(")", ") + memory")
    bars: dict[str, dict[str, Any]] = {
        label[c]: {s: report[s][c] for s in ("repeats", "new")} for c in CONDITIONS if c in report["repeats"]
    }
    if compare is not None and "adapter" in compare["repeats"]:
        bars[f"adapter ({shape[compare['settings']['shape']]})"] = {s: compare[s]["adapter"] for s in ("repeats", "new")}
    palette = ["#9e9e9e", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    splits = ("repeats", "new")
    width = 0.8 / len(bars)
    for ax, metric in zip(axes, ("lenient", "exact")):
        for j, (name, by_split) in enumerate(bars.items()):
            est = [by_split[s][metric] for s in splits]
            xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(splits))]
            err = [[max(0.0, e["value"] - e["lo"]) for e in est], [max(0.0, e["hi"] - e["value"]) for e in est]]
            ax.bar(xs, [e["value"] for e in est], width, yerr=err, capsize=2, color=palette[j % len(palette)], label=name)
        n = {s: report[s]["base"][metric]["n"] for s in splits}
        ax.set_xticks(range(len(splits)), [f"{s} (n={n[s]})" for s in splits])
        ax.set_ylim(0, 1.05)
        ax.set_title({"lenient": "names the asked relation", "exact": "relation and reference word"}[metric], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if metric == "lenient":
            target = 0.9 * report["repeats"]["base+memory"]["lenient"]["value"]
            ax.axhline(target, xmin=0.02, xmax=0.48, color="black", linestyle=":", linewidth=1)
            ax.text(-0.42, target + 0.02, "goal: 90% of base + memory", fontsize=7)
            ax.set_ylabel("accuracy")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Clarifications from memory trained into a LoRA adapter ({report['settings']['model']}, CPU)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _phase(record: Path, resume: bool, run) -> dict[str, Any]:
    """A phase's result, kept in `record`; with `resume`, a recorded one is read back instead of rerun."""
    if resume and record.is_file():
        return json.loads(record.read_text())
    result = run()
    record.write_text(json.dumps(result))
    return result


def run_experiment(settings: AdapterBenchSettings, work: Path, say=print, resume: bool = False) -> dict[str, Any]:
    """The whole loop in `work`; `resume`: keep the taught memory and the trained adapter recorded there
    (teach.json, train.json) by an earlier run with the same settings, and redo the rest."""
    from feedback.memory_to_training import write_memory_training
    from feedback.quarantine import QuarantineSettings
    from serving.embedder import MiniLMEmbedder
    from serving.engine import ChatEngine
    from serving.export import export_memory

    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    seen, new = split_tasks(settings)
    say(f"{len(seen)} seen queries, {len(new)} new ones")
    embedder = MiniLMEmbedder()
    base = ChatEngine(settings.model)
    memory = work / "memory" / "memory.db"
    taught = _phase(work / "teach.json", resume, lambda: teach(settings, seen, memory, base, embedder, say))
    exported = export_memory(memory, work / "export", QuarantineSettings(max_per_user_per_hour=settings.max_per_user_per_hour))
    rows_file = work / "memory_training.jsonl"
    conversion = write_memory_training(work / "export", rows_file, user=USER, shape=settings.shape)
    say(f"export {exported}; training rows {conversion}")
    trained = _phase(work / "train.json", resume, lambda: train(settings, rows_file, work, say)) if conversion["rows"] else None
    engines = {"base": base}
    if trained is not None:
        engines["adapter"] = ChatEngine(settings.model, trained["adapter"])
    results: dict[str, dict[str, list[dict[str, Any]]]] = {"repeats": {}, "new": {}}
    timings: dict[str, float] = {}
    for name, engine in engines.items():
        for use_memory in (False, True):
            cond = name + ("+memory" if use_memory else "")
            for split, tasks in (("repeats", seen), ("new", new)):
                start = time.perf_counter()
                results[split][cond] = answer_all(settings, tasks, memory, engine, embedder, use_memory)
                timings[f"{split}/{cond}"] = round(time.perf_counter() - start, 1)
                say(f"{split} {cond}: lenient {sum(r['lenient'] for r in results[split][cond]) / len(tasks):.3f}")
    for engine in engines.values():
        engine.close()
    summary = {split: {c: summarize_rows(rows) for c, rows in by.items()} for split, by in results.items()}
    return {
        "settings": settings.model_dump(),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "teach": {k: v for k, v in taught.items() if k != "rows"},
        "export": exported,
        "training_rows": conversion,
        "train": trained,
        **summary,
        "goal": goal(results),
        "eval_seconds": timings,
        "results": {"teach": taught["rows"], **results},
    }


def dump_report(report: dict[str, Any]) -> str:
    """JSON with the figures indented and the per-query rows one per line (readable, and a third of the size)."""

    def rows(value: Any, pad: str) -> str:
        if isinstance(value, dict):
            inner = ",\n".join(f"{pad} {json.dumps(k)}: {rows(v, pad + ' ')}" for k, v in value.items())
            return "{\n" + inner + f"\n{pad}}}"
        return "[\n" + ",\n".join(f"{pad} {json.dumps(row)}" for row in value) + f"\n{pad}]"

    head = json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1)
    return head[:-2] + ',\n "results": ' + rows(report["results"], " ") + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    fields = AdapterBenchSettings.model_fields
    for name in ("model", "tasks", "n_seen", "n_new", "seed", "epochs", "learning_rate", "batch_size", "lora_r"):
        default = fields[name].default
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--edit", action="store_true", help=fields["edit"].description)
    parser.add_argument("--shape", choices=["preferences", "c3po_data"], default="c3po_data", help=fields["shape"].description)
    parser.add_argument("--no-reask", action="store_true", help="the user only clarifies (no second ask)")
    parser.add_argument("--work", default=None, help="keep the memory, export, rows and run here (default: a temp folder)")
    parser.add_argument("--resume", action="store_true", help="with --work: reuse its taught memory and trained adapter")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--compare", default=None, help="a results JSON of the other --shape: its adapter joins the figure")
    parser.add_argument("--figure", default=str(FIGURE))
    args = parser.parse_args()
    settings = AdapterBenchSettings(
        **{k: getattr(args, k) for k in ("model", "tasks", "n_seen", "n_new", "seed", "epochs", "learning_rate")},
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        edit=args.edit,
        reask=not args.no_reask,
        shape=args.shape,
    )
    import tempfile

    from pipeline.stats import clean

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        report = clean(run_experiment(settings, work, lambda m: print(m, flush=True), resume=args.resume))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_report(report))
    if report["train"] is not None:
        plot(report, Path(args.figure), json.loads(Path(args.compare).read_text()) if args.compare else None)
    print(json.dumps({k: report[k] for k in ("teach", "training_rows", "goal")}, indent=1))
    for split in ("repeats", "new"):
        for cond, s in report[split].items():
            print(f"{split:8s} {cond:15s} lenient {s['lenient']['value']:.3f} exact {s['exact']['value']:.3f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
