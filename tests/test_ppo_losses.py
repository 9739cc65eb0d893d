"""Hand-worked checks of the PPO-for-RLHF math in align.ppo.losses."""

from __future__ import annotations

import math

import pytest
import torch

from align.models import entropy_from_logits
from align.ppo.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_controller,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

NAN = float("nan")


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def m(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bool)


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- masked_mean / masked_var / masked_whiten --------------------------------------------------------------------


def test_masked_mean_overall_per_row_per_column_and_empty_row():
    values = t([[1.0, 2.0, NAN], [4.0, 5.0, 6.0]])  # NaN sits at a masked position and must be ignored
    mask = m([[1, 1, 0], [0, 0, 0]])
    close(masked_mean(values, mask), 1.5)  # (1 + 2) / 2
    close(masked_mean(values, mask, dim=1), [1.5, 0.0])  # all-masked row -> 0
    close(masked_mean(values, mask, dim=0), [1.0, 2.0, 0.0])
    close(masked_mean(values, mask.float(), dim=1), [1.5, 0.0])  # 0/1 float mask works too
    close(masked_mean(values, torch.zeros_like(mask)), 0.0)


def test_masked_var_unbiased_biased_and_small_counts():
    values = t([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = m([[1, 1, 1], [1, 0, 0]])
    # elements 1,2,3,4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_var(values, mask), 5.0 / 3.0)
    close(masked_var(values, mask, unbiased=False), 5.0 / 4.0)
    close(masked_var(values, m([[0, 1, 0], [0, 0, 0]])), 0.0)  # one element
    close(masked_var(values, m([[0, 0, 0], [0, 0, 0]])), 0.0)  # none
    assert masked_var(values, mask).shape == ()


def test_masked_whiten_hand_worked():
    values = t([[1.0, 2.0, 3.0], [4.0, 99.0, NAN]])
    mask = m([[1, 1, 1], [1, 0, 0]])
    # mean 2.5, unbiased var 5/3, std 1.2909944: (x - 2.5) / 1.2909944
    close(masked_whiten(values, mask), [[-1.1618950, -0.3872983, 0.3872983], [1.1618950, 0.0, 0.0]])
    # shift_mean=False adds the mean 2.5 back; masked positions still 0
    close(masked_whiten(values, mask, shift_mean=False), [[1.3381050, 2.1127017, 2.8872983], [3.6618950, 0.0, 0.0]])


def test_masked_whiten_random_has_zero_mean_unit_variance_over_mask():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=g) * 3.0 + 5.0
    mask = torch.rand(4, 7, generator=g) > 0.4
    mask[2] = False  # an all-masked row
    out = masked_whiten(values, mask)
    close(masked_mean(out, mask), 0.0)
    close(masked_var(out, mask), 1.0, atol=1e-4)
    assert torch.all(out[~mask] == 0)
    shifted = masked_whiten(values, mask, shift_mean=False)
    close(masked_mean(shifted, mask), masked_mean(values, mask), atol=1e-4)
    assert torch.all(shifted[~mask] == 0)


# --- kl_penalty / per_token_rewards ------------------------------------------------------------------------------


def test_kl_penalty_k1_and_k3_hand_worked():
    logp, ref = t([[0.0, -1.0]]), t([[-1.0, 0.0]])
    close(kl_penalty(logp, ref, "k1"), [[1.0, -1.0]])
    # k3 with x = ref - logp = [-1, 1]: (e^-1 - 1) + 1 = 0.3678794; (e - 1) - 1 = 0.7182818
    close(kl_penalty(logp, ref, "k3"), [[0.3678794, 0.7182818]])


def test_kl_penalty_k3_non_negative_and_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(3, 5, generator=g) * 4, -torch.rand(3, 5, generator=g) * 4
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.all(k3 >= 0)
    assert torch.all(k3[logp != ref] > 0)
    close(kl_penalty(logp, logp, "k3"), torch.zeros(3, 5), atol=0)
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_per_token_rewards_hand_worked_with_holes_and_empty_row():
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    mask = m([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    scores = t([1.0, 2.0, 3.0])
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = [
        [-0.05, -0.1 + 1.0, 0.0],  # right-padded: score on position 1
        [-0.25, 0.0, -0.25 + 2.0],  # hole in the middle: score on the last true position
        [0.0, 0.0, 0.0],  # all-masked row: no score anywhere
    ]
    close(rewards, expected)
    # the empty row does not disturb the others
    close(per_token_rewards(scores[:2], kl[:2], mask[:2], kl_coef=0.5), rewards[:2], atol=0)


# --- gae ---------------------------------------------------------------------------------------------------------


def test_gae_hand_worked():
    rewards, values, mask = t([[1.0, 0.0, 2.0]]), t([[1.0, 2.0, 3.0]]), m([[1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta_2 = 2 - 3 = -1                  A_2 = -1
    # delta_1 = 0 + 0.9*3 - 2 = 0.7          A_1 = 0.7 + 0.45*(-1) = 0.25
    # delta_0 = 1 + 0.9*2 - 1 = 1.8          A_0 = 1.8 + 0.45*0.25 = 1.9125
    close(adv, [[1.9125, 0.25, -1.0]])
    close(ret, [[2.9125, 2.25, 2.0]])


def test_gae_lam_zero_is_one_step_td():
    rewards, values, mask = t([[1.0, 0.0, 2.0]]), t([[1.0, 2.0, 3.0]]), m([[1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(adv, [[1.8, 0.7, -1.0]])  # the deltas above
    close(ret, [[2.8, 2.7, 2.0]])  # r_t + 0.9 * V_{t+1}


def test_gae_gamma_one_lam_one_returns_are_reward_to_go():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[0.5, 1.0, 2.0]]), m([[1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[6.0, 5.0, 3.0]])  # 1+2+3, 2+3, 3
    close(adv, [[5.5, 4.0, 1.0]])  # returns - values


def test_gae_single_token_is_reward_minus_value():
    adv, ret = gae(t([[2.0]]), t([[0.5]]), m([[1]]), gamma=0.9, lam=0.95)
    close(adv, [[1.5]])
    close(ret, [[2.0]])


def test_gae_hole_in_middle_is_skipped():
    rewards, values, mask = t([[1.0, 99.0, 2.0]]), t([[1.0, 77.0, 3.0]]), m([[1, 0, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # the value after the hole bootstraps the token before it:
    # A_2 = 2 - 3 = -1;  delta_0 = 1 + 0.9*3 - 1 = 2.7;  A_0 = 2.7 + 0.45*(-1) = 2.25
    close(adv, [[2.25, 0.0, -1.0]])
    close(ret, [[3.25, 0.0, 2.0]])
    # whatever sits at the hole (even NaN) changes nothing
    for r_hole, v_hole in [(-5.0, 0.0), (NAN, NAN), (0.0, float("inf"))]:
        adv2, ret2 = gae(t([[1.0, r_hole, 2.0]]), t([[1.0, v_hole, 3.0]]), mask, gamma=0.9, lam=0.5)
        close(adv2, adv, atol=0)
        close(ret2, ret, atol=0)


def test_gae_batch_right_padding_single_token_and_empty_row():
    rewards = t([[1.0, 0.0, 2.0, 5.0, 5.0], [7.0, 7.0, 0.5, 7.0, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    values = t([[1.0, 2.0, 3.0, 9.0, 9.0], [NAN, NAN, 2.0, NAN, NAN], [NAN, 1.0, 1.0, 1.0, 1.0]])
    mask = m([[1, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[1.9125, 0.25, -1.0, 0.0, 0.0], [0.0, 0.0, -1.5, 0.0, 0.0], [0.0] * 5])  # row 1: 0.5 - 2
    close(ret, [[2.9125, 2.25, 2.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0, 0.0], [0.0] * 5])
    adv_alone, _ = gae(rewards[:1, :3], values[:1, :3], mask[:1, :3], gamma=0.9, lam=0.5)
    close(adv[:1, :3], adv_alone, atol=0)


# --- policy_loss / value_loss ------------------------------------------------------------------------------------


def _policy_inputs():
    # ratios 1.5, 0.5, 1.5, 0.5 on real tokens; the 5th token is masked with a huge advantage
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), 3.0]]).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = m([[1, 1, 1, 1, 0]])
    return logp, old, adv, mask


def test_policy_loss_hand_worked_clipping_both_signs():
    logp, old, adv, mask = _policy_inputs()
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token: A, ratio  -> -A*ratio, -A*clip(ratio)  -> max           clipped?
    # 0:     +1, 1.5   -> -1.5, -1.2                 -> -1.2          yes
    # 1:     +1, 0.5   -> -0.5, -0.8                 -> -0.5          no
    # 2:     -1, 1.5   ->  1.5,  1.2                 ->  1.5          no
    # 3:     -1, 0.5   ->  0.5,  0.8                 ->  0.8          yes
    close(loss.detach(), (-1.2 - 0.5 + 1.5 + 0.8) / 4)  # 0.15
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], 1.0)  # (1.5 + 0.5 + 1.5 + 0.5) / 4
    # (r - 1) - log r: 1.5 -> 0.0945349, 0.5 -> 0.1931472
    close(stats["approx_kl"], (2 * 0.0945349 + 2 * 0.1931472) / 4)
    assert all(not v.requires_grad and v.shape == () for v in stats.values())


def test_policy_loss_gradient_is_zero_where_clipped_in_advantage_direction():
    logp, old, adv, mask = _policy_inputs()
    loss, _ = policy_loss(logp, old, adv, mask, cliprange=0.2)
    loss.backward()
    # d(-A*ratio/4)/dlogp = -A*ratio/4: token 1 -> -0.5/4, token 2 -> +1.5/4; clipped 0, 3 and masked 4 -> 0
    close(logp.grad, [[0.0, -0.125, 0.375, 0.0, 0.0]])


def test_policy_loss_no_clipping_at_ratio_one():
    logp = t([[-1.0, -2.0]])
    loss, stats = policy_loss(logp, logp.clone(), t([[2.0, -1.0]]), m([[1, 1]]), cliprange=0.2)
    close(loss, -0.5)  # -(2 - 1) / 2
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)


def test_value_loss_hand_worked_with_clipping():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    values = t([[0.5, 0.1, 0.5, 50.0]]).requires_grad_(True)
    returns = t([[1.0, 1.0, -1.0, -50.0]])
    mask = m([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token: (v-R)^2, (v_clip-R)^2 -> max, clipped bigger?
    # 0: v=0.5, v_clip=0.2, R=1:  0.25, 0.64 -> 0.64 yes
    # 1: v=0.1, v_clip=0.1, R=1:  0.81, 0.81 -> 0.81 no (equal)
    # 2: v=0.5, v_clip=0.2, R=-1: 2.25, 1.44 -> 2.25 no
    close(loss.detach(), 0.5 * (0.64 + 0.81 + 2.25) / 3)  # 0.6166667
    close(stats["vf_clipfrac"], 1.0 / 3.0)
    loss.backward()
    # d/dv 0.5 * (v - R)^2 / 3 = (v - R) / 3 on unclipped tokens; the clipped token and the masked one get 0
    close(values.grad, [[0.0, -0.9 / 3, 1.5 / 3, 0.0]])


# --- entropy -----------------------------------------------------------------------------------------------------


def test_entropy_uniform_peaked_and_hand_worked():
    close(entropy_from_logits(torch.zeros(2, 3, 4)), torch.full((2, 3), math.log(4)))
    peaked = t([[[100.0, 0.0, 0.0, 0.0]]])
    close(entropy_from_logits(peaked), [[0.0]])
    # p = [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616
    close(entropy_from_logits(t([[[0.0, math.log(3.0)]]])), [[0.5623351]])
    close(entropy_from_logits(t([[[1000.0, 1000.0 + math.log(3.0)]]])), [[0.5623351]], atol=1e-3)  # shift-stable


def test_entropy_bf16_input_and_masked_vocab():
    out = entropy_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    close(out, torch.full((1, 2), math.log(8)))
    close(entropy_from_logits(t([[[0.0, 0.0, -float("inf")]]])), [[math.log(2)]])  # -inf logit: no NaN


# --- KL controllers ----------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_rises_falls_and_clips():
    def step(kl: float) -> float:
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
        ctl.update(kl, n_steps=1000)
        return ctl.value

    assert step(6.6) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # error 6.6/6 - 1 = 0.1 -> 0.101
    assert step(9.0) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error 0.5 clipped to 0.2 -> 0.102
    assert step(60.0) == pytest.approx(0.102)  # still clipped
    assert step(3.0) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # error -0.5 clipped to -0.2 -> 0.098
    assert step(0.0) == pytest.approx(0.098)
    assert step(6.0) == pytest.approx(0.1)


def test_kl_controller_state_round_trip_and_factory():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(9.0, n_steps=1000)
    resumed = AdaptiveKLController(0.5, target=6.0, horizon=10_000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(7.0, n_steps=500)
    resumed.update(7.0, n_steps=500)
    assert resumed.value == ctl.value != pytest.approx(0.102)

    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05

    assert isinstance(kl_controller(0.05, None, 10_000), FixedKLController)
    adaptive = kl_controller(0.05, 6.0, 10_000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 6.0, 10_000)


def test_masked_whiten_over_ranks_equals_whitening_the_gathered_batch():
    """Two ranks each whiten their half with statistics summed over both (`all_reduce_sum`): the result is the
    whole batch whitened at once, not each half on its own scale."""
    torch.manual_seed(0)
    values, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    values[3:] = values[3:] * 4 + 2  # the second rank's rewards sit on another scale
    whole = masked_whiten(values, mask)
    moments = {}

    def capture(rank):
        def reduce(m):
            moments[rank] = m
            return m
        return reduce

    halves = {0: (values[:3], mask[:3]), 1: (values[3:], mask[3:])}
    for rank, (v, m) in halves.items():
        masked_whiten(v, m, all_reduce_sum=capture(rank))
    for rank, (v, m) in halves.items():
        summed = masked_whiten(v, m, all_reduce_sum=lambda _: moments[0] + moments[1])
        close(summed, whole[:3] if rank == 0 else whole[3:])
    assert not torch.allclose(masked_whiten(values[:3], mask[:3]), whole[:3], atol=1e-3)  # per rank differs
