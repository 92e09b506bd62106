"""The closed loop (issue 14) on the `tiny` model against a real `heedful serve`: rounds that
pull served feedback, train from the deployed adapter, evaluate, gate and hot-deploy; a gate
that rejects; a hostile user who cannot move the deployed adapter; nothing lost or trained
twice across rounds.

A real uvicorn server on 127.0.0.1 (users file: alice, bob, root), a scripted user who talks to
it through the `openai` client and posts reactions and edits over HTTP. Stages run in-process
here; tests/test_loop_kill.py drives the same loop as a subprocess on a real Ray head.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from pipeline.errors import HeedfulError
from pipeline.loop import Loop, LoopFile, load_state, status_rows
from pipeline.loop_report import write_loop_report
from serving.store import MemoryStore
from stages.gate import value_of

from .serve_fixture import active_version, serve, tokens_for

TOKENS = tokens_for("alice", "bob", *(f"u{i}" for i in range(12)))  # u0..u11, canary: users on both sides
QUESTIONS = ["Name a fruit.", "Say hello.", "Count to three.", "Name a color.", "Give a greeting.", "Name an animal."]
HELD_OUT = ["Name a city.", "Say goodbye.", "Name a tree."]


def server(root: Path):
    """The loop tests' server: alice, bob, u0..u11 and root (admin); replies of 6 tokens at most."""
    return serve(root, TOKENS, max_tokens_default=6)


@pytest.fixture
def live(tiny_model_path, tmp_path):
    """A fresh server per test: each loop starts from an empty feedback log."""
    with server(tmp_path / "server") as srv:
        yield srv


def converse(
    live, user: str, questions: list[str], edits: int = 2, reaction=lambda i: "love" if i % 2 else "dislike"
) -> list[str]:
    """A scripted user: asks through the openai client, reacts to every reply, edits the first `edits`."""
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=TOKENS[user], max_retries=0)
    ids = []
    for i, question in enumerate(questions):
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6, temperature=1.0
        )
        body = {"completion_id": reply.id, "reaction": reaction(i)}
        if i < edits:
            body["edit"] = f"Here is a short, friendly answer to: {question}"
        r = httpx.post(live.url + "/v1/feedback", headers={"Authorization": f"Bearer {TOKENS[user]}"}, json=body, timeout=60)
        assert r.status_code == 200, r.text
        ids.append(reply.id)
    return ids


def loop_file(tmp_path: Path, live, name: str, rules: list[dict], evaluate_with: dict | None = None, **loop_extra) -> Path:
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "save_steps": 1, "lora": {"r": 4, "alpha": 8}}
    spec = {
        "run_name": name,
        "model": "tiny",
        "seed": 0,
        "loop": {
            "server": live.url,
            "token_file": str(live.token_file),
            "min_new_feedback": 4,
            "train": [
                {"method": "kto", "from": "reactions", "min_records": 4, "with": small},
                {"method": "dpo", "from": "preferences", "min_records": 2, "with": small},
            ],
            "evaluate": {
                "inputs": {"prompts": str(prompts)},
                "with": {
                    "sampling": {"max_new_tokens": 6, "temperature": 0.0},
                    "max_general": 3,
                    "resamples": 200,
                    **(evaluate_with or {}),
                },
            },
            "gate": {"rules": rules},
            **loop_extra,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def active(live) -> str:
    return active_version(live, TOKENS, "alice")


def pulled_ids(root: Path) -> list[str]:
    """Every record id a round's pull kept, over all rounds (with repeats, if any)."""
    from pipeline.records import load_rows

    ids = []
    for folder in sorted(root.glob("round-*/pull/*")):
        if folder.is_dir() and folder.name in ("reactions", "preferences", "verbal_feedback", "followups"):
            ids += [row["id"] for row in load_rows(folder)]
    return ids


def test_rounds_train_from_the_deployed_adapter_and_the_gate_decides(live, tmp_path):
    runs = tmp_path / "runs"
    first = converse(live, "alice", QUESTIONS)
    base_version = active(live)
    lenient = loop_file(tmp_path, live, "loop_a", [{"metric": "kl_to_base", "max": 1000.0}, {"metric": "unfinished", "max": 1.0}])
    done = Loop(LoopFile(lenient), runs, use_ray=False).run(rounds=None, min_new=4, every=None, log=lambda *_: None)
    assert len(done) == 1 and done[0]["deployed"] is True, done
    round1 = done[0]
    assert round1["counts"]["reactions"] == len(QUESTIONS) and round1["counts"]["preferences"] == 2
    assert round1["gate"]["passed"] is True and round1["current_version"] == base_version
    assert active(live) == round1["version_after"] != base_version  # hot-deployed, no restart
    reply = openai.OpenAI(base_url=live.url + "/v1", api_key=TOKENS["alice"], max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.model_extra["adapter_version"] == round1["version_after"]

    # round 2 on new feedback: trains from round 1's adapter; a strict gate rejects the candidate
    converse(live, "alice", [q + " Again." for q in QUESTIONS])
    strict = loop_file(
        tmp_path, live, "loop_a", [{"metric": "kl_to_base", "max": 0.0}, {"metric": "unfinished", "max_rise": 1.0}]
    )
    done = Loop(LoopFile(strict), runs, use_ray=False).run(rounds=None, min_new=4, every=None, log=lambda *_: None)
    assert len(done) == 1
    round2 = done[0]
    assert round2["round"] == 2 and round2["current_version"] == round1["version_after"]
    assert round2["gate"]["passed"] is False and "kl_to_base" in round2["gate"]["reasons"][0]
    assert round2["deployed"] is False and active(live) == round1["version_after"]  # never deployed
    assert Path(round2["candidate_adapter"], "adapter_config.json").is_file()  # kept for inspection
    # the deployed version is round 1's candidate, evaluated then with the same settings: not evaluated again
    order = json.loads((runs / "loop_a" / "round-002" / "pipeline.json").read_text())["order"]
    assert "eval_current" not in order and "eval_candidate" in order
    assert round2["reuse_current"]["summary"] == str(runs / "loop_a" / "round-001" / "eval_candidate" / "summary")
    earlier = json.loads((runs / "loop_a" / "round-001" / "eval_candidate" / "summary").read_text())
    unfinished = next(rule for rule in round2["gate"]["rules"] if rule["metric"] == "unfinished")
    assert unfinished["current"] == value_of(earlier, "candidate", "unfinished") is not None  # the gate read it
    pipeline = json.loads((runs / "loop_a" / "round-002" / "pipeline.json").read_text())
    assert round1["current_adapter"] is None
    trained_from = json.dumps(pipeline)
    served_adapter = next(
        v["adapter"]
        for v in httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {TOKENS['root']}"}).json()["data"][0][
            "versions"
        ]
        if v["id"] == round1["version_after"]
    )
    assert served_adapter in trained_from  # round 2's first train stage continued the deployed adapter

    # every record alice gave was pulled exactly once over the two rounds
    stored = {r["id"] for r in MemoryStore(live.memory).feedback() if r["kind"] in ("reaction", "preference")}
    ids = pulled_ids(runs / "loop_a")
    kept = [i for i in ids if i in stored]
    assert len(kept) == len(set(kept)) and set(kept) == stored
    assert all(any(i.startswith(c) for i in stored) for c in first)

    rows = status_rows(runs / "loop_a")
    assert [r["deployed"] for r in rows] == [True, False] and rows[1]["gate"].startswith("failed: kl_to_base")
    assert [r["current_eval"] for r in rows] == ["ran", "reused round-001"] and rows[0]["trained"] == "kto, dpo"
    # nothing new on the server: no round starts
    assert Loop(LoopFile(strict), runs, use_ray=False).run(rounds=None, min_new=4, every=None, log=lambda *_: None) == []
    assert len(load_state(runs / "loop_a")["rounds"]) == 2
    page = write_loop_report(runs / "loop_a").read_text()
    assert "failed: kl_to_base" in page and "<img" in page  # the table and the per-round gate plot
    assert (runs / "loop_a" / "round-002" / "report.html").is_file()


def test_one_hostile_user_cannot_move_the_deployed_adapter(live, tmp_path):
    """bob floods the server; the quarantine's per-user cap keeps fewer of his records than a
    train step needs, so no round trains and the deployed version stays. His records wait,
    unconsumed (the cursor does not advance past records nothing trained on)."""
    runs = tmp_path / "runs"
    before = active(live)
    converse(live, "bob", [f"Question {i}?" for i in range(12)], edits=0)  # love and dislike: only the cap stops him
    capped = loop_file(
        tmp_path,
        live,
        "loop_b",
        [{"metric": "kl_to_base", "max": 1000.0}],
        pull={"quarantine": {"max_per_user": 3}},
    )
    spec = LoopFile(capped)
    done = Loop(spec, runs, use_ray=False).run(rounds=None, min_new=4, every=None, log=lambda *_: None)
    assert len(done) == 1 and done[0]["outcome"].startswith("nothing to train")
    assert done[0]["counts"]["reactions"] <= 3 and done[0]["quarantined"] >= 9
    assert active(live) == before
    assert "cursor" not in done[0]  # the next round pulls the same records again


def test_a_canary_is_promoted_on_good_live_reactions_and_dropped_on_bad_ones(live, tmp_path):
    """The deploy stage serves a passed candidate to half the users (by hash), then decides on the
    reactions both versions get after the canary loaded: promoted when users like it as much,
    dropped when they dislike it."""
    runs = tmp_path / "runs"
    canary = {"share": 0.5, "min_reactions": 3, "timeout_s": 240, "poll_s": 0.5}

    def run_round_with_users(likes_candidate: bool, evaluate_with: dict | None = None) -> dict:
        before, stop = active(live), threading.Event()

        def users():
            i = 0
            while not stop.is_set():
                name = f"u{i % 12}"
                i += 1
                reply = openai.OpenAI(base_url=live.url + "/v1", api_key=TOKENS[name], max_retries=0).chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=3, temperature=1.0
                )
                on_candidate = reply.model_extra["adapter_version"] != before
                reaction = "love" if (likes_candidate or not on_candidate) else "dislike"
                httpx.post(
                    live.url + "/v1/feedback",
                    headers={"Authorization": f"Bearer {TOKENS[name]}"},
                    json={"completion_id": reply.id, "reaction": reaction},
                    timeout=60,
                )

        rules = [{"metric": "kl_to_base", "max": 1000.0}]
        path = loop_file(tmp_path, live, "loop_c", rules, evaluate_with=evaluate_with, canary=canary)
        thread = threading.Thread(target=users, daemon=True)
        thread.start()
        try:
            done = Loop(LoopFile(path), runs, use_ray=False).run(rounds=1, min_new=4, every=None, log=lambda *_: None)
        finally:
            stop.set()
            thread.join(timeout=60)
        return done[0]

    converse(live, "alice", QUESTIONS)
    base = active(live)
    promoted = run_round_with_users(likes_candidate=True)
    assert promoted["deployed"] is True and promoted["why"].startswith("canary promoted"), promoted["why"]
    assert active(live) == promoted["version_after"] != base
    converse(live, "alice", [q + " More." for q in QUESTIONS])
    dropped = run_round_with_users(likes_candidate=False, evaluate_with={"max_general": 2})
    # the deployed version is round 1's promoted candidate, but the evaluate settings changed: evaluated again
    assert dropped["reuse_current"] is None
    assert "eval_current" in json.loads((runs / "loop_c" / "round-002" / "pipeline.json").read_text())["order"]
    assert dropped["deployed"] is False and dropped["why"].startswith("canary dropped"), dropped["why"]
    assert active(live) == promoted["version_after"]  # the promoted version stays; the dropped one serves nobody


def offline_loop_file(folder: Path, name: str, evaluate: dict | None = None) -> LoopFile:
    """A loop file on `tiny` whose server is not there (port 9): for what a loop decides before it
    asks the server anything (its evaluation key, its lock)."""
    loop: dict = {"server": "http://127.0.0.1:9", "train": [{"method": "kto", "from": "reactions"}]}
    if evaluate is not None:
        loop["evaluate"] = evaluate
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run_name": name, "model": "tiny", "loop": loop}))
    return LoopFile(path)


def test_evaluation_key_ignores_settings_that_do_not_change_the_result(tmp_path, monkeypatch):
    from pipeline.loop import evaluation_key

    def key(with_: dict, inputs: dict | None = None) -> str:
        return evaluation_key(offline_loop_file(tmp_path, "k", {"with": with_, **({"inputs": inputs} if inputs else {})}))

    plain = key({"max_general": 3})
    assert key({"max_general": 3, "report_to": "tensorboard", "device": "cpu"}) == plain  # reuse survives tracking
    assert key({"max_general": 2}) != plain

    # the held-out inputs' content, a file under ~ or a dataset folder: edited, the key moves
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "held_out.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "needs").mkdir()
    (tmp_path / "needs" / "part-0.jsonl").write_text('{"prompt": "b", "need": "c"}\n')
    inputs = {"prompts": "~/held_out.jsonl", "needs": "needs"}
    before = key({"max_general": 3}, inputs)
    assert key({"max_general": 3}, inputs) == before
    (tmp_path / "held_out.jsonl").write_text('{"prompt": "a2"}\n')
    edited_file = key({"max_general": 3}, inputs)
    (tmp_path / "needs" / "part-0.jsonl").write_text('{"prompt": "b", "need": "c2"}\n')
    assert len({before, edited_file, key({"max_general": 3}, inputs)}) == 3


def test_a_second_process_on_the_same_loop_is_refused(tmp_path):
    """Two `heedful loop` processes on one loop folder would resume the same round into the same
    stage folders and overwrite each other's loop.json: the second is refused at once, naming the
    first; once the first is gone (even killed), the loop runs again."""
    import subprocess
    import sys

    spec = offline_loop_file(tmp_path, "locked")
    runs = tmp_path / "runs"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline.loop import loop_lock\n"
            "with loop_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)",
            str(runs.resolve() / "locked"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(HeedfulError, match=rf"another process \(pid {holder.pid}\) is running it"):
            Loop(spec, runs, use_ray=False).run(rounds=1, min_new=1, every=None, log=lambda *_: None)
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it, so this run gets past the lock (to the server, which is not there)
    with pytest.raises(HeedfulError, match="127.0.0.1:9") as found:
        Loop(spec, runs, use_ray=False).run(rounds=1, min_new=1, every=None, log=lambda *_: None)
    assert "another process" not in str(found.value)


def test_new_feedback_counts_records_not_the_users_behind_a_critique():
    """6 critiques from 6 users are 6 new records, not 12: `critiques` counts those users again,
    and kinds no step trains on (`other`) are no reason to start a round."""
    from pipeline.loop import new_records

    assert new_records({"verbal_feedback": 6, "critiques": 6}) == 6
    assert new_records({"reactions": 3, "other": 5, "human_reactions": 2}) == 5


def test_a_resumed_round_reuses_an_evaluation_only_under_its_current_settings(tmp_path):
    """Round 1 deployed v1 and evaluated it as its candidate; round 2 may read that evaluation as
    its deployed version's. Killed after deciding so, then resumed with other `evaluate:` settings,
    round 2 must evaluate v1 again: the old summary measured something else."""
    from pipeline.loop import save_state

    def loop_with(max_general: int) -> Loop:
        return Loop(
            offline_loop_file(tmp_path, "resumed", {"with": {"max_general": max_general}}), tmp_path / "runs", use_ray=False
        )

    first = loop_with(3)
    summary = first.root / "round-001" / "eval_candidate" / "summary"
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    from pipeline.loop import evaluation_key

    done = {"round": 1, "run": "round-001", "phase": "done", "deployed": True, "version_after": "v1"}
    done["evaluation_key"] = evaluation_key(first.loop)
    round2 = {"round": 2, "run": "round-002", "phase": "train", "current_version": "v1"}
    first.state["rounds"] = [done, round2]
    first.decide(round2, {})
    assert round2["reuse_current"] == {"summary": str(summary), "condition": "candidate"}
    save_state(first.root, first.state)

    resumed = loop_with(2)  # the user changed the held-out evaluation before rerunning
    entry = resumed.state["rounds"][-1]
    resumed.decide(entry, {})
    assert entry["reuse_current"] is None and entry["evaluation_key"] == evaluation_key(resumed.loop) != done["evaluation_key"]


def test_loop_status_shows_answers_withdrawn_in_argilla_only_when_a_round_had_some(tmp_path, monkeypatch):
    """`heedful loop status` in the terminal says what loop.html says: how many earlier records a
    round found withdrawn (a column only for loops where annotators withdrew answers)."""
    from pipeline.cli import console
    from pipeline.loop import STATE_FILE
    from pipeline.loop_cli import print_status

    monkeypatch.setattr(console, "width", 200)  # whole column names
    root = tmp_path / "loop_a"
    root.mkdir()
    rounds = [{"round": 1, "run": "round-001", "phase": "done", "counts": {"human_preferences": 5}}]
    (root / STATE_FILE).write_text(json.dumps({"rounds": rounds}))
    with console.capture() as quiet:
        print_status(root, tmp_path)
    assert "withdrawn" not in quiet.get()
    rounds.append(
        {
            "round": 2,
            "run": "round-002",
            "phase": "done",
            "counts": {"human_preferences": 3},
            "withdrawn": {"human_preferences": 2},
        }
    )
    (root / STATE_FILE).write_text(json.dumps({"rounds": rounds}))
    with console.capture() as table:
        print_status(root, tmp_path)
    rows = [[cell.strip() for cell in line.replace("┃", "│").split("│")] for line in table.get().splitlines()]
    header = next(row for row in rows if "withdrawn" in row)
    assert [row[header.index("withdrawn")] for row in rows if row[1:2] in (["1"], ["2"])] == ["-", "2"]
