"""`align ppo`: our own PPO (TRL 1.16 has none) from an SFT artifact against a reward artifact.

Steps: prompt card -> prompts; SFT artifact merged into the base in memory; policy, value and reward adapters
on that one copy (`align/ppo/roles.py`); the loop (`align/ppo/trainer.py`); reward-model score of held-out
replies before (the SFT model) and after; publish the policy adapter, with the value adapter beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from align import generation, judges, models, redaction, rewards, runtime, training
from align.artifacts import Artifact, Registry
from align.ppo import roles as ppo_roles
from align.ppo import trainer as ppo_trainer
from align.ppo.rollout import sequence_scores
from align.recipe import Recipe


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one PPO policy adapter. Returns the artifact on the main process, None elsewhere."""
    reward = rewards.recipe_reward_model(recipe, registry)
    ppo_roles.check_reward(recipe, registry, reward)
    reward_fn = (judges.load_judge(recipe.ppo.reward_function, registry, recipe.path.parent)[0]
                 if recipe.ppo.reward_function else None)
    ppo_trainer.check_batch_sizes(recipe)
    inputs = training.prepare(recipe, registry, resume=resume, say=say)
    recipe, data, run_state, tokenizer = inputs.recipe, inputs.data, inputs.run, inputs.tokenizer
    from accelerate import Accelerator

    # Under `accelerate launch` this joins the process group; TensorBoard files go to the run's logs/.
    accelerator = Accelerator(cpu=run_state.device["type"] == "cpu", project_dir=str(run_state.run_dir / "logs"),
                              log_with=training.trackers(recipe.train.report_to) or None,
                              mixed_precision={"fp32": "no"}.get(recipe.train.precision, recipe.train.precision))
    runtime.wait_for_everyone()  # rank 0 may have just cleared the checkpoints of an older run
    torch.manual_seed(recipe.train.seed)  # fresh LoRA weights: the same on every rank and every resume
    dtype = models.weight_dtype(recipe.train.precision, run_state.device["type"])
    holder = ppo_roles.build_roles(recipe, registry, run_state.start, inputs.model, reward, dtype)
    for module in (holder.actor_critic, holder.reference_model, holder.reward_model):
        if module is not None:
            module.to(accelerator.device).eval()  # no dropout anywhere: see align/ppo/trainer.py
    if accelerator.log_with:
        accelerator.init_trackers(recipe.name, config=redaction.redact(recipe.to_dict()))

    prompts = [row["prompt"] for row in data.train]
    eval_prompts = [row["prompt"] for row in data.eval]
    # Sampling and scoring compute in the precision the policy trains in (accelerate's autocast: bf16 on CPUs
    # with bf16 units), so the log-probs PPO compares describe the replies as they were sampled.
    with accelerator.autocast():
        before = _eval_scores(holder, tokenizer, eval_prompts, recipe, reward_fn, policy=False)
    history = ppo_trainer.train(holder, tokenizer, prompts, recipe, run_state, accelerator, reward_fn)
    with accelerator.autocast():
        after = _eval_scores(holder, tokenizer, eval_prompts, recipe, reward_fn, policy=True)
    accelerator.end_training()

    last = history[-1]
    metrics = {
        **{f"eval_{key}_before": value for key, value in before.items()},
        **{f"eval_{key}": value for key, value in after.items()},
        "reward_first": history[0]["reward"],
        "reward_last": last["reward"],
        "kl_last": last["kl"],
        "kl_per_token_last": last["kl_per_token"],
        "kl_coef_last": last["kl_coef"],
        "entropy_last": last["entropy"],
        "response_length_last": last["response_length"],
        "global_step": last["step"],
        **data.counts(),  # rows read, dropped by reason, and used (train_rows, eval_rows)
        "models": holder.layout,
        "weights_mib": holder.weight_bytes() / 2**20,
    }
    final = run_state.run_dir / "final"
    _save_adapters(holder, final)

    def write_files(staging: Path) -> None:
        shutil.copytree(final / "policy", staging / "adapter")
        shutil.copytree(final / "value", staging / "value")
        tokenizer.save_pretrained(str(staging))
        training.write_json(staging / "log_history.json", history)

    adapter = training.adapter_info(
        recipe, value="value/: the value adapter and value_head.safetensors (its scalar head: weight, bias)")
    # A plain model directory is not an artifact, so not a parent: record what it was.
    exported = reward is not None and reward.artifact is None
    plain_reward = models.base_identity(reward.base) if exported else None
    details = {"adapter": adapter, "ppo": recipe.ppo.model_dump(), "reward_model": plain_reward}
    return training.publish(run_state, write_files=write_files, metrics=metrics, details=details,
                            extra_parents=[(reward.artifact, "reward")] if reward and reward.artifact else [])


def _save_adapters(holder: ppo_roles.Roles, final: Path) -> None:
    """`final/policy` (a plain PEFT adapter directory, loadable as the artifact's adapter) and `final/value`."""
    from safetensors.torch import save_file

    if runtime.is_main_process():
        shutil.rmtree(final, ignore_errors=True)
        scratch = final / "scratch"
        critic = holder.actor_critic
        critic.policy.save_pretrained(str(scratch / "policy"), selected_adapters=["policy"])
        critic.value.save_pretrained(str(scratch / "value"), selected_adapters=["value"])
        for role in ("policy", "value"):
            # PEFT writes an adapter not named "default" into a subdirectory of that name.
            saved = scratch / role / role if (scratch / role / role).is_dir() else scratch / role
            shutil.move(str(saved), str(final / role))
        save_file({name: param.detach().cpu().contiguous() for name, param in critic.value_head.named_parameters()},
                  str(final / "value" / "value_head.safetensors"))
        shutil.rmtree(scratch)
    runtime.wait_for_everyone()


def _eval_scores(holder: ppo_roles.Roles, tokenizer: Any, prompts: list[Any], recipe: Recipe, reward_fn: Any,
                 policy: bool) -> dict[str, float | None]:
    """Mean reward of sampled replies to the held-out prompts, from the policy or (policy=False) the reference."""
    if not prompts:
        return {"reward": None, "eos_fraction": None, "response_length": None, "score": None}
    settings = recipe.ppo
    sampling = {"chat_template": recipe.model.chat_template, "max_new_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p, "seed": recipe.train.seed,
                "batch_size": recipe.train.per_device_eval_batch_size}
    model = holder.actor_critic.policy
    if policy:
        holder.actor_critic.use("policy")
        samples = generation.generate_samples(model, tokenizer, prompts, **sampling)
    elif holder.reference_model is not None:
        samples = generation.generate_samples(holder.reference_model, tokenizer, prompts, **sampling)
    else:
        with holder.actor_critic.adapters_disabled():
            samples = generation.generate_samples(model, tokenizer, prompts, **sampling)
    with torch.no_grad():
        total, raw, ended = sequence_scores(holder, prompts, samples, settings, reward_fn,
                                            recipe.train.per_device_eval_batch_size)
    result = {"reward": total.mean().item(), "eos_fraction": ended.float().mean().item(),
              "response_length": sum(len(s.reply_ids) for s in samples) / len(samples),
              "score": raw.mean().item() if raw is not None else None}
    return result
