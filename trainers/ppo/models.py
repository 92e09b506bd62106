"""The policy (base + LoRA), its reference (the same base with the adapter off, or the continued
adapter's starting weights swapped in: no second copy of the model) and the critic (a value
head on the policy trunk, or a separate small model).

Everything here computes the quantities PPO needs at the *response* positions only:
position Q-1+t predicts response token t, so logits/hidden states are sliced to
[Q-1, Q-1+R) and the LM head runs on those positions alone (`logits_to_keep`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from trainers.sequences import gather_logps

from .losses import entropy_from_logits


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what `generate` used while sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class ResponseOutputs:
    logprobs: torch.Tensor  # [B, R]
    entropy: torch.Tensor | None  # [B, R]
    hidden: torch.Tensor | None  # [B, R, H] last-layer states at the positions predicting each token


def response_forward(
    model,
    query_ids,
    query_mask,
    response_ids,
    response_mask,
    temperature: float,
    want_hidden: bool = False,
    want_entropy: bool = False,
) -> ResponseOutputs:
    """One forward of prompt+response; log-probs of the response tokens under logits / temperature
    (the distribution that was sampled, so the PPO ratio and KL compare like with like)."""
    Q, R = query_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        logits_to_keep=R + 1,
        output_hidden_states=want_hidden,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float() / temperature  # positions Q-1 .. Q+R-2
    logprobs = gather_logps(logits, response_ids)
    entropy = entropy_from_logits(logits) if want_entropy else None  # differentiable when grads are on
    hidden = out.hidden_states[-1][:, Q - 1 : Q - 1 + R] if want_hidden else None
    return ResponseOutputs(logprobs, entropy, hidden)


class ValueHead(nn.Module):
    """A linear map from a hidden state to a scalar value, in fp32 whatever the trunk's dtype.
    Zero-initialised: the first values are 0, so early advantages are the rewards themselves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class SeparateCritic(nn.Module):
    """A small model of its own (its own LoRA) with a value head: the critic's updates never
    touch the policy trunk. It reads the policy's token ids, so it must share the tokenizer."""

    def __init__(self, trunk, head: ValueHead):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        Q, R = query_ids.shape[1], response_ids.shape[1]
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        out = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask), use_cache=False
        )
        return self.head(out.last_hidden_state[:, Q - 1 : Q - 1 + R])


class PpoModels(nn.Module):
    """Policy with LoRA + critic. `reference()` is a context in which the policy *is* the reference.

    `freeze_reference()` makes the policy's adapter as it is then (a continued one, as it started)
    the reference rather than the base: PPO after SFT keeps its KL to the SFT model, as InstructGPT
    does, instead of being pulled back toward the base it was fine-tuned away from.
    """

    def __init__(self, policy, value_head: ValueHead | None, critic: SeparateCritic | None):
        super().__init__()
        if (value_head is None) == (critic is None):
            raise ValueError("give exactly one of value_head or critic")
        self.policy, self.value_head, self.critic = policy, value_head, critic
        #: (parameter, its value when frozen) for the policy's adapter tensors; None: the reference is the base
        self.reference_weights: list[tuple[nn.Parameter, torch.Tensor]] | None = None

    def freeze_reference(self) -> None:
        """The policy's trainable (adapter) tensors as they are now become the reference: a copy
        of what `trainable_state` copies for checkpoints, the policy's part of it."""
        params = dict(self.named_parameters())
        self.reference_weights = [(params[n], t) for n, t in self.trainable_state().items() if n.startswith("policy.")]

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy, in place: the base with the adapter off (peft's disable_adapter),
        or with `freeze_reference()` the adapter's frozen tensors swapped in for the duration (a
        LoRA's few MB copied twice per call; never inside a graph that backward will read)."""
        if self.reference_weights is None:
            with self.policy.disable_adapter():
                yield
            return
        if torch.is_grad_enabled():
            raise RuntimeError("the adapter reference swaps weights in place: use it under torch.no_grad()")
        current = [param.detach().clone() for param, _ in self.reference_weights]
        try:
            for param, tensor in self.reference_weights:
                param.copy_(tensor)
            yield
        finally:
            for (param, _), tensor in zip(self.reference_weights, current):
                param.copy_(tensor)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def value_parameters(self) -> list[nn.Parameter]:
        module = self.value_head if self.value_head is not None else self.critic
        assert module is not None  # __init__ requires exactly one of value_head / critic
        return [p for p in module.parameters() if p.requires_grad]

    def evaluate(
        self, query_ids, query_mask, response_ids, response_mask, temperature: float, want_entropy: bool = False
    ) -> tuple[ResponseOutputs, torch.Tensor]:
        """Policy log-probs (+ entropy) and values for a batch; gradients flow if enabled."""
        shared = self.value_head is not None
        out = response_forward(
            self.policy,
            query_ids,
            query_mask,
            response_ids,
            response_mask,
            temperature,
            want_hidden=shared,
            want_entropy=want_entropy,
        )
        if self.value_head is not None:  # == shared
            values = self.value_head(out.hidden)
        else:
            assert self.critic is not None  # __init__ requires exactly one of value_head / critic
            values = self.critic(query_ids, query_mask, response_ids, response_mask)
        return out, values

    @torch.no_grad()
    def reference_logprobs(self, query_ids, query_mask, response_ids, response_mask, temperature: float) -> torch.Tensor:
        with self.reference():
            return response_forward(self.policy, query_ids, query_mask, response_ids, response_mask, temperature).logprobs

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name (LoRA, head, critic): an exact checkpoint of what PPO changes."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)


def build_models(model_name: str, lora, value_model: str, policy_settings, adapter=None, reference: str = "adapter") -> PpoModels:
    """Load the base once, wrap it with a trainable LoRA (or continue `adapter`), add the critic.
    With `adapter` and reference "adapter" the KL reference is that adapter as loaded; else the base."""
    from pipeline.models import load_lora_policy

    if reference not in ("adapter", "base"):
        raise ValueError(f"reference must be 'adapter' or 'base', got {reference!r}")
    policy = load_lora_policy(model_name, policy_settings, lora, adapter)
    policy.eval()  # no dropout anywhere: the ratio of identical weights must be exactly 1
    hidden = policy.get_base_model().config.hidden_size
    if value_model == "head":
        models = PpoModels(policy, ValueHead(hidden).to(policy_settings.device), None)
    else:
        models = PpoModels(policy, None, separate_critic(value_model, policy, lora, policy_settings))
    if adapter is not None and reference == "adapter":
        models.freeze_reference()
    return models


def separate_critic(value_model: str, policy, lora, policy_settings) -> SeparateCritic:
    """`value_model` with its own LoRA and a value head; it must share the policy's tokenizer."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModel

    from pipeline.models import resolve_model

    path = resolve_model(value_model)
    config = AutoConfig.from_pretrained(path)
    vocab = policy.get_base_model().config.vocab_size
    if config.vocab_size < vocab:
        raise ValueError(
            f"value_model '{value_model}' has a vocabulary of {config.vocab_size} < the policy's {vocab}: "
            "a separate critic must share the policy's tokenizer"
        )
    trunk = AutoModel.from_pretrained(path, dtype=policy_settings.dtype).to(policy_settings.device)
    trunk = get_peft_model(trunk, lora.model_copy(update={"dropout": 0.0}).peft_config("FEATURE_EXTRACTION"))
    trunk.eval()
    return SeparateCritic(trunk, ValueHead(config.hidden_size).to(policy_settings.device))
