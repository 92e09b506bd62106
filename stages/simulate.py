"""simulate: ConvSim simulated users talk to the policy and give feedback.

Each information need becomes a simulated user (need + persona + style) who asks, answers
the policy's clarifying questions from the need, and judges replies: thanks when
satisfied, specific feedback otherwise; the policy revises, up to `max_rounds` rounds.
The simulator LLM is a local HF model (default SmolLM2-135M) or an OpenAI-compatible
endpoint. Outputs are feedback records with provenance (simulator, seed, prompt version).
The policy's replies come from the generation engine (`engine: auto`: CTranslate2 with the adapter
merged where the engine probe found it faster on this CPU, as `generate` and `evaluate` pick); a
Chain-of-Hindsight adapter's after its phrase (pipeline/hindsight.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from feedback.simulator.prompts import PROMPT_VERSION
from feedback.simulator.protocol import ProtocolSettings
from pipeline.generation import EngineSetting, check_local_engine
from pipeline.paths import ConfigPath
from pipeline.stage import Input, Output, Stage, StageConfig


class SimulateConfig(StageConfig, ProtocolSettings):
    need_field: str = Field(default="need", description="row field holding the information need")
    request_field: str = Field(default="prompt", description="row field holding the user's first turn")
    facts_field: str | None = Field(
        default="keywords",
        description="row field listing facts a satisfying reply mentions ('a|b' = either); "
        "the user is satisfied only when the LLM judge says yes and enough are mentioned",
    )
    personas: list[str] = Field(default_factory=list, description="assigned (seeded) to users whose row has none")
    styles: list[str] = Field(default_factory=list, description="e.g. terse, polite, casual")
    policy_system_prompt: str | None = Field(
        default=None, description="the policy's system prompt; default: the row's (generate's), else none"
    )
    pair_rule: Literal["revised", "improved"] = Field(
        default="revised",
        description="revised: every revision beats the reply that drew negative feedback; "
        "improved: only when the simulator also scored the revision higher",
    )
    max_conversations: int | None = Field(default=None, ge=1)
    batch_size: int = Field(
        default=16,
        ge=1,
        description="conversations per generate() call on HF (on CTranslate2 the policy takes a round at once); "
        "each call is seeded, so sampled turns depend on it (part of the fingerprint)",
    )
    device: str | None = None
    engine: EngineSetting = "auto"  # what writes the policy's replies (hf or ct2; the simulator has its own)
    cache: bool = Field(default=True, description="reuse earlier LLM calls from $HEEDFUL_HOME/cache/convsim.sqlite")
    cache_path: ConfigPath | None = Field(
        default=None,
        description="the call cache's file (default $HEEDFUL_HOME/cache/convsim.sqlite); relative: beside the config, "
        "like every path in `with:`",
    )

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        return check_local_engine(value)


class SimulateStage(Stage):
    uses = "simulate"
    # a prompt change reruns the stage; 3: a CoH adapter answers after its phrase; 4: batch_size is fingerprinted
    # (a run made before with a non-default batch_size, whose fingerprint left it out, is not taken for a default one);
    # 5: first_reply_satisfied_rate counts a need answered only by clarifying questions as not satisfied
    version = f"5+{PROMPT_VERSION}"
    summary = "ConvSim simulated users: clarifying answers, feedback, revisions -> feedback records."
    Config = SimulateConfig
    inputs = {
        "conversations": Input(
            ("responses", "prompts", "needs"),
            doc="information needs: rows with need + prompt (+ generate's response), or ClariQ TSV",
        ),
        "adapter": Input(("adapter",), required=False, doc="LoRA adapter of the policy"),
    }
    outputs = {
        "transcripts": Output("transcripts", doc="ConvSim-shaped conversations: utterances with participant and type"),
        "verbal_feedback": Output("verbal_feedback", doc="the user's critique (or thanks) of each judged reply"),
        "followups": Output("followups", doc="the user's next turn after each system turn"),
        "reactions": Output("reactions", doc="love / neutral / dislike from the simulator's satisfaction"),
        "preferences": Output("preferences", doc="revised reply chosen over the reply that drew negative feedback"),
    }
    default_num_cpus = float("inf")
    # batch_size is semantic, as generate's: HF generate seeds each batch (seed + b), and so does the simulator's
    # client on either engine, so sampled turns change with it (only the policy on CTranslate2 ignores it)
    non_semantic_fields = frozenset({"device", "engine", "cache", "cache_path"})

    @classmethod
    def report_section(cls, run_root, manifests):
        from feedback.simulator.report_section import simulate_section

        return simulate_section(run_root, manifests)

    def run(self):
        import json
        import time

        from feedback.simulator.needs import load_users
        from feedback.simulator.protocol import Judge, run_conversations
        from feedback.simulator.records import ProvenanceInfo, save_dataset, transcript_records
        from pipeline.evaluation.users import first_reply_outcomes
        from pipeline.generation import ENGINE_LABELS
        from pipeline.llm import HFClient, build_client, shares_default_model
        from pipeline.llm_cache import CachedLLM, LLMCache
        from pipeline.paths import cache_dir
        from pipeline.records import save_rows
        from pipeline.schema import KINDS, records_to_rows

        cfg: SimulateConfig = self.config
        ctx = self.ctx
        users = load_users(
            ctx.input("conversations"),
            cfg.need_field,
            cfg.request_field,
            cfg.personas,
            cfg.styles,
            ctx.seed,
            cfg.max_conversations,
            cfg.policy_system_prompt,
            cfg.facts_field,
        )
        adapter = ctx.input("adapter")
        started = time.time()
        policy_tokens, user_tokens = cfg.most_new_tokens(len(users))  # a small job does not start the engine probe
        policy_backend = HFClient.policy(
            ctx.model, cfg.device, cfg.batch_size, adapter, engine=cfg.engine, new_tokens=policy_tokens
        )
        # a simulator that is the policy's own model shares its HF copy (on CTranslate2 the policy's client
        # loads one only then: the simulator needs its logits anyway)
        shared = policy_backend if adapter is None and shares_default_model(cfg.simulator, ctx.model) else None
        sim_backend = build_client(
            cfg.simulator,
            ctx.model,
            cfg.device,
            shared and shared.model,
            shared and shared.tokenizer,
            batch_size=cfg.batch_size,
            new_tokens=user_tokens,
        )
        cache = None
        if cfg.cache:
            cache = LLMCache(cfg.cache_path or cache_dir() / "convsim.sqlite")
        policy, simulator = CachedLLM(policy_backend, cache), CachedLLM(sim_backend, cache)
        ctx.log.info(
            "simulating %d users with %s against policy %s%s (replies from %s)",
            len(users),
            simulator.identity,
            ctx.model,
            " + adapter" if adapter else "",
            ENGINE_LABELS[policy_backend.engine],
        )

        judge = Judge(simulator, cfg.judge).calibrate()
        ctx.log.info(
            "judge (%s) calibrated: %.0f%% of calibration replies judged right", "+".join(judge.kinds), 100 * judge.accuracy
        )

        def on_round(rnd, open_, total):
            ctx.log.info("%s: round %d/%d, %d of %d conversations open", ctx.name, rnd, cfg.max_rounds, open_, total)

        transcripts = run_conversations(users, policy, simulator, cfg, ctx.seed, judge, on_round)
        info = ProvenanceInfo(
            simulator=simulator.identity,
            policy_model=ctx.model,
            policy_adapter=str(adapter) if adapter else None,
            seed=ctx.seed,
            prompt_version=PROMPT_VERSION,
            threshold=cfg.satisfied_threshold,
            judge="+".join(judge.kinds),
            run=ctx.run_name,
            stage=ctx.name,
        )
        followups, verbal, reactions, prefs, rows = [], [], [], [], []
        for t in transcripts:
            f, v, r, p = transcript_records(t, info, cfg.neutral_band, cfg.pair_rule)
            followups += f
            verbal += v
            reactions += r
            prefs += p
            row = t.to_row()
            row.update(id=t.user.id, provenance=info.for_(t, 0, t.user.id).model_dump(mode="json"))
            rows.append(row)
        if cache is not None:
            cache.close()
        save_rows(rows, ctx.output("transcripts"))
        for name, records in (
            ("verbal_feedback", verbal),
            ("followups", followups),
            ("reactions", reactions),
            ("preferences", prefs),
        ):
            save_dataset(records_to_rows(records), list(KINDS[name].model_fields), ctx.output(name))
        if not prefs:
            ctx.log.warning("no preference pairs: every first reply satisfied the simulator, or no revision differed")

        def rate(values):
            return sum(values) / len(values) if values else float("nan")

        seconds = time.time() - started
        counts = {k: sum(r["satisfied"] for r in rows if r["rounds"] == k) for k in range(1, cfg.max_rounds + 1)}
        ctx.log.info("satisfied after round: %s", json.dumps(counts))
        return {
            "conversations": len(transcripts),
            "pairs": len(prefs),
            "satisfied_rate": rate([t.satisfied for t in transcripts]),
            # every conversation counts: one whose every turn was a clarifying question was not satisfied by a reply
            "first_reply_satisfied_rate": rate(first_reply_outcomes(transcripts)),
            "mean_rounds": rate([t.rounds for t in transcripts]),
            "clarifying_questions": sum(u.type == "clarifying_question" for t in transcripts for u in t.utterances),
            "feedback": len(verbal),
            "followups": len(followups),
            "reactions_love": sum(r.reaction == "love" for r in reactions),
            "reactions_dislike": sum(r.reaction == "dislike" for r in reactions),
            "calibration_accuracy": judge.accuracy,
            "generated_tokens": policy.generated_tokens + simulator.generated_tokens,
            "cache_hits": policy.hits + simulator.hits,
            "cache_misses": policy.misses + simulator.misses,
            "seconds": seconds,
        }
