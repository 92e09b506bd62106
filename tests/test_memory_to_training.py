"""Memory -> training rows: each entry's accepted answer becomes (request without the clarification,
accepted reply); entries with none are counted, not guessed; another user's private entry never
enters a row; and the bench's whole loop (serve with memory, export, convert, sft, evaluate) runs
on the tiny model."""

from __future__ import annotations

import json

import pytest

from feedback.memory_to_training import memory_training_rows, write_memory_training
from pipeline.errors import DataError
from pipeline.records import load_rows, save_rows, write_jsonl
from pipeline.schema import Preference, Provenance, Reaction, records_to_rows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You answer questions about words."}, {"role": "user", "content": text}]


def reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def entry(i: int, owner: str | None, conv: str | None, shared: bool = False) -> dict:
    return {
        "id": i,
        "key_query": f"What is akin to < w{i} > ?",
        "clarification": "when I ask 'What is akin to a word', I want a synonym.",
        "user": owner,
        "created": 1.0,
        "hits": 0,
        "model": "tiny",
        "adapter": None,
        "conversation_id": conv,
        "shared": shared,
    }


def pair(pid: str, prompt: str, chosen: str, rejected: str, annotator: str, **extra) -> Preference:
    return Preference(
        id=pid,
        prompt=msgs(prompt),
        chosen=reply(chosen),
        rejected=reply(rejected),
        provenance=Provenance(source="serving", annotator=annotator, record_id=pid, extra=json.dumps(extra)),
    )


def loved(rid: str, prompt: str, text: str, annotator: str, memory_ids: list[int], reaction: str = "love") -> Reaction:
    extra = {"memory_ids": memory_ids, "prompt_edited": bool(memory_ids), "feedback": "reaction"}
    return Reaction(
        id=rid,
        prompt=msgs(prompt),
        response=text,
        reaction=reaction,
        provenance=Provenance(source="serving", annotator=annotator, record_id=rid, extra=json.dumps(extra)),
    )


#: the reply mallory clarified in her own conversation (c5), the rejected side of learner's pair p5
MALLORYS_REPLY = "the synonym for fancy is elaborate, like the dress for my sister's wedding in Lyon"


@pytest.fixture
def export_dir(tmp_path):
    """An export folder as `heedful memory export` writes it: memory.jsonl, preferences/ and reactions/."""
    entries = [
        entry(1, "learner", "c1"),  # distilled: a later loved reply that used entry 1
        entry(2, "learner", "c2"),  # the user's edit of the clarified reply
        entry(3, "learner", "c3"),  # clarified, never answered right: nothing to learn yet
        entry(4, "mallory", "c4"),  # mallory's private entry
        entry(5, "mallory", "c5", shared=True),  # shared by an admin: anyone's adapter may learn it
        entry(6, "default", "c6"),  # a single-user server's memory (applies to every request)
        entry(7, "learner", None),  # added by hand (`heedful memory add`): no conversation
    ]
    prefs = [
        pair(
            "p1",
            "What is akin to < roomy > ?",
            "the synonym for roomy is spacious",
            "the antonym for roomy is cramped",
            "learner",
            rejected_conversation="c1",
        ),  # fmt: skip
        pair(
            "p1b",
            "What is akin to < roomy > ?",
            "the synonym for roomy is spacious",
            "the antonym ...",
            "learner",
            rejected_conversation="c1",
        ),  # fmt: skip  # same row again: kept once
        pair(
            "p2",
            "What rings like < blue > ?",
            "the homophone for blue is blew",
            "the antonym for blue is red",
            "learner",
            feedback="edit",
            completion_id="c2",
        ),  # fmt: skip
        pair("p4", "What is akin to < bin > ?", "the synonym for bin is box", "x", "mallory", rejected_conversation="c4"),
        pair(
            "p5",
            "What is akin to < fancy > ?",
            "the synonym for fancy is want",
            MALLORYS_REPLY,
            "learner",
            rejected_conversation="c5",
        ),
        pair("p5m", "What is akin to < glad > ?", "the synonym for glad is happy", "z", "mallory", rejected_conversation="c5"),
        pair("p6", "What is akin to < big > ?", "the synonym for big is large", "w", "default", rejected_conversation="c6"),
        pair("px", "Hi", "hello", "go away", "learner", rejected_conversation="c-unrelated"),  # not about any entry
    ]
    reactions = [
        loved("r1", "What is contrary to < hot > ?", "the antonym for hot is cold", "learner", []),  # an anchor
        loved("r1b", "What is contrary to < hot > ?", "the antonym for hot is cold", "learner", []),  # kept once
        loved("r2", "What is akin to < roomy > ?", "the synonym for roomy is spacious", "learner", [1]),  # used memory
        loved("r3", "What is far from < up > ?", "the synonym for up is high", "learner", [], reaction="dislike"),
        loved("r4", "What is contrary to < wet > ?", "the antonym for wet is dry", "mallory", []),  # mallory's
    ]
    write_jsonl(entries, tmp_path / "memory.jsonl")
    save_rows(records_to_rows(prefs), tmp_path / "preferences")
    save_rows(records_to_rows(reactions), tmp_path / "reactions")
    return tmp_path


def test_one_users_adapter_gets_only_their_own_entries_and_conversations(export_dir):
    result = memory_training_rows(export_dir, user="learner")
    rows = {r.id.split(":")[1]: r for r in result.rows}
    assert sorted(rows) == ["1", "2"]
    one = rows["1"]
    assert one.prompt == msgs("What is akin to < roomy > ?")  # the request as sent: no clarification in it
    assert one.chosen == reply("the synonym for roomy is spacious")  # what the user accepted
    assert one.rejected == reply("the antonym for roomy is cramped")  # what they had to clarify
    extra = one.provenance.extras()
    assert extra["memory_id"] == 1 and extra["clarification"].startswith("when I ask") and extra["pair"] == "p1"
    assert rows["2"].chosen == reply("the homophone for blue is blew")  # an edit is an accepted answer
    assert result.counts == {
        "entries": 7,
        "entries_used": 2,
        "skipped_other_users": 2,  # mallory's private entry 4, the single-user entry 6
        "skipped_no_accepted_answer": 2,  # entry 3 (model never got it right), entry 7 (no conversation)
        "answers_from_other_users": 1,  # mallory's conversation on the shared entry 5
        # mallory's shared entry 5: learner loved a reply that used it, but the pair's rejected reply
        # is the one mallory clarified, in her conversation
        "replies_from_other_users": 1,
        "duplicates": 1,
        "rows": 2,
        "anchors": 1,  # learner's loved reply that needed no memory (once); not the one that used memory
        "anchors_from_other_users": 1,
    }
    assert result.anchors[0].response == "the antonym for hot is cold"
    assert all("mallory" not in json.dumps(r.model_dump()) for r in result.rows)
    assert all(MALLORYS_REPLY not in json.dumps(r.model_dump()) for r in result.rows)
    c3po = json.dumps(result.c3po_rows())
    assert MALLORYS_REPLY not in c3po and "the synonym for fancy is want" not in c3po


def test_the_adapter_every_user_gets_learns_only_shared_and_single_user_memory(export_dir):
    result = memory_training_rows(export_dir)
    chosen = sorted(r.chosen[0]["content"] for r in result.rows)
    # shared entry 5 from anyone's conversation, the single-user server's entry 6; no private entry of anyone
    assert chosen == ["the synonym for big is large", "the synonym for fancy is want", "the synonym for glad is happy"]
    assert result.counts["skipped_other_users"] == 5 and result.counts["answers_from_other_users"] == 0
    assert sorted(a.response for a in result.anchors) == ["the antonym for hot is cold", "the antonym for wet is dry"]


def test_rows_are_read_by_sft_and_dpo(export_dir, tmp_path):
    import logging

    from stages.dpo import preference_dataset
    from trainers.sft import read_examples

    dest = tmp_path / "rows.jsonl"
    counts = write_memory_training(export_dir, dest, user="learner")
    assert counts["rows"] == 2 == len(load_rows(dest, kind="preferences"))
    examples = read_examples(dest, None, finished_only=True, other_scopes=True)
    assert [e["reply"] for e in examples] == ["the synonym for roomy is spacious", "the homophone for blue is blew"]
    assert len(preference_dataset(dest, logging.getLogger("t"))) == 2


def test_c3po_shape_puts_memory_rows_in_scope_and_memory_free_loved_replies_out_of_scope(export_dir, tmp_path):
    from trainers.sft import read_examples

    dest = tmp_path / "data.jsonl"
    write_memory_training(export_dir, dest, user="learner", shape="c3po_data")
    rows = load_rows(dest, kind="c3po_data")
    assert [(r["scope"], r["baseline"], r.get("revised")) for r in rows] == [
        ("in_scope", "the antonym for roomy is cramped", "the synonym for roomy is spacious"),
        ("in_scope", "the antonym for blue is red", "the homophone for blue is blew"),
        ("out_of_scope", "the antonym for hot is cold", None),
    ]
    assert rows[0]["feedback"].startswith("when I ask") and rows[0]["memory_id"] == 1
    examples = read_examples(None, dest, finished_only=True, other_scopes=True)  # the sft stage's `data` input
    assert [(e["scope"], e["reply"]) for e in examples][-1] == ("out_of_scope", "the antonym for hot is cold")
    assert len(examples) == 3


def test_an_export_without_pairs_teaches_nothing_and_bad_input_names_file_line_and_field(tmp_path):
    write_jsonl([entry(1, "learner", "c1")], tmp_path / "memory.jsonl")
    result = memory_training_rows(tmp_path, user="learner")
    assert result.rows == [] and result.counts["skipped_no_accepted_answer"] == 1

    with pytest.raises(DataError, match=r"nowhere/memory.jsonl: not found"):
        memory_training_rows(tmp_path / "nowhere")
    broken = entry(2, "learner", "c2")
    del broken["clarification"]
    write_jsonl([entry(1, "learner", "c1"), broken], tmp_path / "memory.jsonl")
    with pytest.raises(DataError, match=r"memory.jsonl:2: field 'clarification' is missing"):
        memory_training_rows(tmp_path)


def test_bench_loop_end_to_end_on_the_tiny_model(tmp_path, tiny_model_path):
    """4 queries: the random tiny model misses them all, so the scripted user clarifies, asks again,
    and writes the reply it wanted (an edit); the memory becomes rows, sft trains, all four conditions
    are measured on repeats and new queries, and the figure is drawn."""
    from bench.memprompt_adapter import AdapterBenchSettings, plot, run_experiment
    from pipeline.paths import resolve_data_ref
    from pipeline.stats import clean

    settings = AdapterBenchSettings(
        model="tiny",
        tasks=str(resolve_data_ref("data:memprompt/wordnet_stream.jsonl")),
        n_seen=4,
        n_new=4,
        max_tokens=4,
        edit=True,
        epochs=1,
        batch_size=2,
        max_length=512,
        lora_r=4,
    )
    report = clean(run_experiment(settings, tmp_path, say=lambda m: None))
    teach = report["teach"]
    assert teach["queries"] == 4 and teach["clarifications"] == 4 and teach["edits"] == 4 and teach["loves"] == 0
    assert report["export"]["preferences"] == 4  # the four edits
    rows = load_rows(tmp_path / "memory_training.jsonl", kind="c3po_data")  # the default shape
    conversion = report["training_rows"]
    assert conversion["rows"] == len(rows) == conversion["entries_used"] >= 1 and conversion["anchors"] == 0
    relation = {"syn": "synonym", "ant": "antonym", "hom": "homophone"}
    seen = {t["query"]: t for t in report["results"]["teach"]}
    for row in rows:
        asked = row["prompt"][-1]["content"]
        assert asked in seen and "clarification" not in asked  # the request as the user sent it
        task = seen[asked]
        assert row["scope"] == "in_scope" and row["baseline"] == task["reply"]  # the reply the user had to clarify
        assert row["revised"] == f"the {relation[task['type']]} for {task['word1']} is {task['word2']}"  # their edit
    assert report["train"]["metrics"]["examples"] == len(rows)
    for split in ("repeats", "new"):
        assert set(report[split]) == {"base", "base+memory", "adapter", "adapter+memory"}
        assert all(report[split][c]["lenient"]["n"] == 4 for c in report[split])
    assert report["repeats"]["base+memory"]["memory_used"] == 4  # every repeat finds its clarification
    assert report["goal"]["met"] is False  # the tiny model names no relation: nothing to keep
    figure = plot(report, tmp_path / "fig.png", compare=report)
    assert figure.read_bytes()[:4] == b"\x89PNG"
