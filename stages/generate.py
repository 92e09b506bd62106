"""generate: sample N replies per prompt from the base model (optionally with an adapter).

Batches are written to the staging folder as they finish, so an interrupted run resumes
at the first unfinished batch and reproduces exactly what an uninterrupted run would
(each batch is seeded by its index). With `engine: auto` (default) and vLLM installed on a
CUDA machine, all prompts go to vLLM in one call instead; on CPU, `auto` samples with
CTranslate2 (pipeline/ct2_engine.py: greedy replies equal to HF's, faster; docs/generation.md)
when it is installed, batch by batch like HF (pipeline/generation.py); `engine: hf` forces HF.
A Chain-of-Hindsight adapter (its `coh.json`) writes its replies after its phrase on every engine.
"""

from __future__ import annotations

import json

from pydantic import Field

from pipeline.chat import as_messages, row_prompt_id
from pipeline.generation import EngineSetting, SamplingSettings, pick_engine
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
    engine: EngineSetting = "auto"


class GenerateStage(Stage):
    config: GenerateConfig
    uses = "generate"
    summary = "Batched, seeded sampling of N replies per prompt."
    Config = GenerateConfig
    inputs = {
        "prompts": Input(("prompts",), doc="rows with a prompt field (jsonl, csv, dataset)"),
        "adapter": Input(("adapter",), required=False, doc="LoRA adapter to sample from"),
    }
    outputs = {"responses": Output("responses", doc="one row per (prompt, sample)")}
    version = "2"  # 2: a Chain-of-Hindsight adapter samples after its phrase (pipeline/hindsight.py)
    default_num_cpus = float("inf")
    non_semantic_fields = frozenset({"device", "engine"})  # how to sample, like device

    def run(self):
        from pipeline.generation import LocalEngine

        cfg: GenerateConfig = self.config
        rows = load_rows(self.ctx.input("prompts"), required=[cfg.prompt_field], what="prompts")
        if cfg.max_prompts:
            rows = rows[: cfg.max_prompts]
        adapter = self.ctx.input("adapter")
        engine = pick_engine(cfg.engine, cfg.device, self.ctx.model, len(rows) * cfg.num_samples * cfg.sampling.max_new_tokens)
        if engine == "vllm":
            return self._run_vllm(rows, adapter)
        local = LocalEngine(self.ctx.model, adapter, engine, cfg.device)
        partial = self.ctx.work_dir / "partial"
        partial.mkdir(exist_ok=True)
        batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        self.ctx.log.info("sampling %d x %d replies with %s", len(rows), cfg.num_samples, self.ctx.model)
        out = []
        for b in track(range(len(batches)), desc=f"{self.ctx.name}: batches"):
            done = partial / f"batch-{b:05d}.json"
            if done.is_file():
                out.extend(json.loads(done.read_text()))
                continue
            conversations = [self._conversation(row) for row in batches[b]]
            replies = local.generate(
                conversations, cfg.sampling, cfg.num_samples, batch_size=len(conversations), seed=self.ctx.seed + b
            )
            records = [
                self._record(row, j, reply, adapter)
                for row, samples in zip(batches[b], replies)
                for j, reply in enumerate(samples)
            ]
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(records))
            tmp.replace(done)
            out.extend(records)
        return self._save(rows, out)

    def _run_vllm(self, rows, adapter):
        """One vLLM call for every prompt (continuous batching); untested here: needs a CUDA GPU."""
        from pipeline.generation import vllm_generate

        cfg: GenerateConfig = self.config
        self.ctx.log.info("sampling %d x %d replies with %s on vLLM", len(rows), cfg.num_samples, self.ctx.model)
        replies = vllm_generate(
            self.ctx.model,
            [self._conversation(row) for row in rows],
            cfg.sampling,
            num_samples=cfg.num_samples,
            seed=self.ctx.seed,
            adapter=adapter,
        )
        out = [self._record(row, j, reply, adapter) for row, samples in zip(rows, replies) for j, reply in enumerate(samples)]
        return self._save(rows, out)

    def _save(self, rows, out):
        save_rows(out, self.ctx.output("responses"))
        n = max(len(out), 1)
        return {
            "prompts": len(rows),
            "responses": len(out),
            "mean_tokens": sum(r["num_tokens"] for r in out) / n,
            "finished_rate": sum(r["finished"] for r in out) / n,
        }

    def _conversation(self, row) -> list[dict[str, str]]:
        cfg: GenerateConfig = self.config
        return as_messages(row[cfg.prompt_field], cfg.system_prompt)

    def _record(self, row, sample_index, reply, adapter) -> dict:
        cfg: GenerateConfig = self.config
        record = dict(row)
        record.update(
            prompt_id=row_prompt_id(row, cfg.prompt_field),
            prompt=row[cfg.prompt_field],  # a string or chat messages, kept as given
            system_prompt=cfg.system_prompt or "",
            sample_index=sample_index,
            response=reply.text,
            num_tokens=reply.num_tokens,
            finished=reply.finished,
            model=self.ctx.model,
            adapter=str(adapter) if adapter else "",
            seed=self.ctx.seed,
        )
        return record
