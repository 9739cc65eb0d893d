"""The PPO loop on Accelerate: rollout -> per-token rewards -> GAE -> `num_ppo_epochs` of clipped minibatch updates.

Each step is reproducible from (seed, step) alone — which prompts, the sampling seed, the minibatch order — and
the models run in eval mode (no dropout: the ratio of the first update is exactly 1), so a run resumed from a
checkpoint produces the same numbers as one that never stopped. Only rank 0 writes checkpoints; every rank
reads them. Metrics are averaged over ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from align import runtime
from align.errors import RecipeError, StageInterrupted
from align.ppo import losses
from align.ppo.rollout import Rollout, collect

if TYPE_CHECKING:
    from align.data import Message
    from align.ppo.roles import Roles
    from align.recipe import Recipe
    from align.training import StageRun

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def total_steps(recipe: Recipe, num_prompts: int) -> int:
    """PPO steps (one rollout batch each): train.max_steps, else enough for train.num_train_epochs over the prompts."""
    train = recipe.train
    if train.max_steps > 0:
        return train.max_steps
    per_step = recipe.ppo.rollout_batch_size * runtime.world()[1]
    return max(1, math.ceil(train.num_train_epochs * num_prompts / per_step))


def check_batch_sizes(recipe: Recipe) -> None:
    train, settings = recipe.train, recipe.ppo
    minibatch = train.per_device_train_batch_size * train.gradient_accumulation_steps
    if settings.rollout_batch_size % minibatch:
        raise RecipeError(
            f"{recipe.path}: ppo.rollout_batch_size ({settings.rollout_batch_size}) must be a multiple of "
            f"train.per_device_train_batch_size x train.gradient_accumulation_steps ({minibatch}): each rollout "
            "batch is split into whole minibatches")


def prompt_indices(num_prompts: int, step: int, batch: int, seed: int) -> list[int]:
    """Which prompts this rank answers at `step`: consecutive slices of a reshuffled order per pass over the
    data, interleaved over ranks. A pure function of its arguments, so a resumed run picks the same prompts."""
    rank, world = runtime.world()
    start = (step * world + rank) * batch
    order: dict[int, list[int]] = {}
    picked = []
    for position in range(start, start + batch):
        epoch, index = divmod(position, num_prompts)
        if epoch not in order:
            order[epoch] = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        picked.append(order[epoch][index])
    return picked


def advantages_and_returns(rollout: Rollout, settings: Any, kl_coef: float) -> tuple[torch.Tensor, ...]:
    """Per-token rewards (score at the last token, KL penalty everywhere), GAE, whitened advantages."""
    mask = rollout.response_mask
    kl = losses.kl_penalty(rollout.logprobs, rollout.ref_logprobs, settings.kl_estimator)  # [B, R]
    rewards = losses.per_token_rewards(rollout.scores, kl, mask, kl_coef)  # [B, R]
    # Whitening statistics over the whole rollout of every rank, not per rank.
    if settings.whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False, all_reduce_sum=runtime.all_reduce_sum)
    advantages, returns = losses.gae(rewards, rollout.values, mask, settings.gamma, settings.lam)
    return losses.masked_whiten(advantages, mask, all_reduce_sum=runtime.all_reduce_sum), returns, kl


def ppo_update(model: Any, optimizer: Any, scheduler: Any, accelerator: Any, rollout: Rollout,
               advantages: torch.Tensor, returns: torch.Tensor, recipe: Recipe, generator: torch.Generator
               ) -> dict[str, float]:
    """`num_ppo_epochs` passes over the rollout in shuffled minibatches of micro-batches (gradient accumulation)."""
    settings, train = recipe.ppo, recipe.train
    micro, accumulation = train.per_device_train_batch_size, train.gradient_accumulation_steps
    minibatch = micro * accumulation
    stats: dict[str, list[float]] = defaultdict(list)
    for _ in range(settings.num_ppo_epochs):
        order = torch.randperm(len(rollout.scores), generator=generator).to(rollout.scores.device)
        for start in range(0, len(order), minibatch):
            chunk = order[start:start + minibatch]
            for offset in range(0, minibatch, micro):
                rows = chunk[offset:offset + micro]
                # DDP averages gradients only on the last micro-batch of the accumulation.
                sync = offset + micro >= minibatch
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    logprobs, entropy, values = model(**rollout.rows(rows), temperature=settings.temperature)
                    mask = rollout.response_mask[rows]
                    policy_loss, policy_stats = losses.policy_loss(logprobs, rollout.logprobs[rows], advantages[rows],
                                                                   mask, settings.cliprange)
                    value_loss, value_stats = losses.value_loss(values.float(), rollout.values[rows], returns[rows],
                                                                mask, settings.cliprange_value)
                    mean_entropy = losses.masked_mean(entropy, mask)
                    loss = policy_loss + settings.vf_coef * value_loss
                    if settings.entropy_coef:  # else entropy is only logged: no backward through its softmaxes
                        loss = loss - settings.entropy_coef * mean_entropy
                    accelerator.backward(loss / accumulation)
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["entropy"].append(mean_entropy.item())
                for key, value in {**policy_stats, **value_stats}.items():
                    stats[key].append(float(value))
            grad_norm = accelerator.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], train.max_grad_norm)
            stats["grad_norm"].append(float(grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {key: sum(values) / len(values) for key, values in stats.items()}


def _mean_over_ranks(record: dict[str, float]) -> dict[str, float]:
    records = runtime.gather_objects(record)
    return {key: sum(r[key] for r in records) / len(records) for key in record}


# ---- checkpoints ------------------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, step: int, model: Any, optimizer: Any, scheduler: Any, kl_control: Any,
                    history: list[dict[str, Any]], keep: int) -> Path:
    """Rank 0 writes the trainable weights, optimizer, schedule, KL coefficient and history of `step`."""
    from safetensors.torch import save_file

    path = directory / f"checkpoint-{step}"
    if runtime.is_main_process():
        path.mkdir(parents=True, exist_ok=True)
        save_file(model.trainable_state(), str(path / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path / "optimizer.pt")
        state = {"global_step": step, "kl_controller": kl_control.state_dict(), "history": history}
        (path / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        complete = sorted((int(p.name.rpartition("-")[2]), p) for p in directory.glob("checkpoint-*")
                          if (p / STATE_FILE).exists())
        for _, old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.wait_for_everyone()
    return path


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, kl_control: Any
                    ) -> tuple[int, list[dict[str, Any]]]:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    named = dict(model.named_parameters())
    missing = [name for name in named if named[name].requires_grad and name not in weights]
    unexpected = sorted(set(weights) - set(named))
    if missing or unexpected:
        raise RecipeError(f"{path}: the checkpoint does not fit this recipe's model (missing: "
                          f"{', '.join(missing[:3]) or '-'}; unexpected: {', '.join(unexpected[:3]) or '-'}; different "
                          "LoRA settings, or written by an older align?); run without --resume to start over")
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    states = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    kl_control.load_state_dict(state["kl_controller"])
    return state["global_step"], state["history"]


# ---- the loop -------------------------------------------------------------------------------------------------


def train(roles: Roles, tokenizer: Any, prompts: list[list[Message]], recipe: Recipe, run: StageRun,
          accelerator: Any, reward_fn: Any) -> list[dict[str, Any]]:
    """Run PPO to the end (or to a SIGTERM: checkpoint, then StageInterrupted). Returns the per-step history."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    settings, train_cfg = recipe.ppo, recipe.train
    check_batch_sizes(recipe)
    steps = total_steps(recipe, len(prompts))
    minibatches = settings.rollout_batch_size // (train_cfg.per_device_train_batch_size
                                                  * train_cfg.gradient_accumulation_steps)
    updates = steps * settings.num_ppo_epochs * minibatches
    actor_critic = roles.actor_critic
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    warmup = train_cfg.warmup_steps if train_cfg.warmup_steps >= 1 else math.ceil(train_cfg.warmup_steps * updates)
    scheduler = get_scheduler(train_cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(warmup),
                              num_training_steps=updates)
    model, optimizer = accelerator.prepare(actor_critic, optimizer)
    kl_control = losses.kl_controller(settings.kl_coef, settings.target_kl, settings.kl_horizon)
    first, history = 0, []
    if run.resume_from is not None:
        first, history = load_checkpoint(run.resume_from, actor_critic, optimizer, scheduler, kl_control)
    world = runtime.world()[1]

    with runtime.interruptible() as flag:
        flag.in_training_loop = True
        progress = tqdm(range(first, steps), initial=first, total=steps, desc="ppo",
                        disable=not runtime.is_main_process())
        for step in progress:
            started = time.perf_counter()
            batch = [prompts[i] for i in prompt_indices(len(prompts), step, settings.rollout_batch_size,
                                                        train_cfg.seed)]
            # Rollouts sample and score under the same autocast as the prepared model's forward in the update
            # (accelerate wraps it), so old and new log-probs come from one precision.
            with accelerator.autocast():
                rollout = collect(roles, tokenizer, batch, settings, chat_template=recipe.model.chat_template,
                                  reward_fn=reward_fn, seed=runtime.rank_seed(train_cfg.seed, f"rollout-{step}"),
                                  forward_batch_size=train_cfg.per_device_eval_batch_size)
            advantages, returns, kl = advantages_and_returns(rollout, settings, kl_control.value)
            learning_rate = scheduler.get_last_lr()[0]
            generator = torch.Generator().manual_seed(runtime.rank_seed(train_cfg.seed, f"minibatches-{step}"))
            update = ppo_update(model, optimizer, scheduler, accelerator, rollout, advantages, returns, recipe,
                                generator)
            record = _step_record(rollout, kl, kl_control.value, update, time.perf_counter() - started)
            record["learning_rate"] = learning_rate
            record = _mean_over_ranks(record)
            record["tokens_per_second"] *= world
            kl_control.update(record["kl"], settings.rollout_batch_size * world)
            history.append({"step": step + 1, "epoch": (step + 1) * settings.rollout_batch_size * world
                            / len(prompts), **record})
            accelerator.log(record, step=step + 1)
            progress.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                                 clip=f"{record['clipfrac']:.2f}")
            stop = any(runtime.gather_objects(flag.requested))
            if stop or ((step + 1) % train_cfg.save_steps == 0 and step + 1 < steps):
                save_checkpoint(run.checkpoints, step + 1, actor_critic, optimizer, scheduler, kl_control, history,
                                train_cfg.save_total_limit)
            if stop:
                raise StageInterrupted(
                    f"interrupted at step {step + 1}; a checkpoint is in {run.checkpoints}. "
                    "Nothing was published: run the same command with --resume to continue.")
        flag.in_training_loop = False
    return history


def _step_record(rollout: Rollout, kl: torch.Tensor, kl_coef: float, update: dict[str, float],
                 seconds: float) -> dict[str, float]:
    """What one step logs (before averaging over ranks)."""
    mask = rollout.response_mask
    true_kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(dim=1)  # [B] k1 per reply, nats
    penalty = (-kl_coef * kl * mask).sum(dim=1)  # [B]
    tokens = mask.sum(dim=1).float()  # [B]
    record = {
        "reward": rollout.scores.mean().item(),
        "kl": true_kl.mean().item(),  # nats per sequence, as eval's `kl`
        "kl_per_token": true_kl.sum().item() / max(tokens.sum().item(), 1),  # as eval's and TRL's per-token `kl`
        "non_score_reward": penalty.mean().item(),
        "rlhf_reward": (rollout.scores + penalty).mean().item(),
        "kl_coef": kl_coef,
        "response_length": tokens.mean().item(),
        "eos_fraction": rollout.ended_with_eos.float().mean().item(),
        "tokens_per_second": tokens.sum().item() / seconds,
        **update,
    }
    if rollout.reward_model_scores is not None:
        record["score"] = rollout.reward_model_scores.mean().item()
    return record
