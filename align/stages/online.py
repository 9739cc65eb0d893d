"""What `align grpo` and `align rloo` share: the body of an online RL stage around one of TRL's trainers.

Steps: the generation batch holds whole groups and the reward is checked (`rewards.resolve`) before anything
slow; prompt card; SFT artifact merged into the base in memory; a fresh LoRA through `peft_config`, so the KL
reference is the same model with the adapter disabled; replies sampled and scored by `rewards.reward_function`;
publish the adapter with the reward artifact as a parent and the rollout metrics of TRL's log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from align import generation, launch, rewards, runtime
from align.errors import RecipeError

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.recipe import Recipe


def train_and_publish(recipe: Recipe, registry: Registry, *, resume: bool, say: Any, trainer: str,
                      **stage_config: Any) -> Artifact | None:
    """Check the batch and the reward, then the data (before trl is imported), load, train a fresh LoRA with
    TRL's `{trainer}Trainer` (`stage_config`: its own config fields), publish with the reward artifact as a
    parent."""
    from align import training

    check_batch(recipe)
    reward = rewards.resolve(recipe, registry)
    inputs = training.prepare(recipe, registry, resume=resume, say=say)
    settings = getattr(inputs.recipe, recipe.stage)
    reward_fn = rewards.reward_function(reward, registry, inputs.tokenizer,
                                        generation.stop_token_ids(inputs.model, inputs.tokenizer))
    padding_side, inputs.tokenizer.padding_side = inputs.tokenizer.padding_side, "left"  # TRL generates left-padded
    import trl

    online = training.build_trainer(getattr(trl, f"{trainer}Trainer"), getattr(trl, f"{trainer}Config"), inputs,
                                    trainer_kwargs={"reward_funcs": [reward_fn]},
                                    **sampling_config(inputs.recipe), **stage_config)
    # TRL's sampling config leaves min_p & co. unset, which generate() would fill from the checkpoint's settings.
    with generation.checkpoint_settings_ignored(online.model, inputs.tokenizer):
        train_metrics = training.train(online, inputs.run)
    inputs.tokenizer.padding_side = padding_side
    metrics = rollout_metrics(online.state.log_history, masked_truncated=settings.mask_truncated_completions)
    return training.publish_adapter(online, inputs, metrics=metrics, train_metrics=train_metrics,
                                    extra_parents=reward.parents,
                                    details={recipe.stage: settings.model_dump(), "online_reward": reward.describe()})


def sampling_config(recipe: Recipe) -> dict[str, Any]:
    """The TRL config fields GRPOConfig and RLOOConfig share, from the recipe's stage section. Dropout is off
    (TRL's default leaves it on for these trainers), so the policy/reference log-ratio is not dropout noise, and
    top_k/min_p/repetition_penalty are pinned off (top_p < 1 is refused by the recipe), so the log-probs TRL
    computes over the whole softmax describe what it sampled."""
    section = getattr(recipe, recipe.stage)
    return {"beta": section.beta, "num_generations": section.num_generations, "epsilon": section.epsilon,
            "num_iterations": section.num_iterations, "max_completion_length": section.max_new_tokens,
            "temperature": section.temperature, "top_p": section.top_p, "top_k": 0, "min_p": None,
            "repetition_penalty": 1.0, "disable_dropout": True,
            "mask_truncated_completions": section.mask_truncated_completions}


def check_batch(recipe: Recipe) -> None:
    """TRL samples `per_device_train_batch_size x processes x gradient_accumulation_steps` replies per generation
    batch, `num_generations` per prompt; say which recipe fields to change instead of TRL's ValueError."""
    stage, train = recipe.stage, recipe.train
    groups = getattr(recipe, stage).num_generations
    processes = max(runtime.world()[1], launch.process_count(recipe))
    batch = train.per_device_train_batch_size * processes * train.gradient_accumulation_steps
    if batch % groups:
        across = f" x {processes} processes" if processes > 1 else ""
        raise RecipeError(
            f"{recipe.path}: train.per_device_train_batch_size ({train.per_device_train_batch_size}){across} x "
            f"train.gradient_accumulation_steps ({train.gradient_accumulation_steps}) = {batch} replies per "
            f"generation batch, not a multiple of {stage}.num_generations ({groups}); every prompt needs a whole "
            f"group of {groups} replies")
    if train.eval_steps and (train.per_device_eval_batch_size * processes) % groups:
        raise RecipeError(f"{recipe.path}: train.per_device_eval_batch_size ({train.per_device_eval_batch_size}) "
                          f"must be a multiple of {stage}.num_generations ({groups}) when train.eval_steps is set")


def rollout_metrics(log_history: list[dict[str, Any]], masked_truncated: bool = False) -> dict[str, Any]:
    """Mean reward of the first and last logged training steps, and the last KL to the reference under the names
    ppo and eval use: `kl_last` in nats per sequence, `kl_per_token_last` in nats per token. TRL logs `kl` (its k3
    estimate) as a mean over the loss's completion tokens, so per sequence it is that times the mean completion
    length — unless truncated completions are masked out of the loss, when the two means cover different
    replies and no per-sequence figure is derived (None)."""
    logs = [entry for entry in log_history if "reward" in entry and "train_runtime" not in entry]
    if not logs:
        return {"reward_first": None, "reward_last": None, "kl_last": None, "kl_per_token_last": None,
                "completion_length_last": None, "clipped_ratio_last": None}
    last = logs[-1]
    per_token, length = last.get("kl"), last.get("completions/mean_length")
    return {"reward_first": logs[0]["reward"], "reward_last": last["reward"],
            "kl_last": per_token * length if None not in (per_token, length) and not masked_truncated else None,
            "kl_per_token_last": per_token, "completion_length_last": length,
            "clipped_ratio_last": last.get("completions/clipped_ratio")}
