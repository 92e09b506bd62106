"""generate: sample N replies per prompt from the base model (optionally with an adapter)."""

from __future__ import annotations

import hashlib

from pydantic import Field

from pipeline.generation import SamplingSettings, chat_generate
from pipeline.progress import track
from pipeline.records import load_rows, save_rows
from pipeline.stage import Input, Output, Stage, StageConfig


class GenerateConfig(StageConfig):
    num_samples: int = Field(default=2, ge=1, description="replies per prompt")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    batch_size: int = Field(default=8, ge=1, description="prompts per generate() call")
    system_prompt: str | None = None
    prompt_field: str = "prompt"
    max_prompts: int | None = Field(default=None, ge=1)
    device: str | None = Field(default=None, description="cuda / cpu; default: cuda when available")


def prompt_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class GenerateStage(Stage):
    uses = "generate"
    summary = "Batched, seeded sampling of N replies per prompt."
    Config = GenerateConfig
    inputs = {
        "prompts": Input(("prompts",), doc="rows with a prompt field (jsonl, csv, dataset)"),
        "adapter": Input(("adapter",), required=False, doc="LoRA adapter to sample from"),
    }
    outputs = {"responses": Output("responses", doc="one row per (prompt, sample)")}
    default_num_cpus = float("inf")
    non_semantic_fields = frozenset({"device", "batch_size"})

    def run(self):
        from pipeline.models import device_policy, load_causal_lm, load_tokenizer

        cfg: GenerateConfig = self.config
        rows = load_rows(self.ctx.input("prompts"), required=[cfg.prompt_field], what="prompts")
        if cfg.max_prompts:
            rows = rows[: cfg.max_prompts]
        policy = device_policy(cfg.device)
        adapter = self.ctx.input("adapter")
        tokenizer = load_tokenizer(self.ctx.model)
        model = load_causal_lm(self.ctx.model, policy, adapter=adapter).eval()
        conversations = []
        for row in rows:
            messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            messages.append({"role": "user", "content": str(row[cfg.prompt_field])})
            conversations.append(messages)
        self.ctx.log.info("sampling %d x %d replies with %s", len(rows), cfg.num_samples, self.ctx.model)
        progress = iter(track(range((len(rows) + cfg.batch_size - 1) // cfg.batch_size), desc=f"{self.ctx.name}: batches"))
        replies = chat_generate(
            model, tokenizer, conversations, cfg.sampling, cfg.num_samples, cfg.batch_size, self.ctx.seed,
            on_batch=lambda done, total: next(progress, None),
        )
        out, tokens, finished = [], 0, 0
        for row, samples in zip(rows, replies):
            pid = str(row.get("id") or prompt_id(str(row[cfg.prompt_field])))
            for j, reply in enumerate(samples):
                record = dict(row)
                record.update(
                    prompt_id=pid,
                    prompt=str(row[cfg.prompt_field]),
                    system_prompt=cfg.system_prompt or "",
                    sample_index=j,
                    response=reply.text,
                    num_tokens=reply.num_tokens,
                    finished=reply.finished,
                    model=self.ctx.model,
                    adapter=str(adapter) if adapter else "",
                    seed=self.ctx.seed,
                )
                out.append(record)
                tokens += reply.num_tokens
                finished += reply.finished
        save_rows(out, self.ctx.output("responses"))
        return {"prompts": len(rows), "responses": len(out), "mean_tokens": tokens / max(len(out), 1),
                "finished_rate": finished / max(len(out), 1)}
