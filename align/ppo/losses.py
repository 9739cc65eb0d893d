"""PPO-for-RLHF math as small pure torch functions: masked statistics, per-token KL rewards, GAE, clipped losses.

Kept free of models and trainers so every equation can be unit-tested against hand-worked numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true; 0 where the mask has no true element."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dim)  # ignores NaN/inf at masked positions
    count = mask.sum(dim=dim)
    return total / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Scalar variance over masked elements (Bessel-corrected when `unbiased`); 0 with fewer than 2 elements."""
    mask = mask.bool()
    count = mask.sum()
    if count < 2:
        return values.new_zeros(())
    centred = torch.where(mask, values - masked_mean(values, mask), torch.zeros_like(values))
    return centred.pow(2).sum() / (count - 1 if unbiased else count)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with masked stats; shift_mean=False keeps the mean (rewards); 0 off the mask.

    `all_reduce_sum` (sum a tensor over ranks) makes the statistics those of every rank's batch together, as if
    one process held the whole rollout: per-rank statistics would scale each rank's advantages differently."""
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros_like(values)).double()  # fp64: the variance below cancels
    moments = torch.stack([mask.sum().to(kept.dtype), kept.sum(), kept.pow(2).sum()])  # [3]: one all-reduce
    if all_reduce_sum is not None:
        moments = all_reduce_sum(moments)
    count, total, squares = moments.unbind()
    mean = total / count.clamp(min=1)
    var = (squares - count * mean**2) / (count - 1) if count >= 2 else torch.zeros_like(mean)
    mean, var = mean.to(values.dtype), var.clamp(min=0).to(values.dtype)
    whitened = (values - mean) * torch.rsqrt(var + eps)  # [B, T]
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate from the sampled tokens' log-probs [B, T] (Schulman, "Approximating KL")."""
    if estimator == "k1":
        return logprobs - ref_logprobs  # log(p/q)
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs  # log(q/p)
        return torch.expm1(log_ratio) - log_ratio  # (q/p - 1) - log(q/p) >= 0, unbiased
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1' or 'k3'")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * KL_t on response tokens, plus the sequence score on each row's last response token [B, T]."""
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))  # [B, T]
    positions = torch.arange(mask.shape[1], device=mask.device)  # [T]
    last = torch.where(mask, positions, -1).max(dim=1).values  # [B]; -1 for an all-masked row
    is_last = positions.unsqueeze(0) == last.unsqueeze(1)  # [B, T]; never true when last == -1
    return rewards + is_last.to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over masked tokens; holes are skipped, the episode ends after the last one."""
    # Schulman et al. 2016, eq. 16: A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma*V_{t+1} - V_t
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))  # [B, T]; never read off the mask
    values = torch.where(mask, values, torch.zeros_like(values))  # [B, T]
    next_value = torch.zeros_like(values[:, 0])  # [B]; value of the next valid token, 0 past the end
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t]  # [B]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv, torch.zeros_like(adv))
        next_value = torch.where(valid, values[:, t], next_value)  # a hole carries the bootstrap through
        next_adv = torch.where(valid, adv, next_adv)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, as a loss to minimise, with clipping and drift statistics."""
    # Schulman et al. 2017, eq. 7: L = -E[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)]
    log_ratio = logprobs - old_logprobs  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: the critic may not move more than cliprange_value from its rollout estimate per update."""
    # PPO2 baseline (Dhariwal et al. 2017): L_V = 0.5 * E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # [B, T]
    unclipped_sq = (values - returns).pow(2)
    clipped_sq = (v_clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.max(unclipped_sq, clipped_sq), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).float(), mask)}
    return loss, stats


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Moves the KL coefficient so the observed KL tracks `target` (Ziegler et al. 2019, eq. 2)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        # e_t = clip(KL_t / target - 1, -0.2, 0.2); beta_{t+1} = beta_t * (1 + K_beta * e_t), K_beta = n_steps / horizon
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


def kl_controller(kl_coef: float, target_kl: float | None, horizon: int) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller when a target KL is set, else a fixed coefficient."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
