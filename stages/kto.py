"""kto: KTO with a LoRA adapter, from binary signals (thumbs up / down).

TRL's KTOTrainer on heedful's packed preference core by default (`fast`: the prompt once per
row beside its reply and its mismatched KL reply, no padding, the reference's log-probs cached
once per data and model; trainers/fastpref/kto_trainer.py, exact to TRL's loss and gradients),
TRL's own step with `fast: false`. The reference is the base with the adapter off (as in dpo).
Input rows: TRL's unpaired prompt/completion/label, reactions (love/like/thumbs_up vs
dislike/thumbs_down), or good/needs_work judgments; trainers/kto.py reads them all.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.stage import Input
from pipeline.training import TrainerStage, TrainSettings
from trainers.kto_config import KTOMethodConfig


class KtoStageConfig(KTOMethodConfig, TrainSettings):
    """KTO's settings (trainers/kto_config.py) and the shared training settings."""

    fast: bool = Field(
        default=True,
        description="heedful's exact packed KTO core, its reference cached (docs/speed.md); false: TRL's own step, "
        "where precompute_ref_log_probs applies",
    )

    @model_validator(mode="after")
    def _batch_holds_a_mismatched_pair(self) -> KtoStageConfig:
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ValueError(
                "per_device_train_batch_size must be >= 2: KTO estimates its KL term from mismatched pairs in a batch"
            )
        return self

    @model_validator(mode="after")
    def _precompute_on_one_worker(self) -> KtoStageConfig:
        asked = self.precompute_ref_log_probs or self.trainer_args.get("precompute_ref_log_probs")
        if asked and self.num_workers > 1:
            raise ValueError(
                "precompute_ref_log_probs needs num_workers: 1 (each Ray Train worker would look for the "
                "precomputed values in its own temporary file)"
            )
        return self

    def reference_once(self, rows: int) -> KtoStageConfig:
        """These settings with `precompute_ref_log_probs` decided for a run over `rows` rows, for TRL's
        step (`fast: false`). With `fast: true` it is left unset unless set by hand: the core decides its
        reference cache itself from the args it runs with (`ref_cache="auto"`, `run_passes` >= 1), and a
        precompute decided here from the typed fields would override that (it asks for the cache).

        Why: TRL's KTO computes each row's reference log-probs (its reply's and its mismatched KL
        reply's, adapter off) in every step, so once per epoch; precomputed, once per run. The
        precompute costs about one epoch's reference work (bench/kto_step.py: 2 epochs took 0.78x
        the time), so it is on where the run reads every row at least twice; over one pass it can only
        add TRL's model hash. Off with QLoRA (the precompute runs the model in eval mode, where
        bitsandbytes' CPU kernels repack 4-bit weights for inference) and on several Ray Train workers
        (each would look for the values in its own temporary file). Set by hand, it is kept."""
        if "precompute_ref_log_probs" in self.trainer_args:  # TRL's own key, given through trainer_args: it decides
            args = dict(self.trainer_args)
            return self.model_copy(
                update={"precompute_ref_log_probs": bool(args.pop("precompute_ref_log_probs")), "trainer_args": args}
            )
        if self.precompute_ref_log_probs is not None or self.fast:
            return self
        on = self.passes(rows) >= 2 and self.num_workers == 1 and not self.lora.qlora
        return self.model_copy(update={"precompute_ref_log_probs": on})


class KtoStage(TrainerStage):
    uses = "kto"
    version = "2"  # 2: class weights balanced for the counts (balance_classes)
    summary = "KTO (TRL) with LoRA from binary feedback: reactions, judgments, labelled replies."
    Config = KtoStageConfig
    inputs = {
        "feedback": Input(
            ("unpaired_preferences", "reactions", "verbal_feedback", "judgments"),
            doc="prompt/completion/label rows, reactions, or good/needs_work judgments",
        )
    }
    config: KtoStageConfig
    non_semantic_fields = TrainerStage.non_semantic_fields | {"precompute_ref_log_probs", "fast"}  # the same numbers, to rounding

    def run(self):
        from datasets import Dataset
        from trl import KTOConfig, KTOTrainer

        from trainers.kto import read_feedback, trl_format

        ctx = self.ctx
        rows = read_feedback(ctx.input("feedback"), ctx.log)
        tokenizer = self.tokenizer()
        dataset = Dataset.from_list(trl_format(rows, conversational=bool(getattr(tokenizer, "chat_template", None))))
        desirable = sum(r["label"] for r in rows)
        self.config = self.config.balanced(desirable, len(rows) - desirable).reference_once(len(rows))
        weights = {"desirable_weight": self.config.desirable_weight, "undesirable_weight": self.config.undesirable_weight}
        ctx.log.info("class weights: desirable %.3g, undesirable %.3g", *weights.values())

        def build_trainer():
            if self.config.fast:
                from trainers.fastpref.kto_trainer import FastKTOTrainer

                # the reference of every row cached where the run reads every row at least once, decided by the
                # trainer from its own args and the rows TRL kept (`run_passes`); a few steps over many: inside them
                trainer = self.trl_trainer(FastKTOTrainer, KTOConfig, dataset, tokenizer, ref_cache="auto")
            else:
                trainer = self.trl_trainer(KTOTrainer, KTOConfig, dataset, tokenizer)
            if getattr(trainer, "fast", False):  # on the core (it may have fallen back to TRL's step)
                if trainer.calculate_KL:
                    where = "in the reply's packed row (long prompts)" if trainer.kl_in_row else "packed apart"
                    ctx.log.info("KTO's mismatched KL replies %s", where)
                ctx.log.info("packed KTO core; reference log-probs %s", trainer.reference_origin())
            elif trainer.precompute_ref_logps:  # TRL's own flag: what it did, not what was asked
                ctx.log.info("reference log-probs computed once, before training (precompute_ref_log_probs)")
            return trainer

        return {**self.fit(build_trainer), "desirable": desirable, "undesirable": len(rows) - desirable, **weights}
