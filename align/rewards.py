"""One view of a reward model, the one normalisation rule and reward formula, and the reward of grpo and rloo.

`RewardModel` is a reward as everything that scores with one sees it: a reward artifact (or, for
`ppo.reward_model: DIR`, a directory `align export` wrote) with the way it reads text — its own tokenizer, chat
template and max length, whatever the policy uses — the score statistics it recorded, and how to load its
weights. `align score`, `align eval --reward`, the `reward:REF` judge (so `align pairs`), `align ppo` (both
layouts) and the grpo/rloo reward callable all score through it, so one reply gets one score everywhere.

The sequence reward ppo, grpo and rloo optimise (`combine`):

    reward = (score - mean) / std                   the reward model's own eval-pair statistics (normalize_reward)
           + reward_function_weight * judge(reply)  `vader` or `package.module:function` (reward_function)
           - missing_eos_penalty                    for replies cut off at max_new_tokens

For grpo and rloo, `reward_function` is that formula as the callable TRL calls (`reward_funcs`). TRL could score
a sequence-classification model itself, but it would tokenize prompt + completion its own way (no EOS for plain
text, no keep-the-end truncation) and nothing could be added to the raw score. Each part is also logged on its
own (`reward_parts/*`; the reward model's as its raw score), beside TRL's `reward` and `rewards/<name>/mean`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align import integrity, judges, models, scoring
from align.errors import ArtifactError, RecipeError
from align.export import ExportRecord
from align.manifest import ChainEntry, Normalisation
from align.stages.outputs import OnlineReward, RewardManifest

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.data import Message
    from align.recipe import Recipe
    from align.scoring import Item

SCORED_COLUMNS = ("chosen", "rejected", "completion")


@dataclass(frozen=True)
class RewardModel:
    """A reward model as its readers need it, before any weights load (its tokenizer loads when first asked for).

    Built only through `of` (a reward artifact) or `exported` (a model directory), so "is this a reward model"
    is asked in one place."""

    source: str  # its ref, or the exported directory
    needed_by: str  # the recipe field or command that named it, for messages
    base: models.BaseModelSpec  # the base its adapter sits on; an exported directory is its own base
    chain: list[ChainEntry]  # adapters merged into the base under its own, oldest first (none when exported)
    chat_template: str
    max_length: int | None  # the tokens it was trained to read; None (exported): the whole text
    normalisation: Normalisation | None  # its scores' mean/std on its eval pairs, as recorded (None: none)
    artifact: Artifact | None  # None for an exported directory

    @classmethod
    def of(cls, artifact: Artifact, needed_by: str) -> RewardModel:
        """`artifact` as a reward model; an ArtifactError naming `needed_by` when it is another stage's."""
        manifest = artifact.manifest
        if not isinstance(manifest, RewardManifest):
            raise ArtifactError(f"{needed_by} needs a reward artifact: {artifact.ref} is a {manifest.stage} "
                                "artifact, not a reward model (train one with `align reward`)")
        integrity.check_loadable(artifact, None, needed_by)  # damaged files: refused here, before any weights
        adapter = manifest.adapter
        return cls(artifact.ref, needed_by, models.BaseModelSpec.from_manifest(manifest.base_model),
                   list(manifest.adapter_chain), adapter.chat_template, adapter.max_length, adapter.normalisation,
                   artifact)

    @classmethod
    def exported(cls, directory: Path, needed_by: str) -> RewardModel:
        """A plain sequence-classification model directory: `align export` recorded its chat template and score
        statistics beside it (`ExportRecord`), so it reads and normalises as the artifact it came from."""
        record = ExportRecord.of(directory)
        return cls(str(directory), needed_by, models.BaseModelSpec(str(directory), "local", str(directory)), [],
                   (record.chat_template if record else None) or "auto", None,
                   record.normalisation if record else None, None)

    @cached_property
    def tokenizer(self) -> Any:
        """Its own tokenizer: the one saved with the artifact (with its chat template), or the directory's."""
        if self.artifact is None:
            return models.load_tokenizer(self.base, "none")
        return models.load_tokenizer(self.base, "auto", saved_in=self.artifact.path)

    def normalisation_for(self, stage: str) -> Normalisation:
        """Its recorded statistics, refused under the one rule (`reward_normalisation`) when unusable."""
        return reward_normalisation(self.normalisation, self.source, stage)

    def encode(self, items: list[Item]) -> tuple[Any, Any]:
        """input_ids and attention_mask [B, T] of (prompt, reply) items as this model reads them: its tokenizer
        and chat template, right-padded, cut to its max length from the start (`scoring.reward_batch`)."""
        return scoring.reward_batch(self.tokenizer, items, self.chat_template, self.max_length)

    def load(self, registry: Registry | None, *, dtype: Any = None, device: Any = None,
             merge: bool = False) -> RewardScorer:
        """Its weights as a frozen scorer in eval mode, on `device` (None: where they load). `merge` folds the
        adapter into the weights: faster to run, the same scores up to float rounding."""
        if self.artifact is None:
            model = self._load_directory(dtype)
        else:
            model = models.load_reward_model(self.artifact, registry, dtype)[0]
            if merge:
                model = model.merge_and_unload()
        if device is not None:
            model = model.to(device)
        model.eval().requires_grad_(False)
        return RewardScorer(self, model, scoring.classifier_scores(model))

    def _load_directory(self, dtype: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        models.guard_weight_loading(f"the reward model {self.source}")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(self.source, dtype=dtype)
        except Exception as exc:  # transformers raises many types for a directory that is not such a model
            raise RecipeError(f"{self.needed_by}: {self.source} is not a sequence-classification model: "
                              f"{exc}") from None
        if model.config.num_labels != 1:
            raise RecipeError(f"{self.needed_by}: {self.source} has {model.config.num_labels} labels; a reward "
                              "model has 1")
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model


@dataclass
class RewardScorer:
    """A reward model with its weights loaded. `model` holds them (to move, count or free them); `forward` reads
    the scores [B] of a batch `reward.encode` laid out: a sequence classifier's logit or, in ppo's shared layout,
    the reward adapter's last hidden state through its score head."""

    reward: RewardModel
    model: Any
    forward: Callable[[Any, Any], Any]

    def score_items(self, items: list[Item], batch_size: int = 16) -> list[float]:
        """The score of each (prompt messages, reply messages)."""
        return scoring.score_batches(self.forward, self.reward.encode, items,
                                     device=next(self.model.parameters()).device, batch_size=batch_size)

    def score(self, prompts: list[list[Message]], replies: list[str], batch_size: int = 16) -> list[float]:
        """The score of each reply text as the assistant's answer to its prompt."""
        items = [(prompt, [{"role": "assistant", "content": reply}])
                 for prompt, reply in zip(prompts, replies, strict=True)]
        return self.score_items(items, batch_size)


@dataclass
class RowScores:
    """`align score` of data-card rows: per scored column, every row's score; pairwise metrics (accuracy,
    margin_mean, reward_mean, reward_std, pairs) when the rows are preference pairs."""

    rows: int
    columns: list[str]  # of SCORED_COLUMNS, those the rows have
    scores: dict[str, list[float]]
    pairwise: dict[str, float] | None

    def records(self) -> list[dict[str, float]]:
        """One `{"index": i, column: score, ...}` per row (what `--output jsonl` prints)."""
        return [{"index": i, **{column: self.scores[column][i] for column in self.columns}} for i in range(self.rows)]


def score_rows(scorer: RewardScorer, rows: list[dict[str, Any]], batch_size: int = 16) -> RowScores:
    """Score the chosen/rejected/completion replies of canonical rows after their prompts."""
    columns = [key for key in SCORED_COLUMNS if rows and key in rows[0]]
    scores = {key: scorer.score_items([(row["prompt"], row[key]) for row in rows], batch_size) for key in columns}
    pairwise = scoring.pairwise_metrics(scores["chosen"], scores["rejected"]) if "chosen" in scores else None
    return RowScores(len(rows), columns, scores, pairwise)


# ---- the reward online stages optimise --------------------------------------------------------------------------


def reward_normalisation(recorded: Normalisation | None, source: str, stage: str) -> Normalisation:
    """The one normalisation rule of ppo, grpo and rloo: with `normalize_reward` (the default) a reward model's
    score becomes (score - mean) / std with the mean/std it recorded on its eval pairs. A model that recorded
    none, or a std that is not finite and above 1e-6 (every eval score equal), cannot be normalised: that is
    an error naming the way out, never a silent raw score or a division by a tiny epsilon."""
    if recorded is None:
        raise ArtifactError(f"{stage}.normalize_reward: {source} records no score mean/std to normalise with; "
                            f"set {stage}.normalize_reward: false to use its raw scores")
    if not (math.isfinite(recorded.mean) and math.isfinite(recorded.std) and recorded.std > 1e-6):
        raise ArtifactError(f"{stage}.normalize_reward: {source} records a score std of {recorded.std} (its eval "
                            f"scores do not vary), which cannot normalise; set {stage}.normalize_reward: false")
    return recorded


def stage_normalisation(recipe: Recipe, reward: RewardModel | None) -> Normalisation | None:
    """What the recipe's online stage standardises `reward`'s scores with; None with normalize_reward off."""
    section = getattr(recipe, recipe.stage)
    return reward.normalisation_for(recipe.stage) if reward is not None and section.normalize_reward else None


def recipe_reward_model(recipe: Recipe, registry: Registry) -> RewardModel | None:
    """`<stage>.reward_model` of the recipe's online stage: a reward artifact or, for ppo with separate models, a
    plain sequence-classification model directory. Refused here, before anything loads, when it is neither."""
    stage = recipe.stage
    spec = getattr(recipe, stage).reward_model
    where = f"{stage}.reward_model"
    if spec is None:
        return None
    directory = recipe.relative_path(spec)
    if stage == "ppo" and (directory / "config.json").is_file() and not (directory / "manifest.json").exists():
        if recipe.ppo.models == "shared":
            raise RecipeError(f"{recipe.path}: {where}: {directory} is a whole model, not an adapter for the "
                              "policy's base; use ppo.models: separate")
        return RewardModel.exported(directory, where)
    try:
        artifact = registry.resolve(spec)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc}") from None
    return RewardModel.of(artifact, where)


def combine(scores: list[float] | None, normalisation: Normalisation | None, judged: list[float] | None,
            judge_weight: float, ended: list[bool], missing_eos_penalty: float | None) -> list[float]:
    """The sequence reward every online stage (grpo, rloo, ppo) optimises: the reward model's score,
    standardised with its recorded mean/std, + judge_weight x the judge's score - the penalty for a reply cut
    off before EOS. `scores` or `judged` may be None (that part is absent)."""
    total = [0.0] * len(ended)
    if scores is not None:
        if normalisation:
            scores = [(s - normalisation.mean) / normalisation.std for s in scores]
        total = [t + s for t, s in zip(total, scores, strict=True)]
    if judged is not None:
        total = [t + judge_weight * j for t, j in zip(total, judged, strict=True)]
    if missing_eos_penalty:
        total = [t - missing_eos_penalty * (not e) for t, e in zip(total, ended, strict=True)]
    return total


@dataclass
class RewardSpec:
    """The grpo/rloo recipe's reward, resolved and checked before the policy loads (a `reward:` judge loads its
    model)."""

    reward_model: RewardModel | None
    normalisation: Normalisation | None  # None: raw scores (normalize_reward off, or no reward model)
    judge_spec: str | None
    judge_weight: float
    missing_eos_penalty: float | None
    judge: judges.JudgeFn | None = None
    parents: list[tuple[Artifact, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """What TRL logs the callable as (`rewards/<name>/mean`): the parts that make up the reward."""
        parts = ["reward_model"] if self.reward_model else []
        parts += [self.judge_spec.rsplit(":", 1)[-1]] if self.judge_spec else []
        return "+".join(parts)

    def describe(self) -> OnlineReward:
        """The reward as the manifest records it."""
        return OnlineReward(name=self.name, reward_model=self.reward_model.source if self.reward_model else None,
                            normalisation=self.normalisation, reward_function=self.judge_spec,
                            reward_function_weight=self.judge_weight if self.judge_spec else None,
                            missing_eos_penalty=self.missing_eos_penalty)


def resolve(recipe: Recipe, registry: Registry) -> RewardSpec:
    """The online stage section's reward: the reward artifact exists and is a reward model with the statistics
    normalisation needs; the judge (`reward_function`) is loaded."""
    section = getattr(recipe, recipe.stage)
    reward = recipe_reward_model(recipe, registry)
    parents = [(reward.artifact, "reward")] if reward is not None and reward.artifact is not None else []
    judge = None
    if section.reward_function is not None:
        judge, judge_artifact = judges.load_judge(section.reward_function, registry, recipe.path.parent)
        if judge_artifact is not None:
            parents.append((judge_artifact, "reward_function"))
    return RewardSpec(reward, stage_normalisation(recipe, reward), section.reward_function,
                      section.reward_function_weight, section.missing_eos_penalty, judge, parents)


def reward_function(spec: RewardSpec, registry: Registry | None, policy_tokenizer: Any, stop_ids: list[int], *,
                    dtype: Any = None, batch_size: int = 64) -> Callable[..., list[float]]:
    """Load the scorers and return TRL's reward callable `f(prompts, completions, completion_ids, **kw)`.
    `stop_ids` (`generation.stop_token_ids` of the policy): a completion that ends with one of them ended."""
    import torch
    from accelerate import PartialState

    from align.generation import reply_text

    scorer = None
    if spec.reward_model is not None:
        scorer = spec.reward_model.load(registry, dtype=dtype, device=PartialState().device, merge=True)
    judge = spec.judge
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
                scores = scorer.score(messages, replies, batch_size)
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
