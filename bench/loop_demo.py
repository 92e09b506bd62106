"""The closed loop as a simulated deployment: users talk to `heedful serve`, their feedback trains the next adapter.

Offline, end to end, through heedful's own parts (issue 14, "Demo and figures"):
1. `heedful serve` (uvicorn on 127.0.0.1, in this process) with a users file: one token per
   simulated user and one admin token in a 0600 file, as a real multi-user deployment has.
2. users phase: ConvSim users (feedback/simulator: one information need each, the `quickstart`
   needs) ask the server through the `openai` client; the server's replies are the policy of
   `run_conversations`, so the protocol is the simulate stage's unchanged: the judge (calibrated
   once) decides satisfied or not, an unsatisfied user says what is wrong and the server revises,
   the next turn carrying the `conversation_id` (a follow-up). Each judged reply gets the user's
   feedback on its completion id (`POST /v1/feedback`): reaction love if satisfied, else dislike;
   the user's words as a critique (judgment good / needs_work); and when a later revision
   satisfied the user, that revision as an edit of the reply they disliked (a preference).
3. one loop round (`pipeline.loop.Loop`, in this process, `configs/loop_demo.yaml`): pull,
   train (KTO / DPO / CUT from the deployed adapter), evaluate current vs candidate on held-out
   needs, gate, export, hot-deploy when the gate passed.
Phases 2 and 3 alternate for `--rounds`, and a last users phase measures the version the last
round left deployed. Recorded per users phase and per adapter version: satisfied users and love
rate (Wilson 95% intervals, with n); per round: the gate's decision and why, the version
deployed, wall time per phase.

The simulated users' LLM is SmolLM2-135M itself (pipeline/llm.py, kind hf): no larger model is
available offline. It is a weak judge (docs/simulator.md measures it); point `--simulator-base-url`
and `--simulator-model` at an OpenAI-compatible endpoint for a stronger one.

    nice -n 10 python bench/loop_demo.py [--rounds 3] [--users 12] [--max-rounds 2]
Writes bench/results/loop_demo.json and docs/figures/loop_demo_rounds.svg, loop_demo_versions.svg
(bench/loop_demo_figures.py; `--replot RESULTS` redraws them alone).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# the bootstrap (repo root on sys.path, offline settings): bench.common when imported as
# bench.loop_demo (the tests), common when run as `python bench/loop_demo.py` (bench/ on sys.path)
if __package__:
    from bench.common import ROOT, save_results
else:
    from common import ROOT, save_results

from pipeline.llm import LLMSettings  # noqa: E402 - after the offline settings above

LOOP_FILE = ROOT / "configs" / "loop_demo.yaml"
RESULTS = ROOT / "bench" / "results" / "loop_demo.json"
FIGURES = ROOT / "docs" / "figures"
ADMIN = "operator"
#: which loop phase a stage belongs to, by its name in the round's pipeline (pipeline/loop.py)
PHASE_OF = {"pull": "pull", "eval_current": "evaluate", "eval_candidate": "evaluate", "gate": "evaluate"}
PHASE_OF.update({"export": "deploy", "deploy": "deploy"})


class DemoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    loop_file: str = Field(default=str(LOOP_FILE), description="the loop file (its server/token_file are replaced)")
    model: str | None = Field(default=None, description="the served and trained model (default: the loop file's)")
    rounds: int = Field(default=3, ge=1, description="loop rounds")
    users: int = Field(default=12, ge=1, description="simulated users, one information need each")
    needs: str = Field(default="data:quickstart/needs.jsonl", description="the users' information needs")
    max_rounds: int = Field(default=2, ge=1, description="server replies per conversation at most")
    max_tokens: int = Field(default=48, ge=1, description="max_tokens of each chat completion")
    temperature: float = Field(default=0.7, ge=0, description="the server's sampling temperature for users")
    user_tokens: int = Field(default=32, ge=1, description="tokens of a simulated user's critique")
    simulator: LLMSettings = Field(
        default_factory=lambda: LLMSettings(kind="hf", model=None),
        description="the users' LLM (model default: the served model)",
    )
    final_users: bool = Field(default=True, description="a last users phase after the last round (measures its version)")
    seed: int = 0
    loop_overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the loop file (tests: tiny budgets)")


# ----------------------------------------------------------------------------- the deployment


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` deep-merged into a copy of `base` (lists replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def write_loop_file(settings: DemoSettings, work: Path, url: str, token_file: Path) -> Path:
    """The loop file as this deployment runs it: its server, its admin token, the overrides."""
    import yaml

    data = yaml.safe_load(Path(settings.loop_file).read_text(encoding="utf-8"))
    data = merge(data, settings.loop_overrides)
    if settings.model:
        data["model"] = settings.model
    data["loop"].update(server=url, token_file=str(token_file))
    path = work / "loop_demo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def write_credentials(work: Path, names: list[str]) -> tuple[Path, Path, dict[str, str]]:
    """A users file (hashed tokens) for `names` + an admin, and the admin token in a 0600 file."""
    from serving.identity import UserEntry, hash_token, new_token, write_users

    tokens = {name: new_token() for name in [*names, ADMIN]}
    users_file = work / "users.yaml"
    write_users(users_file, [UserEntry(n, "admin" if n == ADMIN else "user", hash_token(t)) for n, t in tokens.items()])
    token_file = work / "admin.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(tokens[ADMIN])
    return users_file, token_file, tokens


def key(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, sort_keys=True)


class ServedPolicy:
    """The policy as the users meet it: the server, through the `openai` client, each user with their token.

    Remembers every completion (id, conversation, version) by the conversation it ends, so a
    transcript's replies can be given feedback by completion id, and a user's next turn continues
    the server-side conversation (`conversation_id`), which the server keeps as a follow-up.
    """

    identity = "heedful-serve"

    def __init__(self, url: str, model: str, owner: dict[str, str], tokens: dict[str, str], seed: int):
        import openai

        self.model, self.owner, self.seed = model, owner, seed
        self.clients = {u: openai.OpenAI(base_url=url + "/v1", api_key=t, max_retries=0, timeout=1800) for u, t in tokens.items()}
        self.served: dict[str, dict[str, Any]] = {}

    def generate(self, conversations: list[list[dict[str, str]]], sampling, seed: int = 0) -> list:
        from pipeline.generation import Completion
        from pipeline.llm import openai_sampling

        def one(args: tuple[int, Any]) -> Completion:
            i, messages = args  # chat messages as pipeline/chat.py passes them (role, content)
            user = self.owner[messages[0]["content"]]
            previous = self.served.get(key(messages[:-1]))
            extra = {"conversation_id": previous["conversation_id"]} if previous else None
            reply = self.clients[user].chat.completions.create(
                model=self.model, messages=messages, seed=self.seed + seed + i, extra_body=extra, **openai_sampling(sampling)
            )
            text = (reply.choices[0].message.content or "").strip()
            extras = reply.model_extra or {}
            self.served[key([*messages, {"role": "assistant", "content": text}])] = {
                "id": reply.id,
                "conversation_id": extras.get("conversation_id"),
                "version": extras.get("adapter_version"),
                "user": user,
                "followup": previous is not None,
            }
            tokens = reply.usage.completion_tokens if reply.usage else len(text.split())
            return Completion(text, int(tokens), reply.choices[0].finish_reason == "stop")

        with ThreadPoolExecutor(max_workers=max(1, len(conversations))) as pool:
            return list(pool.map(one, enumerate(conversations)))


def feedback_bodies(transcript, served: dict[str, dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(completion, feedback body) for every judged reply of one conversation."""
    from feedback.simulator.protocol import Transcript, policy_messages

    utterances = transcript.utterances
    out = []
    for k, utt in enumerate(utterances):
        if utt.participant != "system" or utt.type != "response" or utt.satisfied is None:
            continue
        messages = policy_messages(Transcript(transcript.user, utterances[:k]))
        completion = served[key([*messages, {"role": "assistant", "content": utt.text}])]
        body: dict[str, Any] = {"completion_id": completion["id"], "reaction": "love" if utt.satisfied else "dislike"}
        words = next((u for u in utterances[k + 1 :] if u.participant == "user" and u.type == "feedback"), None)
        if words is not None:
            body.update(critique=words.text, judgment="good" if utt.satisfied else "needs_work")
        later = next((u for u in utterances[k + 1 :] if u.type == "response" and u.satisfied), None)
        if not utt.satisfied and later is not None and later.text.strip():
            body["edit"] = later.text  # the revision the user was satisfied with, over the reply they disliked
        out.append((completion, body))
    return out


def users_phase(number: int, users, policy: ServedPolicy, simulator, judge, settings: DemoSettings, url: str, tokens) -> dict:
    """Every user has one conversation with the server and gives feedback on each judged reply."""
    import httpx

    from feedback.simulator.protocol import ProtocolSettings, run_conversations
    from pipeline.generation import SamplingSettings
    from pipeline.llm_cache import CachedLLM
    from pipeline.stats import rate, wilson

    started = time.perf_counter()
    protocol = ProtocolSettings(
        max_rounds=settings.max_rounds,
        policy_sampling=SamplingSettings(max_new_tokens=settings.max_tokens, temperature=settings.temperature),
        user_sampling=SamplingSettings(max_new_tokens=settings.user_tokens, temperature=0.7),
    )
    policy.served.clear()
    seed = settings.seed + 1000 * number
    transcripts = run_conversations(users, CachedLLM(policy, None), simulator, protocol, seed, judge)
    talked = time.perf_counter()
    posted = {"reactions": 0, "critiques": 0, "edits": 0}
    loves: list[bool] = []
    versions: dict[str | None, int] = {}
    with httpx.Client(timeout=120) as http:
        for t in transcripts:
            for completion, body in feedback_bodies(t, policy.served):
                r = http.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {tokens[completion['user']]}"}, json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"feedback refused ({r.status_code}): {r.text[:300]}")
                posted["reactions"] += 1
                posted["critiques"] += "critique" in body
                posted["edits"] += "edit" in body
                loves.append(body["reaction"] == "love")
    for completion in policy.served.values():
        versions[completion["version"]] = versions.get(completion["version"], 0) + 1
    first = [
        next((u.satisfied for u in t.utterances if u.type == "response" and u.satisfied is not None), None) for t in transcripts
    ]
    return {
        "phase": number,
        "versions": versions,
        "version": max(versions, key=lambda v: versions[v]) if versions else None,
        "users": len(transcripts),
        "satisfied": rate(t.satisfied for t in transcripts),
        "satisfied_users": sum(t.satisfied for t in transcripts),
        "first_reply_satisfied": rate(bool(f) for f in first if f is not None),
        "love_rate": wilson(sum(loves), len(loves)),
        "loves": sum(loves),
        "completions": len(policy.served),
        "followups": sum(c["followup"] for c in policy.served.values()),
        "posted": posted,
        "seconds": {"conversations": talked - started, "feedback": time.perf_counter() - talked},
        "per_user": [
            {
                "need": t.user.id,
                "request": t.user.request,
                "first_reply": next((u.text for u in t.utterances if u.type == "response"), ""),
                "first_reply_satisfied": f,
                "satisfied": t.satisfied,
                "replies": t.rounds,
            }
            for t, f in zip(transcripts, first)
        ],
    }


def paired(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """The same users in two phases: how many became satisfied, how many stopped being, and the
    exact two-sided sign-test p-value of that split (users who did not change carry no evidence)."""
    from math import comb

    before = {u["need"]: u["satisfied"] for u in first["per_user"]}
    gained = sum(u["satisfied"] and not before.get(u["need"], False) for u in later["per_user"])
    lost = sum(not u["satisfied"] and before.get(u["need"], False) for u in later["per_user"])
    n = gained + lost
    p = min(1.0, 2 * sum(comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n) if n else 1.0
    return {"vs_phase": first["phase"], "gained": gained, "lost": lost, "sign_test_p": p}


def loop_round(loop, stage_seconds: dict[str, float], say) -> dict[str, Any]:
    """One loop round; its entry from loop.json with the wall time of each phase."""
    from pipeline.errors import HeedfulError

    stage_seconds.clear()
    started = time.perf_counter()
    try:
        done = loop.run(rounds=1, min_new=loop.loop.spec.min_new_feedback, every=None, log=say)
    except HeedfulError as exc:
        return {"outcome": f"failed: {exc}", "failed": True, "seconds": {"total": time.perf_counter() - started}}
    total = time.perf_counter() - started
    if not done:
        return {"outcome": "no round: too little new feedback", "seconds": {"total": total}}
    entry = dict(done[0])
    phases: dict[str, float] = {}
    for name, seconds in stage_seconds.items():
        phase = "train" if name.startswith(("train_", "critique_", "c3po_data_")) else PHASE_OF.get(name, "other")
        phases[phase] = phases.get(phase, 0.0) + seconds
    phases["overhead"] = total - sum(phases.values())  # model loads outside stages, manifests, the server calls
    entry["seconds"] = {**phases, "total": total}
    entry["stages"] = dict(stage_seconds)
    return entry


def gate_view(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The gate's rules with both values, as the figure and the docs read them."""
    gate = entry.get("gate")
    if not gate:
        return None
    return {
        "passed": gate["passed"],
        "reasons": gate["reasons"],
        "rules": [
            {
                "metric": r["metric"],
                "passed": r["passed"],
                "why": r["why"],
                "candidate": r.get("candidate"),
                "current": r.get("current"),
            }
            for r in gate["rules"]
        ],
    }


def server_version_stats(url: str, token: str) -> list[dict[str, Any]] | None:
    import httpx

    r = httpx.get(url + "/v1/admin/versions/stats", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return r.json().get("data") if r.status_code == 200 else None


def by_version(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Users' outcomes pooled over the phases each version served (one version per phase: no canary)."""
    from pipeline.stats import wilson

    rows: dict[str, dict[str, Any]] = {}
    for p in phases:
        row = rows.setdefault(
            p["version"], {"version": p["version"], "phases": [], "sat": 0, "users": 0, "loves": 0, "reactions": 0}
        )
        row["phases"].append(p["phase"])
        row["sat"] += p["satisfied_users"]
        row["users"] += p["users"]
        row["loves"] += p["loves"]
        row["reactions"] += p["love_rate"]["n"]
    return [
        {
            "version": r["version"],
            "label": f"v{i}" + (" (base)" if i == 0 else ""),
            "phases": r["phases"],
            "satisfied": wilson(r["sat"], r["users"]),
            "love_rate": wilson(r["loves"], r["reactions"]),
        }
        for i, r in enumerate(rows.values())
    ]


def run_demo(settings: DemoSettings, work: Path, say=print) -> dict[str, Any]:
    """The whole demo in `work` (a fresh folder: the server's log, the loop's runs); returns the results."""
    import platform

    import torch
    import yaml

    from feedback.simulator.needs import load_users
    from feedback.simulator.protocol import Judge
    from pipeline.llm import build_client
    from pipeline.llm_cache import CachedLLM
    from pipeline.loop import Loop, LoopFile, status_rows
    from pipeline.paths import resolve_data_ref
    from serving.local import ServerThread
    from serving.service import ServeSettings

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: the demo starts a fresh deployment (give an empty --work)")
    model = settings.model or yaml.safe_load(Path(settings.loop_file).read_text(encoding="utf-8"))["model"]
    needs = resolve_data_ref(settings.needs) if settings.needs.startswith("data:") else Path(settings.needs)
    users = load_users(needs, seed=settings.seed, max_users=settings.users)
    for u in users:
        u.system_prompt = None  # users send their request as it is; the server adds nothing either
    names = [f"user-{i + 1:02d}" for i in range(len(users))]
    owner = {u.request: name for u, name in zip(users, names)}
    if len(owner) != len(users):
        raise SystemExit(f"{needs}: two users share a request; each user needs their own")
    users_file, token_file, tokens = write_credentials(work, names)

    sim_settings = settings.simulator if settings.simulator.model else settings.simulator.model_copy(update={"model": model})
    say(f"simulated users' LLM: {sim_settings.kind} {sim_settings.model}; calibrating the judge")
    simulator = CachedLLM(build_client(sim_settings, model, "cpu"), None)
    judge = Judge(simulator, "both").calibrate()
    say(f"judge calibrated: {100 * judge.accuracy:.0f}% on the calibration replies")
    setup_s = time.perf_counter() - t0

    serve = ServeSettings(
        model=model,
        memory=str(work / "server.db"),
        memory_enabled=False,
        users_file=str(users_file),
        max_tokens_default=settings.max_tokens,
        device="cpu",
    )
    phases: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    with ServerThread(serve) as server:
        loop_path = write_loop_file(settings, work, server.url, token_file)
        stage_seconds: dict[str, float] = {}

        def on_event(kind: str, record, text: str) -> None:
            if kind == "done" and record is not None:
                stage_seconds[record.name] = stage_seconds.get(record.name, 0.0) + record.seconds

        loop = Loop(LoopFile(loop_path), work / "runs", use_ray=False, on_event=on_event)
        policy = ServedPolicy(server.url, serve.name, owner, {n: tokens[n] for n in names}, settings.seed)
        for number in range(1, settings.rounds + 1 + settings.final_users):
            say(f"users phase {number}: {len(users)} users talk to {server.url}")
            phase = users_phase(number, users, policy, simulator, judge, settings, server.url, tokens)
            phase["paired_vs_first"] = paired(phases[0], phase) if phases else None
            phases.append(phase)
            say(
                f"  served {phase['version']}: satisfied {phase['satisfied']['value']:.2f} (n={phase['users']}), "
                f"love rate {phase['love_rate']['value']:.2f} (n={phase['love_rate']['n']}), {phase['posted']} "
                f"({sum(phase['seconds'].values()):.0f} s)"
            )
            if number > settings.rounds:
                break
            say(f"loop round {number}")
            entry = loop_round(loop, stage_seconds, lambda m: say("  " + str(m)))
            rounds.append(
                {
                    "round": number,
                    "after_users_phase": number,
                    "outcome": entry.get("outcome"),
                    "failed": entry.get("failed", False),
                    "counts": entry.get("counts"),
                    "quarantined": entry.get("quarantined"),
                    "version_before": entry.get("current_version"),
                    "gate": gate_view(entry),
                    "deployed": entry.get("deployed"),
                    "version_after": entry.get("version_after"),
                    "seconds": entry.get("seconds"),
                    "stages": entry.get("stages"),
                }
            )
            say(f"  {entry.get('outcome')} ({entry['seconds']['total']:.0f} s)")
            if entry.get("failed"):
                break
        live_stats = server_version_stats(server.url, tokens[ADMIN])
    wall = time.perf_counter() - t0
    loop_seconds = sum(r["seconds"]["total"] for r in rounds if r.get("seconds"))
    users_seconds = sum(sum(p["seconds"].values()) for p in phases)
    return {
        "model": model,
        "simulator": f"{sim_settings.kind}:{sim_settings.model}",
        "settings": settings.model_dump(mode="json"),
        "loop_file": yaml.safe_load(loop_path.read_text(encoding="utf-8")),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_start": os.getloadavg()[0],
        },
        "judge_accuracy": judge.accuracy,
        "users_phases": phases,
        "rounds": rounds,
        "versions": by_version(phases),
        "server_version_stats": live_stats,
        "loop_status": status_rows(loop.root),
        "seconds": {"setup": setup_s, "users": users_seconds, "loop": loop_seconds, "total": wall},
        "load_average_at_end": os.getloadavg()[0],
        "work": str(work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    fields = DemoSettings.model_fields
    for name in ("rounds", "users", "max_rounds", "max_tokens", "temperature", "user_tokens", "seed"):
        default = fields[name].default
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=fields[name].description)
    parser.add_argument("--loop-file", default=fields["loop_file"].default)
    parser.add_argument("--model", default=None, help=fields["model"].description)
    parser.add_argument("--needs", default=fields["needs"].default)
    parser.add_argument("--no-final-users", action="store_true", help="skip the users phase after the last round")
    parser.add_argument("--simulator-model", default=None, help="the users' LLM (default: the served model)")
    parser.add_argument("--simulator-base-url", default=None, help="an OpenAI-compatible endpoint for the users' LLM")
    parser.add_argument("--simulator-key-file", default=None, help="its API key, in a 0600 file")
    parser.add_argument(
        "--work", default=None, help="an empty folder for the server's log and the loop's runs (default: a temp folder)"
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--figures", default=str(FIGURES))
    parser.add_argument("--replot", default=None, help="only redraw the figures from this results JSON")
    args = parser.parse_args()
    from bench.loop_demo_figures import plot

    if args.replot:
        print("\n".join(str(p) for p in plot(json.loads(Path(args.replot).read_text(encoding="utf-8")), Path(args.figures))))
        return
    simulator = LLMSettings(
        kind="openai" if args.simulator_base_url else "hf",
        model=args.simulator_model,
        base_url=args.simulator_base_url,
        api_key_file=args.simulator_key_file,
    )
    overrides = {"loop": {"evaluate": {"with": {"users": {"simulator": simulator.model_dump(exclude_defaults=True)}}}}}
    settings = DemoSettings(
        loop_overrides=overrides if args.simulator_base_url else {},
        **{k: getattr(args, k) for k in ("rounds", "users", "max_rounds", "max_tokens", "temperature", "user_tokens", "seed")},
        loop_file=args.loop_file,
        model=args.model,
        needs=args.needs,
        final_users=not args.no_final_users,
        simulator=simulator,
    )
    import tempfile

    from pipeline.stats import clean

    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        result = clean(run_demo(settings, work, lambda m: print(m, flush=True)))
        result["figures"] = [
            str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in plot(result, Path(args.figures))
        ]
        save_results(result, Path(args.out))


if __name__ == "__main__":
    main()
