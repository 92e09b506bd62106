"""PPO on the tiny model: a learnable dense reward rises; the reference is the base with the
adapter off; an interrupted run resumes to the same weights; early stops; the stage runs
end to end with per-objective curves, samples and a report section."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import pipeline_from_dict
from pipeline.records import write_jsonl
from pipeline.runner import Runner
from reward_models.rules import TokenClassReward
from trainers.ppo.config import PpoSettings
from trainers.ppo.models import build_models, response_forward
from trainers.ppo.objectives import Objective
from trainers.ppo.trainer import PpoTrainer, Prompt

PROMPTS = [Prompt(f"p{i}", [{"role": "user", "content": f"Tell me about item number {i}."}], f"item {i}") for i in range(8)]


def settings(**over) -> PpoSettings:
    base = dict(
        steps=3,
        prompts_per_step=2,
        samples_per_prompt=4,
        max_new_tokens=8,
        temperature=1.0,
        learning_rate=1e-3,
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        eval_every=100,
        device="cpu",
    )
    base.update(over)
    return PpoSettings(**base)


def direction_class(models, quantile: float = 0.75) -> list[int]:
    """Tokens whose (frozen, tied) embedding points along a fixed random direction.

    The tiny model is random, so a class of *words* is beyond what it can represent; this
    class is one a LoRA can reach (move the last hidden state along the direction), which
    makes the test about PPO rather than about model capacity. Base rate: 25% of tokens.
    """
    emb = models.policy.get_base_model().get_input_embeddings().weight.detach()
    u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    proj = emb @ (u / u.norm())
    return torch.nonzero(proj > torch.quantile(proj, quantile)).squeeze(1).tolist()


def make_trainer(tokenizer, s, seed=0, checkpoint_dir=None, on_step=None, eval_prompts=None, normalized=False):
    torch.manual_seed(seed)
    models = build_models("tiny", s.lora, s.value_model, s.device_policy())
    rm = TokenClassReward(token_ids=direction_class(models))
    objective = Objective("class", rm)
    if normalized:  # through reward_models.combine, z-scored with running statistics
        from reward_models.combine import CombinedReward
        from reward_models.combine import Objective as Part

        objective = Objective("reward", CombinedReward([Part("class", rm, 1.0, normalize=True)]), flatten=True)
    return PpoTrainer(s, models, tokenizer, [objective], PROMPTS, eval_prompts, checkpoint_dir, seed=seed, on_step=on_step)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from pipeline.models import load_tokenizer

    return load_tokenizer(str(tiny_model_path))


def test_dense_token_class_reward_rises(tokenizer):
    trainer = make_trainer(tokenizer, settings(steps=10))
    curves = trainer.train().curves
    rewards = [row["reward/class"] for row in curves]
    assert len(rewards) == 10
    # 8 tokens per reply, 25% of them in the class at the start: ~2 per reply
    assert sum(rewards[:2]) / 2 < 3.5
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 2.0
    assert all(row["kl"] < 10 for row in curves)  # bounded by the KL penalty
    assert curves[-1]["kl"] > 0.05  # ... but the policy did move away from the base
    assert curves[0]["ppo_epochs_run"] == 4


def test_reference_is_the_base_model_with_the_adapter_disabled(tokenizer, tiny_model_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tokenizer, settings(steps=2))
    trainer.train()
    rollout = trainer.sample(PROMPTS[:2], 2, 1.0)
    trainer.annotate(rollout, 1.0)
    args = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():
        fresh = response_forward(base, *args, temperature=1.0).logprobs * rollout.response_mask
    assert torch.allclose(rollout.ref_logprobs, fresh, atol=1e-5)
    assert (rollout.logprobs - rollout.ref_logprobs).abs().max() > 1e-3  # the trained policy differs
    assert sum(p.numel() for p in trainer.models.parameters()) < 1.2 * sum(p.numel() for p in base.parameters())


def test_a_continued_adapter_is_the_reference_as_it_started(tokenizer, tmp_path):
    """PPO after SFT keeps its KL to the adapter it continues (reference: adapter, InstructGPT's
    reference): the reference's log-probs are the adapter's as loaded, stay so while the LoRA moves,
    and reading them leaves the moved weights in place; reference: base is the base model."""
    first = make_trainer(tokenizer, settings(steps=2))
    first.train()
    first.models.policy.save_pretrained(str(tmp_path / "sft"))
    s = settings()
    rollout = first.sample(PROMPTS[:2], 2, 1.0)
    args = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
    models = build_models("tiny", s.lora, s.value_model, s.device_policy(), adapter=tmp_path / "sft")
    base = build_models("tiny", s.lora, s.value_model, s.device_policy(), adapter=tmp_path / "sft", reference="base")
    with torch.no_grad():
        started = models.evaluate(*args, temperature=1.0)[0].logprobs
        assert torch.equal(models.reference_logprobs(*args, temperature=1.0), started)
        off = base.reference_logprobs(*args, temperature=1.0)
        assert (off - started).abs().max() > 1e-3  # the base is another model
        with base.policy.disable_adapter():
            assert torch.equal(off, response_forward(base.policy, *args, temperature=1.0).logprobs)
        for p in models.policy.parameters():  # "training" moves every LoRA tensor
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        moved = models.evaluate(*args, temperature=1.0)[0].logprobs
        assert (moved - started).abs().max() > 1e-3
        assert torch.equal(models.reference_logprobs(*args, temperature=1.0), started)
        assert torch.equal(models.evaluate(*args, temperature=1.0)[0].logprobs, moved)  # swapped back exactly
    assert base.reference_weights is None and models.reference_weights is not None
    with pytest.raises(ValueError, match="reference must be"):
        build_models("tiny", s.lora, s.value_model, s.device_policy(), reference="sft")


def test_vllm_rollouts_size_their_lora_by_the_continued_adapter_not_the_setting(tmp_path):
    """vLLM refuses an adapter above the max_lora_rank it started with: PPO continuing an r=8
    adapter under a stage whose `lora.r` says 4 must ask for 8 (the adapter's own config)."""
    from trainers.ppo.vllm_rollout import lora_rank_of

    s = settings()
    trained = build_models("tiny", s.lora, s.value_model, s.device_policy())
    trained.policy.save_pretrained(str(tmp_path / "r8"))
    small = settings(lora={"r": 4, "alpha": 8, "dropout": 0.0})
    assert lora_rank_of(build_models("tiny", small.lora, s.value_model, s.device_policy()).policy) == 4
    continued = build_models("tiny", small.lora, s.value_model, s.device_policy(), adapter=tmp_path / "r8")
    assert lora_rank_of(continued.policy) == 8
    continued.policy.peft_config[continued.policy.active_adapter].rank_pattern = {"q_proj": 32}
    assert lora_rank_of(continued.policy) == 32
    # the generate stage's vLLM path reads a saved adapter's rank from its folder, the same way
    from pipeline.generation import adapter_rank, vllm_max_lora_rank

    continued.policy.save_pretrained(str(tmp_path / "patterned"))
    assert adapter_rank(tmp_path / "r8") == 8 and adapter_rank(tmp_path / "patterned") == 32
    assert [vllm_max_lora_rank(r) for r in (4, 8, 12, 32, 600)] == [8, 8, 16, 32, 600]


def test_scopes_of_the_prompts_reach_the_reward_models(tokenizer):
    """c3po_data rows carry a scope; each sampled reply's batch entry has its prompt's (scoped rules read it)."""
    seen: list = []

    class Recording(TokenClassReward):
        def score(self, batch):
            seen.append(batch.scopes)
            return super().score(batch)

    scoped = [Prompt(p.id, p.conversation, p.reward_prompt, scope) for p, scope in zip(PROMPTS, ["in_scope", "near_scope"])]
    trainer = make_trainer(tokenizer, settings())
    trainer.objectives = [Objective("class", Recording(token_ids=[1]))]
    trainer.score(trainer.sample(scoped, 2, 1.0))
    trainer.score(trainer.sample(PROMPTS[:2], 2, 1.0))
    assert seen == [["in_scope", "in_scope", "near_scope", "near_scope"], None]


def test_interrupted_run_resumes_to_the_same_weights_and_curves(tokenizer, tmp_path):
    """Weights, optimizer, RNG, prompt position and the reward's running statistics all resume."""
    s = settings(steps=4, save_steps=2)
    straight = make_trainer(tokenizer, s, normalized=True)
    expected = straight.train()
    expected_weights = straight.models.trainable_state()

    class Interrupt(Exception):
        pass

    def crash_after_step_3(step, row):
        if step == 3:
            raise Interrupt

    first = make_trainer(tokenizer, s, checkpoint_dir=tmp_path, on_step=crash_after_step_3, normalized=True)
    with pytest.raises(Interrupt):
        first.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]
    torch.manual_seed(12345)  # a new process: its RNG must come from the checkpoint, not from here
    second = make_trainer(tokenizer, s, seed=0, checkpoint_dir=tmp_path, normalized=True)
    resumed = second.train()
    assert second.resumed_from == "step-000002"
    assert [r["reward/class"] for r in resumed.curves] == [r["reward/class"] for r in expected.curves]
    # the z-scored reward PPO optimised depends on the running statistics restored at step 2
    assert [r["reward/total"] for r in resumed.curves] == pytest.approx([r["reward/total"] for r in expected.curves])
    assert second.objectives[0].model.stats["class"].count == straight.objectives[0].model.stats["class"].count == 32
    weights = second.models.trainable_state()
    assert all(torch.allclose(weights[k], expected_weights[k], atol=1e-6) for k in expected_weights)


def test_early_stops_on_update_kl_and_on_kl_to_reference(tokenizer):
    trainer = make_trainer(tokenizer, settings(steps=5, learning_rate=5e-3, target_kl=1e-6, kl_threshold=0.01, kl_patience=2))
    state = trainer.train()
    assert all(row["ppo_epochs_run"] == 1 for row in state.curves)  # each rollout: stopped after its first epoch
    assert state.curves[0]["kl"] == 0.0  # the first rollout comes from the base itself (LoRA B = 0)
    assert state.stopped == "kl_threshold exceeded 2 times"
    assert state.step == 3  # steps 2 and 3 were over the threshold


def test_separate_critic_trains_without_touching_the_policy_trunk(tokenizer):
    s = settings(steps=2, value_model="tiny", learning_rate=1e-9, value_learning_rate=1e-2)
    trainer = make_trainer(tokenizer, s)
    critic_before = {n: p.clone() for n, p in trainer.models.critic.named_parameters() if p.requires_grad}
    policy_before = trainer.models.trainable_state()
    trainer.train()
    assert trainer.models.value_head is None
    assert any(not torch.equal(p, critic_before[n]) for n, p in trainer.models.critic.named_parameters() if p.requires_grad)
    moved = max(
        (trainer.models.get_parameter(n) - t).abs().max().item() for n, t in policy_before.items() if n.startswith("policy.")
    )  # lr 1e-9: barely
    assert moved < 1e-5


def ppo_pipeline(prompts, steps=3, **extra):
    return {
        "run_name": "ppo-tiny",
        "model": "tiny",
        "seed": 0,
        "stages": [
            {
                "name": "rl",
                "uses": "ppo",
                "inputs": {"prompts": str(prompts), "eval_prompts": str(prompts)},
                "with": {
                    "steps": steps,
                    "prompts_per_step": 2,
                    "samples_per_prompt": 2,
                    "max_new_tokens": 6,
                    "mini_batch_size": 2,
                    "eval_every": 2,
                    "eval_prompts": 2,
                    "learning_rate": 1e-3,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                    "objectives": [
                        {"name": "vowels", "rule": {"rule": "token_class", "pattern": "[aeiou]"}, "weight": 1.0},
                        {"rule": {"rule": "prompt_overlap"}, "weight": 0.5},
                    ],
                    **extra,
                },
            },
            {"name": "ship", "uses": "export", "inputs": {"adapter": "rl.adapter"}},
        ],
    }


def test_ppo_stage_end_to_end_with_two_objectives(tmp_path, tiny_model_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"id": f"q{i}", "prompt": f"Count to {i} and name the number {i}."} for i in range(4)], prompts)
    result = Runner(
        pipeline_from_dict(ppo_pipeline(prompts, report_to="tensorboard"), tmp_path), tmp_path / "runs", use_ray=False
    ).execute()
    assert result.ok, [r.error for r in result.records]
    stage = result.run_dir / "rl"
    assert list((stage / "tensorboard").glob("events.out.tfevents.*"))  # the curves, replayed to the tracker
    curves = json.loads((stage / "curves.json").read_text())
    assert [r["step"] for r in curves] == [0, 1, 2, 3]
    for key in (
        "reward/vowels",
        "reward/prompt_overlap",
        "kl",
        "entropy",
        "response/length",
        "policy/clip_fraction",
        "value/error",
    ):
        assert all(key in r for r in curves[1:]), key
    assert "eval/reward/vowels" in curves[0] and "eval/reward/vowels" in curves[2] and "eval/reward/vowels" in curves[3]
    metrics = result.record("rl").metrics
    assert metrics["steps"] == 3 and "eval_reward_last" in metrics
    assert curves[1]["reward/vowels"] > 0 and curves[-1]["kl"] != 0.0  # rewards arrived and the policy moved

    from pipeline.records import load_rows

    samples = load_rows(stage / "samples")
    assert sorted({s["step"] for s in samples}) == [0, 2, 3] and len(samples) == 6
    assert {"reward/vowels", "reward/prompt_overlap", "response"} <= set(samples[0])
    assert not (stage / "checkpoints").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(result.run_dir / "ship" / "package"))
    from pipeline.report import build_report

    report = build_report(result.run_dir).read_text()
    assert "rl: PPO objectives, KL and diagnostics" in report and "first vs. last evaluation" in report


def test_ppo_stage_continues_an_adapter_with_its_kl_to_that_adapter_or_the_base(tmp_path):
    """The stage's `reference` reaches the models: continuing `rl.adapter`, the first rollout's KL is
    exactly 0 against the adapter (the policy is its reference) and not against the base; the
    prompts are c3po_data-shaped rows, each with its scope, under the scoped feedback rule."""
    rows = [{"prompt": f"Recipe number {i}?", "scope": s} for i, s in enumerate(["in_scope", "near_scope", "out_of_scope"] * 2)]
    prompts = tmp_path / "rows.jsonl"
    write_jsonl(rows, prompts)
    data = ppo_pipeline(prompts, steps=2)
    data["stages"] = data["stages"][:1]
    rule = {"rule": {"rule": "feedback_metric", "metric": {"kind": "starts_with", "value": "Chef's tip:"}}}
    for name, reference in (("from_adapter", "adapter"), ("from_base", "base")):
        settings = {k: v for k, v in data["stages"][0]["with"].items() if k not in ("eval_every", "eval_prompts")}
        data["stages"].append(
            {
                "name": name,
                "uses": "ppo",
                "inputs": {"prompts": str(prompts), "adapter": "rl.adapter"},
                "with": {**settings, "steps": 1, "reference": reference, "objectives": [rule]},
            }
        )
    result = Runner(pipeline_from_dict(data, tmp_path), tmp_path / "runs", use_ray=False).execute()
    assert result.ok, [r.error for r in result.records]
    first_kl = {}
    for name in ("from_adapter", "from_base"):
        curves = json.loads((result.run_dir / name / "curves.json").read_text())
        first_kl[name] = next(row["kl"] for row in curves if "kl" in row)
    assert first_kl["from_adapter"] == 0.0 and abs(first_kl["from_base"]) > 1e-4


def test_ppo_config_errors_name_the_key(tmp_path):
    from pipeline.errors import ConfigError

    write_jsonl([{"prompt": "hi"}], tmp_path / "p.jsonl")
    data = ppo_pipeline(tmp_path / "p.jsonl")
    data["stages"][0]["with"]["objectives"] = [{"input": "reward_model", "rule": {"rule": "token_class", "pattern": "x"}}]
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.with\.objectives\[0\]: Value error, give exactly one of (path, )?input or rule"
    ):
        pipeline_from_dict(data, tmp_path)
    data["stages"][0]["with"]["objectives"] = []
    data["stages"][0]["with"]["mini_batch_size"] = 64
    with pytest.raises(ConfigError, match="mini_batch_size \\(64\\) exceeds the rollout size"):
        pipeline_from_dict(data, tmp_path)
    data["stages"][0]["with"]["mini_batch_size"] = 2
    data["stages"][0]["with"]["objectives"] = [{"rule": {"rule": "token_class", "colour": "red"}}]
    with pytest.raises(
        ConfigError, match=r"objectives\[0\]: Value error, rule 'token_class': .*unexpected keyword argument 'colour'"
    ):
        pipeline_from_dict(data, tmp_path)
