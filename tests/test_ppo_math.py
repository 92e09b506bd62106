"""PPO math against hand computations: GAE, clipped losses, whitening, entropy, reward
placement (dense and scalar), KL shaping and multi-objective combination. No models."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.ppo.gae import gae_advantages
from trainers.ppo.losses import clipped_policy_loss, clipped_value_loss, entropy_from_logits
from trainers.ppo.masked import masked_var, masked_whiten
from trainers.ppo.rollout import cut_at_eos
from trainers.ppo.shaping import kl_per_token, per_token_rewards, place_dense, place_scalar, shape_rewards
from trainers.sequences import gather_logps, masked_mean


def test_gae_matches_hand_computation_with_padding():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 7.0]])  # 7.0 sits on padding: must be ignored
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 9.0]])  # 9.0 likewise
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 2 - 1.5 = 0.5; d1 = 0 + .9*1.5 - 1 = .35; d0 = 1 + .9*1 - .5 = 1.4; gamma*lam = .72
    a2 = 0.5
    a1 = 0.35 + 0.72 * a2
    a0 = 1.4 + 0.72 * a1
    # row 1 ends at t=1 (no bootstrap from the padded value): d1 = 3 - 1 = 2; d0 = 0 + .9*1 - 2 = -1.1
    b1 = 2.0
    b0 = -1.1 + 0.72 * b1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5], [b0 + 2.0, b1 + 1.0, 0.0]]), atol=1e-6)


def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value():
    rewards = torch.tensor([[0.2, -0.1, 0.0, 1.0]])
    values = torch.tensor([[0.3, 0.1, -0.4, 0.7]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    reward_to_go = torch.tensor([[1.1, 0.9, 1.0, 1.0]])
    assert torch.allclose(adv, reward_to_go - values, atol=1e-6)
    assert torch.allclose(ret, reward_to_go, atol=1e-6)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        gae_advantages(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_clipped_policy_loss_hand_values_and_gradient():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 3.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    new = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the 4th token is padding
    out = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(-0.5, -0.8) = -0.5; t2: max(2.2, 2.2) = 2.2
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    assert out.ratio_mean.item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    assert out.approx_kl.item() == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3, abs=1e-6)
    out.loss.backward()
    # clipped token has no gradient; others: d(-A r)/d logp = -A r, divided by 3 tokens
    assert torch.allclose(new.grad, torch.tensor([[0.0, -0.5 / 3, 2.2 / 3, 0.0]]), atol=1e-6)


def test_clipped_value_loss_hand_values():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, 4.0]])
    returns = torch.tensor([[1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # t0: max((.5-1)^2, (.2-1)^2) = .64 (clipped used); t1: (0.1+1)^2 = 1.21 both ways
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_entropy_and_logprobs_of_known_distributions():
    probs = torch.tensor([0.5, 0.25, 0.25])
    logits = probs.log().view(1, 1, 3) + 7.0  # a shift must not matter
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert entropy_from_logits(torch.zeros(1, 1000)).item() == pytest.approx(math.log(1000), abs=1e-5)
    lp = gather_logps(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.25), abs=1e-6)


def test_masked_statistics_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_var(x, mask).item() == pytest.approx(torch.tensor([1.0, 2, 3, 4]).var().item())
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    scaled = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert scaled.mean().item() == pytest.approx(2.5, abs=1e-5)  # mean kept, only the scale changes


def test_scalar_reward_lands_on_last_token_and_dense_on_its_tokens():
    lengths = torch.tensor([3, 1, 4])
    placed = place_scalar(torch.tensor([1.0, 2.0, 3.0]), lengths, width=5)
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 0], expected[2, 3] = 1.0, 2.0, 3.0
    assert torch.equal(placed, expected)

    dense = torch.tensor([[0.0, 0.3, -0.3], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    text_lengths = torch.tensor([2, 0, 3])
    with pytest.raises(ValueError, match="token 2 of response 0, which has only 2 tokens"):
        place_dense(dense, text_lengths, width=5)
    dense[0, 2] = 0.0
    out = per_token_rewards(torch.tensor([9.0, -1.0, 9.0]), dense, lengths, text_lengths, width=5)
    # dense rows keep their token rewards; the empty reply (EOS only) gets its scalar at the EOS
    assert torch.equal(out, torch.tensor([[0.0, 0.3, 0, 0, 0], [-1.0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0]]))


def test_kl_shaping_penalises_each_token_and_leaves_padding_zero():
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, kl = shape_rewards(scores, logprobs, ref, mask, kl_coef=0.3)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.15, 0.3, 1.0, 0.0]]))
    whitened, _ = shape_rewards(scores, logprobs, ref, mask, kl_coef=0.3, whiten=True)
    valid = torch.tensor([-0.15, 0.3, 1.0])
    expected = (valid - valid.mean()) / valid.std() + valid.mean()  # unit spread, the batch mean kept
    assert torch.allclose(whitened, torch.cat([expected, torch.zeros(1)]).view(1, 4), atol=1e-5)
    lr = torch.tensor([0.5, -1.0])
    assert torch.allclose(kl_per_token(lr, torch.zeros(2), "k3"), torch.exp(-lr) - 1 + lr)
    assert torch.allclose(kl_per_token(lr, torch.zeros(2), "k2"), 0.5 * lr**2)
    with pytest.raises(ValueError):
        kl_per_token(lr, lr, "k9")


def test_cut_at_eos_masks_everything_after_the_first_eos():
    EOS, PAD = 2, 0
    generated = torch.tensor([[5, 6, EOS, 7, 8], [5, 6, 7, 8, 9], [EOS, 4, 4, 4, 4]])
    ids, mask, lengths, finished = cut_at_eos(generated, [EOS], PAD)
    assert lengths.tolist() == [3, 5, 1]
    assert finished.tolist() == [True, False, True]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ids.tolist() == [[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]]
