"""The reward of online RL stages (`align grpo`, `align rloo`): one Python callable TRL calls as `reward_funcs`.

TRL could score a plain sequence-classification model itself, but then it tokenizes prompt + completion its own
way (no EOS for plain text, no keep-the-end truncation) and nothing can be added to the raw score. So the reward
artifact is merged into a plain scorer here and read exactly as `align score` and `align eval` read it
(`scoring.score_replies`), then:

    reward = (score - mean) / std                   the reward artifact's own eval-pair statistics (normalize_reward)
           + reward_function_weight * judge(reply)  `vader` or `package.module:function` (reward_function)
           - missing_eos_penalty                    for replies cut off at max_new_tokens

Each part is also logged on its own (`reward_parts/*`; the reward model's as its raw score), beside TRL's
`reward` and `rewards/<name>/mean`. `combine` is the same formula for `align ppo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from align import generation, judges, runtime
from align.errors import ArtifactError, RecipeError

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.recipe import Recipe


@dataclass
class RewardSpec:
    """The recipe's reward, resolved and checked before the policy loads (a `reward:` judge loads its model)."""

    reward_artifact: Artifact | None
    normalisation: dict[str, float] | None
    judge_spec: str | None
    judge_weight: float
    missing_eos_penalty: float | None
    judge: Callable[[list[Any], list[str]], list[float]] | None = None
    parents: list[tuple[Artifact, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """What TRL logs the callable as (`rewards/<name>/mean`): the parts that make up the reward."""
        parts = ["reward_model"] if self.reward_artifact else []
        parts += [self.judge_spec.rsplit(":", 1)[-1]] if self.judge_spec else []
        return "+".join(parts)

    def describe(self) -> dict[str, Any]:
        """The reward as the manifest records it."""
        return {"name": self.name,
                "reward_model": self.reward_artifact.ref if self.reward_artifact else None,
                "normalisation": self.normalisation, "reward_function": self.judge_spec,
                "reward_function_weight": self.judge_weight if self.judge_spec else None,
                "missing_eos_penalty": self.missing_eos_penalty}


def resolve(recipe: Recipe, registry: Registry) -> RewardSpec:
    """Check the stage section before anything slow: the reward artifact exists and is a reward model with the
    statistics normalisation needs, and the generation batch holds whole groups of `num_generations` replies."""
    stage = recipe.stage
    section = getattr(recipe, stage)
    check_batch(recipe)
    artifact = normalisation = None
    parents: list[tuple[Artifact, str]] = []
    if section.reward_model is not None:
        try:
            artifact = registry.resolve(section.reward_model)
        except ArtifactError as exc:
            raise ArtifactError(f"{stage}.reward_model: {exc}") from None
        if artifact.manifest.stage != "reward":
            raise ArtifactError(f"{stage}.reward_model: {artifact.ref} is a {artifact.manifest.stage} "
                                "artifact, not a reward model (train one with `align reward`)")
        if section.normalize_reward:
            stats = artifact.manifest.adapter.normalisation
            normalisation = reward_normalisation(stats.model_dump() if stats else None, artifact.ref, stage)
        parents.append((artifact, "reward"))
    judge = None
    if section.reward_function is not None:
        judge, judge_artifact = judges.load_judge(section.reward_function, registry)
        if judge_artifact is not None:
            parents.append((judge_artifact, "reward_function"))
    return RewardSpec(artifact, normalisation, section.reward_function, section.reward_function_weight,
                      section.missing_eos_penalty, judge, parents)


def reward_normalisation(recorded: dict[str, Any] | None, source: str, stage: str) -> dict[str, float]:
    """The one normalisation rule of ppo, grpo and rloo: with `normalize_reward` (the default) a reward model's
    score becomes (score - mean) / std with the mean/std it recorded on its eval pairs. A model that recorded
    none, or a std that is not finite and above 1e-6 (every eval score equal), cannot be normalised: that is
    an error naming the way out, never a silent raw score or a division by a tiny epsilon."""
    import math

    mean, std = (recorded or {}).get("mean"), (recorded or {}).get("std")
    if not isinstance(mean, int | float) or not isinstance(std, int | float):
        raise ArtifactError(f"{stage}.normalize_reward: {source} records no score mean/std to normalise with; "
                            f"set {stage}.normalize_reward: false to use its raw scores")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 1e-6):
        raise ArtifactError(f"{stage}.normalize_reward: {source} records a score std of {std} (its eval scores do "
                            f"not vary), which cannot normalise; set {stage}.normalize_reward: false")
    return {"mean": float(mean), "std": float(std)}


def check_batch(recipe: Recipe) -> None:
    """TRL samples `per_device_train_batch_size x processes x gradient_accumulation_steps` replies per generation
    batch, `num_generations` per prompt; say which recipe fields to change instead of TRL's ValueError."""
    stage, train = recipe.stage, recipe.train
    groups = getattr(recipe, stage).num_generations
    processes = max(runtime.world()[1], recipe.launch.num_processes)
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


def train_and_publish(recipe: Recipe, registry: Registry, *, resume: bool, say: Any, trainer: str,
                      **stage_config: Any) -> Artifact | None:
    """What `align grpo` and `align rloo` share: check the reward and the data (before trl is imported), load,
    train a fresh LoRA with TRL's `{trainer}Trainer` (`stage_config`: its own config fields), publish with the
    reward artifact as a parent."""
    from align import training

    reward = resolve(recipe, registry)
    inputs = training.prepare(recipe, registry, resume=resume, say=say, rows="prompts")
    settings = getattr(inputs.recipe, recipe.stage)
    reward_fn = reward_function(reward, registry, inputs.tokenizer,
                                generation.stop_token_ids(inputs.model, inputs.tokenizer))
    padding_side, inputs.tokenizer.padding_side = inputs.tokenizer.padding_side, "left"  # TRL generates left-padded
    import trl

    online = training.build_trainer(getattr(trl, f"{trainer}Trainer"), getattr(trl, f"{trainer}Config"), inputs,
                                    task_type="CAUSAL_LM", trainer_kwargs={"reward_funcs": [reward_fn]},
                                    **sampling_config(inputs.recipe), **stage_config)
    # TRL's sampling config leaves min_p & co. unset, which generate() would fill from the checkpoint's settings.
    with generation.checkpoint_settings_ignored(online.model, inputs.tokenizer):
        train_metrics = training.train(online, inputs.run)
    inputs.tokenizer.padding_side = padding_side
    metrics = rollout_metrics(online.state.log_history, masked_truncated=settings.mask_truncated_completions)
    return training.publish_adapter(online, inputs, task_type="CAUSAL_LM", metrics=metrics, train_metrics=train_metrics,
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


def reward_function(spec: RewardSpec, registry: Registry, policy_tokenizer: Any, stop_ids: list[int], *,
                    dtype: Any = None, batch_size: int = 64) -> Callable[..., list[float]]:
    """Load the scorers and return TRL's reward callable `f(prompts, completions, completion_ids, **kw)`.
    `stop_ids` (`generation.stop_token_ids` of the policy): a completion that ends with one of them ended."""
    import torch
    from accelerate import PartialState

    from align import models, scoring
    from align.generation import reply_text

    scorer = score_tokenizer = None
    judge = spec.judge
    if spec.reward_artifact is not None:
        artifact = spec.reward_artifact
        peft_model, score_tokenizer = models.load_reward_model(artifact, registry, dtype)
        scorer = peft_model.merge_and_unload().to(PartialState().device).eval()
        scorer.requires_grad_(False)
        rm_template = artifact.manifest.adapter.chat_template
        rm_max_length = artifact.manifest.adapter.max_length
    eos_ids = set(stop_ids)

    def reward(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
               **kwargs: Any) -> list[float]:
        plain = isinstance(prompts[0], str)
        messages = [[{"role": "user", "content": p}] if plain else p for p in prompts]
        if plain:  # decoding the reply alone drops its leading space: decode it after its prompt, as eval does
            prompt_ids = policy_tokenizer(list(prompts))["input_ids"]
            replies = [reply_text(policy_tokenizer, p, c, "none") for p, c in zip(prompt_ids, completion_ids,
                                                                                     strict=True)]
        else:
            replies = [c[-1]["content"].strip() for c in completions]
        log = kwargs.get("log_metric") or (lambda name, value: None)
        scores = judged = None
        with torch.no_grad():
            if scorer is not None:
                items = [(m, [{"role": "assistant", "content": r}]) for m, r in zip(messages, replies, strict=True)]
                scores = scoring.score_replies(scorer, score_tokenizer, items, chat_template=rm_template,
                                               batch_size=batch_size, max_length=rm_max_length)
                log("reward_parts/reward_model", sum(scores) / len(scores))
            if judge is not None:
                judged = judge(messages, replies)
                log("reward_parts/reward_function", sum(judged) / len(judged))
        ended = [bool(ids) and ids[-1] in eos_ids for ids in completion_ids]
        if spec.missing_eos_penalty:
            log("reward_parts/missing_eos", 1 - sum(ended) / len(ended))
        return combine(scores, spec.normalisation, judged, spec.judge_weight, ended, spec.missing_eos_penalty)

    reward.__name__ = spec.name
    return reward


def combine(scores: list[float] | None, normalisation: dict[str, float] | None, judged: list[float] | None,
            judge_weight: float, ended: list[bool], missing_eos_penalty: float | None) -> list[float]:
    """The sequence reward every online stage (grpo, rloo, ppo) optimises: the reward model's score,
    standardised with its recorded mean/std, + judge_weight x the judge's score - the penalty for a reply cut
    off before EOS. `scores` or `judged` may be None (that part is absent)."""
    total = [0.0] * len(ended)
    if scores is not None:
        if normalisation:
            scores = [(s - normalisation["mean"]) / normalisation["std"] for s in scores]
        total = [t + s for t, s in zip(total, scores, strict=True)]
    if judged is not None:
        total = [t + judge_weight * j for t, j in zip(total, judged, strict=True)]
    if missing_eos_penalty:
        total = [t - missing_eos_penalty * (not e) for t, e in zip(total, ended, strict=True)]
    return total


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
