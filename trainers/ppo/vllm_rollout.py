"""Rollouts through vLLM on a GPU: the policy's LoRA is saved after each update and served
as a new LoRARequest; log-probs are then recomputed with the HF model, so vLLM only has to
pick tokens (its sampler's numerics never enter the PPO ratio).

Not exercised on the CPU-only machines this project is tested on; the HF path
(`rollout.hf_sample`) is the tested one and the default.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def lora_rank_of(policy) -> int:
    """The largest LoRA rank in the policy's adapter (its own config, rank_pattern included): a
    continued adapter keeps the rank it was trained with, whatever the stage's `lora.r` says, and
    vLLM refuses an adapter above the `max_lora_rank` it was started with."""
    from pipeline.generation import largest_lora_rank

    config = policy.peft_config[policy.active_adapter]
    return largest_lora_rank(config.r, getattr(config, "rank_pattern", None))


class VllmSampler:
    def __init__(
        self,
        model_path: str,
        lora_rank: int,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.35,
        max_model_len: int = 2048,
        seed: int = 0,
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("rollout_engine: vllm needs vLLM on a GPU machine: pip install vllm") from None
        from pipeline.generation import vllm_max_lora_rank

        self.llm = LLM(
            model=model_path,
            enable_lora=True,
            max_lora_rank=vllm_max_lora_rank(lora_rank),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
        )
        self._dir = Path(tempfile.mkdtemp(prefix="heedful-ppo-lora-"))
        self._version = 0

    def sync(self, policy) -> None:
        """Publish the current adapter; vLLM loads it by a new id on the next request."""
        self._version += 1
        path = self._dir / f"v{self._version}"
        policy.save_pretrained(str(path))

    @torch.no_grad()
    def sample(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        eos_ids: list[int],
        pad_id: int,
        seed: int,
    ) -> torch.Tensor:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_k=top_k or -1,
            top_p=top_p,
            max_tokens=max_new_tokens,
            stop_token_ids=eos_ids,
            seed=seed,
        )
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(query_ids, query_mask)]
        lora = LoRARequest(f"policy-v{self._version}", self._version, str(self._dir / f"v{self._version}"))
        outputs = self.llm.generate(prompts, params, lora_request=lora if self._version else None, use_tqdm=False)
        rows = []
        for out in outputs:
            for c in out.outputs:
                tokens = list(c.token_ids)
                if c.finish_reason == "stop" and (not tokens or tokens[-1] not in eos_ids):
                    tokens.append(eos_ids[0])  # stopped on EOS without returning it: keep the action
                rows.append(tokens)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=query_ids.device)
