"""The ConvSim protocol on the tiny model: turn order, stop rule, schema, provenance, caching."""

from __future__ import annotations

import json

import pytest

from feedback.simulator.needs import load_users
from feedback.simulator.protocol import best_threshold, clean_user_text, fact_coverage, is_clarifying_question, reaction_for
from pipeline.config import pipeline_from_dict
from pipeline.errors import DataError
from pipeline.records import load_rows, write_jsonl
from pipeline.runner import Runner
from pipeline.schema import rows_to_records

from .conftest import SHARED_DATA

NEEDS = [
    {"id": "n1", "prompt": "What is the capital of Peru?", "need": "the capital city of Peru"},
    {"id": "n2", "prompt": "How do I boil rice?", "need": "steps to cook white rice on a stove"},
    {"id": "n3", "prompt": "Tell me about Mars.", "need": "how long a day lasts on Mars"},
]
OUTPUTS = ("transcripts", "verbal_feedback", "followups", "reactions", "preferences")


def simulate_pipeline(needs, tmp_path, seed=3, **with_):
    cfg = {
        "max_rounds": 3,
        "simulator": {"model": "tiny"},
        "cache_path": str(tmp_path / "cache.sqlite"),
        "policy_sampling": {"max_new_tokens": 6, "temperature": 1.0},
        "user_sampling": {"max_new_tokens": 6, "temperature": 1.0},
        **with_,
    }
    return {
        "run_name": "sim",
        "model": "tiny",
        "seed": seed,
        "stages": [{"name": "users", "uses": "simulate", "inputs": {"conversations": str(needs)}, "with": cfg}],
    }


def run(tmp_path, needs_rows, force=False, seed=3, **with_):
    needs = tmp_path / "needs.jsonl"
    write_jsonl(needs_rows, needs)
    pipeline = pipeline_from_dict(simulate_pipeline(needs, tmp_path, seed, **with_), tmp_path)
    result = Runner(pipeline, tmp_path / "runs", use_ray=False, force={"users"} if force else set()).execute()
    assert result.ok, [r.error for r in result.records]
    stage = result.run_dir / "users"
    manifest = json.loads((stage / "manifest.json").read_text())
    return {name: load_rows(stage / name) for name in OUTPUTS}, manifest["metrics"]


def check_turn_order(utterances):
    assert utterances[0]["participant"] == "user" and utterances[0]["type"] == "question"
    for prev, cur in zip(utterances, utterances[1:]):
        assert prev["participant"] != cur["participant"]  # strict alternation
        if prev["type"] == "clarifying_question":
            assert cur["type"] == "answer"
        if prev["type"] == "response":
            assert cur["type"] == "feedback"
    for u in utterances:
        assert u["type"] in (
            ("question", "answer", "feedback") if u["participant"] == "user" else ("clarifying_question", "response")
        )


def test_never_satisfied_runs_max_rounds_and_pairs_each_revision(tmp_path, tiny_model_path):
    out, metrics = run(tmp_path, NEEDS, satisfied_threshold=1.0)
    assert metrics["conversations"] == 3 and metrics["satisfied_rate"] == 0
    for t in out["transcripts"]:
        check_turn_order(t["utterances"])
        assert t["rounds"] == 3 and not t["satisfied"]
        assert len(t["utterances"]) == 7  # question + 3 x (system turn + user reply)
        assert not any(u["satisfied"] for u in t["utterances"])
    # every response judged, every judgment a verbal feedback, a reaction and a follow-up
    assert len(out["verbal_feedback"]) == len(out["reactions"]) == len(out["followups"]) == 9
    assert all(v["judgment"] == "needs_work" for v in out["verbal_feedback"])
    assert all(r["reaction"] in ("neutral", "dislike") for r in out["reactions"])
    # revision k+1 beats reply k, unless the tiny model repeated itself
    distinct = sum(
        t["utterances"][i]["text"].strip() != t["utterances"][i + 2]["text"].strip()
        and t["utterances"][i + 2]["text"].strip() != ""
        for t in out["transcripts"]
        for i in (1, 3)
    )
    assert len(out["preferences"]) == distinct > 0
    for pair in out["preferences"]:
        assert pair["prompt"][-1]["role"] == "user" and all(m["content"] != pair["rationale"] for m in pair["prompt"])
    for kind in OUTPUTS[1:]:
        records = rows_to_records(kind, out[kind])  # schema holds
        for rec in records:
            prov = rec.provenance
            assert prov.source == "convsim" and prov.annotator == "convsim:hf:tiny" and prov.model == "tiny"
            extra = prov.extras()
            assert extra["seed"] == 3 and extra["prompt_version"] == "convsim-small/2" and extra["simulator_model"] == "hf:tiny"
    assert out["transcripts"][0]["provenance"]["source"] == "convsim"


def test_satisfied_user_stops_after_first_reply_with_thanks(tmp_path, tiny_model_path):
    out, metrics = run(tmp_path, NEEDS, satisfied_threshold=0.0)
    assert metrics["satisfied_rate"] == 1 and metrics["mean_rounds"] == 1 and metrics["pairs"] == 0
    for t in out["transcripts"]:
        check_turn_order(t["utterances"])
        assert [u["type"] for u in t["utterances"]] == ["question", "response", "feedback"]
        assert t["utterances"][-1]["text"].lower().startswith("thank") and t["utterances"][-1]["satisfied"]
    assert {r["reaction"] for r in out["reactions"]} == {"love"}
    assert {f["aspect"] for f in out["followups"]} == {"thanks"}
    assert out["preferences"] == []


def test_clarifying_question_is_answered_then_policy_answers(tmp_path, tiny_model_path):
    rows = [
        dict(NEEDS[2], response="Do you mean the planet or the chocolate bar?", sample_index=0),
        dict(NEEDS[0], response="Lima is the capital of Peru.", sample_index=0),
    ]
    out, _ = run(tmp_path, rows, satisfied_threshold=1.0, max_rounds=2)
    by_id = {t["id"]: t for t in out["transcripts"]}
    mars = by_id["n3:0"]["utterances"]
    check_turn_order(mars)
    assert [u["type"] for u in mars] == ["question", "clarifying_question", "answer", "response", "feedback"]
    assert mars[1]["text"].startswith("Do you mean")  # generate's first reply was used, not regenerated
    assert mars[2]["text"]  # the simulator answered
    peru = by_id["n1:0"]["utterances"]
    assert [u["type"] for u in peru] == ["question", "response", "feedback", "response", "feedback"]
    answer = [f for f in out["followups"] if f["aspect"] == "answer"]
    assert len(answer) == 1 and answer[0]["response"].startswith("Do you mean")
    # no pair for the conversation that spent its first round on a clarifying question
    assert all(p["id"].startswith("n1:0") for p in out["preferences"])


def test_rerun_is_served_from_the_cache(tmp_path, tiny_model_path):
    first, m1 = run(tmp_path, NEEDS, satisfied_threshold=1.0, max_rounds=2)
    assert m1["cache_misses"] > 0 and m1["cache_hits"] == 0 and m1["generated_tokens"] > 0
    again, m2 = run(tmp_path, NEEDS, force=True, satisfied_threshold=1.0, max_rounds=2, batch_size=1)
    assert m2["cache_misses"] == 0 and m2["cache_hits"] == m1["cache_misses"] and m2["generated_tokens"] == 0
    assert [t["utterances"] for t in again["transcripts"]] == [t["utterances"] for t in first["transcripts"]]
    # a third round only generates what the first two did not
    _, m3 = run(tmp_path, NEEDS, satisfied_threshold=1.0, max_rounds=3)
    assert 0 < m3["cache_misses"] < m1["cache_misses"]


def test_the_policy_on_ctranslate2_talks_as_on_hf(tmp_path, tiny_model_path, lora_adapter, monkeypatch):
    """`engine: ct2` writes the policy's replies (its adapter merged) on CTranslate2, a round's turns
    in one call whatever `batch_size` (HF's knob: a sampled call restarts CTranslate2's generator);
    greedy, every conversation is word for word the one `engine: hf` gives (the simulator is the same)."""
    from pipeline.ct2_engine import Ct2Generator

    needs = tmp_path / "needs.jsonl"
    write_jsonl(NEEDS, needs)
    greedy = {"max_new_tokens": 8, "temperature": 0.0}
    calls: dict[str, list[int]] = {}  # CTranslate2 calls' sizes by converted model (policy, simulator)
    generate_texts = Ct2Generator.generate_texts
    monkeypatch.setattr(
        Ct2Generator,
        "generate_texts",
        lambda self, prompts, *a, **k: (
            calls.setdefault(str(self.model_dir), []).append(len(prompts)) or generate_texts(self, prompts, *a, **k)
        ),
    )
    talks, logs = {}, {}
    for engine in ("hf", "ct2"):
        calls.clear()
        cfg = simulate_pipeline(needs, tmp_path, satisfied_threshold=1.0, max_rounds=2, cache=False, engine=engine, batch_size=1)
        cfg["stages"][0]["inputs"]["adapter"] = str(lora_adapter)
        cfg["stages"][0]["with"]["policy_sampling"] = greedy
        cfg["run_name"] = engine
        result = Runner(pipeline_from_dict(cfg, tmp_path), tmp_path / "runs", use_ray=False).execute()
        assert result.ok, [r.error for r in result.records]
        talks[engine] = [t["utterances"] for t in load_rows(result.run_dir / "users" / "transcripts")]
        logs[engine] = (result.run_dir / "users" / "stage.log").read_text()
    assert "(replies from HF generate)" in logs["hf"] and "(replies from CTranslate2)" in logs["ct2"]
    replies = [u["text"] for t in talks["hf"] for u in t if u["participant"] == "system"]
    assert len(replies) == 2 * len(NEEDS) and len(set(replies)) > 1  # the adapter's replies differ by prompt
    assert talks["ct2"] == talks["hf"]
    assert [len(NEEDS)] * 2 in calls.values()  # the policy: both rounds' turns, each round in one call


def test_relative_paths_in_with_are_read_beside_the_config(tmp_path, tiny_model_path, lora_adapter, monkeypatch):
    """configs/x.yaml run from another folder: the simulator's `adapter: ./adapter` and the call
    cache's `cache_path: calls.sqlite` are configs/adapter and configs/calls.sqlite, as the config's
    inputs and models are, not the working directory's: there a decoy of each name (an empty
    adapter folder, a folder where the cache file would be) would fail the stage."""
    import shutil

    from pipeline.artifacts import hash_path
    from pipeline.config import load_pipeline

    from .conftest import write_yaml

    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copytree(lora_adapter, configs / "adapter")
    write_jsonl(NEEDS[:1], configs / "needs.jsonl")
    here = tmp_path / "elsewhere"
    (here / "adapter").mkdir(parents=True)  # no adapter in it
    (here / "calls.sqlite").mkdir()  # a folder: no cache opens there
    cfg = simulate_pipeline("needs.jsonl", tmp_path, max_rounds=1, cache_path="calls.sqlite", engine="hf")
    cfg["stages"][0]["with"]["simulator"] = {"model": "tiny", "adapter": "./adapter", "engine": "hf"}
    write_yaml(configs / "x.yaml", cfg)
    monkeypatch.chdir(here)
    pipeline = load_pipeline("../configs/x.yaml")
    settings = pipeline.stage("users").config
    assert settings.simulator.adapter == str(configs / "adapter")
    assert settings.cache_path == str(configs / "calls.sqlite")  # a file the stage writes: beside the config too
    result = Runner(pipeline, tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    assert (configs / "calls.sqlite").is_file() and not any((here / "calls.sqlite").iterdir())
    log = (result.run_dir / "users" / "stage.log").read_text()
    assert f"+adapter:{hash_path(configs / 'adapter')[:16]}" in log  # the simulator wore the adapter beside the config


def test_a_small_simulation_does_not_start_the_engine_probe(tmp_path, tiny_model_path, monkeypatch):
    """The engine probe costs what thousands of HF tokens cost (22.8 s on SmolLM2, the quickstart's
    users stage wrote ~2,300): `engine: auto` on conversations too few to repay it takes the known
    answer, else HF, without measuring. A job large enough to repay it is measured, once."""
    from pipeline import engine_probe

    measured: list[tuple[str, bool, bool]] = []

    def measure(model, batch=True, lone=True):
        measured.append((model, batch, lone))
        return {"hf": 1.0, "ct2": 2.0}  # HF faster: the run itself stays on HF either way

    monkeypatch.setattr(engine_probe, "_measure", measure)
    monkeypatch.setattr(engine_probe, "default_cache_path", lambda: tmp_path / "engine_probe.json")
    monkeypatch.delenv(engine_probe.ENV, raising=False)
    # 3 conversations x 2 rounds x 6 tokens for the policy and as many for the users: far too few
    _, metrics = run(tmp_path, NEEDS, satisfied_threshold=1.0, max_rounds=2, cache=False)
    assert measured == [] and not (tmp_path / "engine_probe.json").exists() and metrics["generated_tokens"] > 0
    monkeypatch.setattr(engine_probe, "PROBE_PAYS_FROM", 3 * 2 * 6)  # now the policy's turns are worth a probe
    run(tmp_path, NEEDS, force=True, satisfied_threshold=1.0, max_rounds=2, cache=False)
    assert measured == [("tiny", True, False)]  # the batches only: lone requests are timed for a server


def test_batch_size_is_part_of_the_fingerprint(tmp_path, tiny_model_path):
    """HF generate seeds each batch (seed + b), so sampled turns depend on `batch_size`: a run with
    another one is not skipped as up to date under a manifest that names a config it did not run."""
    needs = tmp_path / "needs.jsonl"
    write_jsonl(NEEDS, needs)
    talks, statuses = [], []
    for with_ in ({}, {"batch_size": 1}, {"batch_size": 1, "device": "cpu"}):
        cfg = simulate_pipeline(needs, tmp_path, satisfied_threshold=1.0, max_rounds=1, cache=False, engine="hf", **with_)
        result = Runner(pipeline_from_dict(cfg, tmp_path), tmp_path / "runs", use_ray=False).execute()
        assert result.ok, [r.error for r in result.records]
        statuses.append(result.record("users").status)
        talks.append([t["utterances"] for t in load_rows(result.run_dir / "users" / "transcripts")])
        manifest = json.loads((result.run_dir / "users" / "manifest.json").read_text())
    assert statuses == ["done", "done", "skipped"]  # batch_size reruns; the device does not
    assert manifest["config"]["batch_size"] == 1
    assert talks[1] != talks[0]  # the same seed, other batches: other sampled turns


def test_a_conversation_of_clarifying_questions_counts_in_the_first_reply_rate(tmp_path, tiny_model_path):
    """One round, one clarifying question allowed: n1's first turn (given upstream) asks a question,
    which the user answers and no reply is ever judged; n2's is an answer, judged satisfied at
    threshold 0. The first-reply rate is 1 of 2, not n2's alone (1 of 1): a need the policy never
    answered was not satisfied by its first reply."""
    rows = [
        {**NEEDS[0], "response": "Which country do you mean?"},
        {**NEEDS[1], "response": "Rinse the rice, add water and simmer it for 15 minutes."},
    ]
    out, metrics = run(tmp_path, rows, max_rounds=1, max_clarifications=1, satisfied_threshold=0.0, cache=False)
    kinds = {t["id"]: [u["type"] for u in t["utterances"]] for t in out["transcripts"]}
    assert kinds == {"n1": ["question", "clarifying_question", "answer"], "n2": ["question", "response", "feedback"]}
    assert metrics["conversations"] == 2 and metrics["clarifying_questions"] == 1
    assert metrics["first_reply_satisfied_rate"] == 0.5 and metrics["satisfied_rate"] == 0.5


def test_seed_changes_the_conversation(tmp_path, tiny_model_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, _ = run(tmp_path / "a", NEEDS, satisfied_threshold=1.0, max_rounds=2, cache=False)
    b, _ = run(tmp_path / "b", NEEDS, seed=4, satisfied_threshold=1.0, max_rounds=2, cache=False)
    assert [t["utterances"] for t in a["transcripts"]] != [t["utterances"] for t in b["transcripts"]]


def test_clariq_rows_become_one_user_per_facet():
    path = SHARED_DATA / "clariq" / "train.tsv"
    if not path.is_file():
        pytest.skip("shared ClariQ data not present")
    users = load_users(path)
    rows = load_rows(path)
    assert len(users) == len({r["facet_id"] for r in rows if r["facet_desc"].strip()})
    first = users[0]
    assert first.request == rows[0]["initial_request"] and first.need == rows[0]["facet_desc"].strip()


def test_bad_needs_file_names_file_and_row(tmp_path):
    path = tmp_path / "needs.jsonl"
    write_jsonl([NEEDS[0], {"id": "x", "prompt": "hi"}], path)
    with pytest.raises(DataError, match=r"needs.jsonl row 2: field 'need' is missing"):
        load_users(path)


def test_persona_and_style_are_seeded_picks():
    from feedback.simulator.needs import _pick

    assert _pick(["a", "b", "c"], "u1", 0) == _pick(["a", "b", "c"], "u1", 0)
    picks = {_pick(["a", "b", "c"], f"u{i}", 0) for i in range(30)}
    assert picks == {"a", "b", "c"}


def test_helpers_by_hand():
    assert is_clarifying_question("Do you mean the planet or the chocolate bar?")
    assert is_clarifying_question("Which city? I can help with either.")
    assert not is_clarifying_question("Paris is the capital of France. Anything else?")
    assert not is_clarifying_question("Is there anything else I can help with?")
    assert not is_clarifying_question("")
    assert clean_user_text('"That is wrong. Paris is. Also this.\nUser: more"') == "That is wrong. Paris is."
    # scores 0.1 0.2 | 0.3 0.4 separate at 0.25
    assert best_threshold([0.1, 0.3, 0.2, 0.4], [False, True, False, True]) == (0.25, 1.0)
    threshold, acc = best_threshold([0.2, 0.3, 0.25], [True, False, True])
    assert acc == pytest.approx(2 / 3)
    assert (
        fact_coverage("It takes 19 days. Plants need CO2 and light!", ["9|nine", "co2|carbon dioxide", "light", "water"]) == 0.5
    )
    assert fact_coverage("anything", []) is None
    assert reaction_for(0.6, 0.5, 0.5) == "love"
    assert reaction_for(0.45, 0.5, 0.5) == "neutral"  # logit(0.45) = -0.2 > 0 - 0.5
    assert reaction_for(0.3, 0.5, 0.5) == "dislike"  # logit(0.3) = -0.85


@pytest.mark.parametrize(
    ("text", "fact", "covered"),
    [
        ("It boils at 100.2 degrees.", "100", False),  # a different number, not a mention of 100
        ("It boils at 1000 degrees.", "100", False),
        ("It was built in 2100.", "100", False),
        ("Roughly 0.100 of it.", "100", False),
        ("It boils at 100.", "100", True),  # sentence end
        ("It boils at 100, at sea level.", "100", True),  # clause end
        ("(100) degrees; 100% sure", "100", True),
        ("It costs 1,000 dollars.", "1000", True),  # thousands separators do not count
        ("It costs 1000 dollars.", "1,000", True),
        ("It costs 1,000 dollars.", "1", False),
        ("It costs 1,000 dollars.", "000", False),
        ("Pi is 3.14159.", "3.14", False),
        ("Pi is about 3.14.", "3.14", True),
        ("Counting 1, 2, 3 goes on.", "2", True),
        ("It is 1,5 times as much.", "5", False),  # digits joined by a comma are one number (1,5 may be a decimal)
        ("It freezes at 0 K (−273.15 °C).", "273.15", False),  # a negative number is another number
        ("Absolute zero is -273 degrees.", "273", False),
        ("Absolute zero is –273 degrees.", "273", False),  # an en dash as a minus
        ("Between 200-273 kelvin.", "273", True),  # a range's end is not negative
        ("PLANTS NEED Carbon Dioxide.", "carbon dioxide", True),  # words stay case-insensitive
        ("Plants need CO2, light.", "co2", True),
        ("Plants need CO2 and light.", "CO", False),
    ],
)
def test_fact_coverage_matches_numbers_as_whole_numbers(text, fact, covered):
    assert fact_coverage(text, [fact]) == (1.0 if covered else 0.0)
