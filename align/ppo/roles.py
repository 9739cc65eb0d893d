"""The four roles PPO needs — policy, reference, value, reward — held either on one base model or as separate models.

Shared (the default): the SFT artifact is merged into the base once; LoRA adapters `policy` (trainable), `value`
(trainable, with a scalar head) and `reward` (frozen, with the reward artifact's score head) sit on that one copy
of the weights, and the reference is the same model with every adapter disabled. Separate: four models, for
comparison (`bench/`) and for reward models trained from a different starting point. Both expose the same
`Roles` interface, so the PPO loop does not know which one it drives.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from align import models, scoring
from align.errors import ArtifactError, RecipeError
from align.models import decoder
from align.online_rewards import reward_normalisation

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.export import ExportRecord
    from align.generation import Message
    from align.manifest import BaseIdentity, ChainEntry
    from align.models import StartingPoint
    from align.recipe import Recipe

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _switch(model: Any, adapter: str, trainable: dict[nn.Parameter, bool]) -> None:
    """Activate one adapter. PEFT's set_adapter also flips requires_grad of every adapter; restore ours, so the
    policy and value adapters both stay trainable and the reward adapter stays frozen."""
    if model.active_adapter != adapter:
        model.set_adapter(adapter)
        for param, flag in trainable.items():
            param.requires_grad_(flag)


class ActorCritic(nn.Module):
    """Policy and value in one module, so one DDP wrapper and one backward cover both. In the shared layout
    `policy` and `value` are the same PeftModel and the forward switches adapters."""

    def __init__(self, policy: Any, value: Any, value_head: nn.Linear) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.value_head = value_head
        self._flags = {p: p.requires_grad for p in self.parameters()}

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The policy model with every adapter off: the reference. PEFT re-enables adapters on exit through
        set_adapter, which flips requires_grad again; restore ours."""
        with self.policy.disable_adapter():
            yield
        for param, flag in self._flags.items():
            param.requires_grad_(flag)

    def use(self, role: str) -> None:
        """Make `role`'s adapter the active one (for generation with the policy)."""
        _switch(self.policy if role == "policy" else self.value, role, self._flags)

    def hidden(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
        self.use(role)
        model = self.policy if role == "policy" else self.value
        return decoder(model)(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids).last_hidden_state  # [B, L, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_width: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs and entropy of the response tokens under the policy, and the value before each of them."""
        responses = input_ids[:, prompt_width:]  # [B, R]
        hidden = self.hidden("policy", input_ids, attention_mask, position_ids)[:, prompt_width - 1:-1]  # [B, R, H]
        logprobs, entropy = models.token_logprobs(self.policy, hidden, responses, temperature, entropy=True)
        value_hidden = self.hidden("value", input_ids, attention_mask, position_ids)[:, prompt_width - 1:-1]
        values = self.value_head(value_hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # [B, R]
        return logprobs, entropy, values

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights PPO trains (policy and value adapters, value head), for checkpoints."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}


@dataclass
class Roles:
    """What the PPO loop drives. `reference` gives the reference body; `score` rates finished replies."""

    actor_critic: ActorCritic
    reference_model: Any  # a separate frozen model, or None: the policy model with its adapters disabled
    reward_model: Any  # the shared PeftModel (reward adapter) or a separate sequence-classification model
    reward_head: nn.Linear | None  # the reward adapter's score head (shared layout only)
    reward_tokenizer: Any
    reward_chat_template: str
    reward_max_length: int | None
    normalisation: dict[str, float] | None
    layout: str

    @property
    def policy(self) -> Any:
        return self.actor_critic.policy

    def weight_bytes(self) -> int:
        """Bytes of distinct weight storage over all four roles (tied and shared tensors counted once): one copy
        of the base plus adapters when shared, four copies when separate."""
        storages: dict[int, int] = {}
        for module in (self.actor_critic, self.reference_model, self.reward_model):
            if module is not None:
                for tensor in itertools.chain(module.parameters(), module.buffers()):
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                           prompt_width: int, temperature: float) -> torch.Tensor:
        """log p_ref of the response tokens [B, R]: the SFT model, i.e. the policy model with adapters off."""
        model = self.reference_model if self.reference_model is not None else self.policy
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.reference_model is None:
            with self.actor_critic.adapters_disabled():
                hidden = decoder(model)(**kwargs).last_hidden_state
        else:
            hidden = decoder(model)(**kwargs).last_hidden_state
        return models.token_logprobs(model, hidden[:, prompt_width - 1:-1], input_ids[:, prompt_width:],
                                     temperature)[0]

    def reward_scores(self, prompts: list[list[Message]], replies: list[str], batch_size: int) -> list[float]:
        """The reward model's score of each reply, tokenised exactly as the reward model was trained."""
        items = [(p, [{"role": "assistant", "content": r}]) for p, r in zip(prompts, replies, strict=True)]
        if self.reward_head is None:
            return scoring.score_replies(self.reward_model, self.reward_tokenizer, items,
                                         chat_template=self.reward_chat_template, batch_size=batch_size,
                                         max_length=self.reward_max_length)
        _switch(self.reward_model, "reward", self.actor_critic._flags)
        scores: list[float] = []
        device = self.reward_head.weight.device
        for start in range(0, len(items), batch_size):
            input_ids, attention = scoring.reward_batch(self.reward_tokenizer, items[start:start + batch_size],
                                                        self.reward_chat_template, self.reward_max_length)
            input_ids, attention = input_ids.to(device), attention.to(device)
            hidden = decoder(self.reward_model)(input_ids=input_ids, attention_mask=attention).last_hidden_state
            # [B] where transformers' sequence classifiers read the score: the last token that is not padding.
            columns = torch.arange(input_ids.shape[1], device=device)
            last = (columns * (input_ids != self.reward_tokenizer.pad_token_id)).argmax(dim=-1)
            picked = hidden[torch.arange(len(input_ids), device=device), last]  # [B, H]
            scores.extend(self.reward_head(picked.to(self.reward_head.weight.dtype)).squeeze(-1).float().tolist())
        return scores


# ---- loading the reward model's pieces ---------------------------------------------------------------------------


def _split_score_head(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A SEQ_CLS adapter's LoRA weights, and its trained score head (saved through modules_to_save)."""
    from safetensors.torch import load_file

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; the reward artifact is incomplete")
    state = load_file(str(path))
    head = [key for key in state if key.split(".")[-2] == "score" or ".score." in key]
    if len(head) != 1:
        raise ArtifactError(f"{adapter_dir}: expected one score-head weight in the reward adapter, found {head}")
    weight = state.pop(head[0])
    return state, weight


def _add_adapter_from(model: Any, name: str, adapter_dir: Path, trainable: bool) -> torch.Tensor:
    """Attach a reward artifact's LoRA under `name` (without its score head, which the causal-LM base lacks)
    and return that score head's weight [1, H]."""
    from peft import PeftConfig, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, not trainable
    state, head = _split_score_head(adapter_dir)
    model.add_adapter(name, config)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise ArtifactError(f"{adapter_dir}: adapter weights that fit no layer: {result.unexpected_keys[:3]}")
    return head


def _head(weight: torch.Tensor | None, hidden: int, trainable: bool, bias: float | None = None) -> nn.Linear:
    """A scalar head, kept in fp32 whatever the body's precision (it is tiny, and the value head is trained).
    `bias` None: no bias (the reward head, as trained); a number: a bias starting at that value."""
    head = nn.Linear(hidden, 1, bias=bias is not None, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(weight if weight is not None else torch.zeros(1, hidden))
        if bias is not None:
            head.bias.fill_(bias)
    head.requires_grad_(trainable)
    return head


def value_head_from_reward(weight: torch.Tensor, normalisation: dict[str, float] | None
                           ) -> tuple[torch.Tensor, float]:
    """The value head's starting weight and bias from a reward head w: returns are in normalised reward units,
    (score - mean) / std = (w / std) . h - mean / std, so the copied head predicts them from the first step
    instead of carrying a position-dependent offset into the advantages."""
    if normalisation is None:
        return weight.float(), 0.0
    return weight.float() / normalisation["std"], -normalisation["mean"] / normalisation["std"]


def _chain_refs(chain: list[ChainEntry]) -> list[str]:
    return [entry.ref for entry in chain]


@dataclass
class RewardReading:
    """How the reward model reads text (its own tokenizer and chat template, its max length) and the
    normalisation of its scores (`online_rewards.reward_normalisation`; None with normalize_reward off)."""

    tokenizer: Any
    chat_template: str
    max_length: int | None
    normalisation: dict[str, float] | None


def _export_record(directory: Path) -> ExportRecord | None:
    """What `align export` recorded beside a plain model directory (chat template, score statistics), or None."""
    from align.export import ExportRecord

    return ExportRecord.of(directory)


def _normalisation(reward: Artifact | Path, recipe: Recipe) -> dict[str, float] | None:
    """The reward's normalisation under the one rule (`online_rewards.reward_normalisation`); None when off."""
    if not recipe.ppo.normalize_reward:
        return None
    if isinstance(reward, Path):
        record = _export_record(reward)
        stats = record.normalisation if record else None
        return reward_normalisation(stats.model_dump() if stats else None, str(reward), "ppo")
    stats = reward.manifest.adapter.normalisation
    return reward_normalisation(stats.model_dump() if stats else None, reward.ref, "ppo")


def _reward_reading(reward: Artifact | Path | None, recipe: Recipe, policy_tokenizer: Any) -> RewardReading:
    if reward is None:
        return RewardReading(policy_tokenizer, recipe.model.chat_template, None, None)
    if isinstance(reward, Path):  # a plain HF model directory; `align export` records its template and statistics
        tokenizer = models.load_tokenizer(models.BaseModelSpec(str(reward), "local", str(reward)), "none")
        record = _export_record(reward)
        return RewardReading(tokenizer, (record.chat_template if record else None) or "auto", None,
                             _normalisation(reward, recipe))
    base = models.BaseModelSpec.from_manifest(reward.manifest.base_model)
    return RewardReading(models.load_tokenizer(base, "auto", saved_in=reward.path),
                         reward.manifest.adapter.chat_template, reward.manifest.adapter.max_length,
                         _normalisation(reward, recipe))


def check_reward(recipe: Recipe, registry: Registry, reward: Artifact | Path | None) -> None:
    """What can be refused about the reward before any weights load: its normalisation statistics and, for a
    separate value model started from it, that it shares the policy's base."""
    if reward is None:
        return
    _normalisation(reward, recipe)
    if recipe.ppo.models == "separate" and recipe.ppo.value_from_reward and not isinstance(reward, Path):
        _value_start(reward, models.resolve_starting_point(recipe, registry), recipe)


def check_output_layer_plain(model: Any, recipe: Recipe) -> None:
    """The recipe check (`recipe._refuse_output_layer_adapters`) by name, repeated on the loaded model for
    output layers named otherwise: PEFT wraps an adapted module, so the output embedding must be a plain one."""
    head = models.lm_head(model)
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save") or hasattr(head, "original_module"):
        raise RecipeError(f"{recipe.path}: lora adapts the output layer ({type(head).__name__}), which align ppo "
                          "does not support: its reference is the model with adapters disabled; adapt the decoder "
                          "layers only")


def _same_base(a: BaseIdentity, b: BaseIdentity) -> bool:
    """Two recorded base identities name the same weights: equal file hashes where both have them (a moved
    registry or model directory is still the same model), else the same location and revision."""
    hashes = [[(f.name, f.sha256) for f in identity.files or []] for identity in (a, b)]
    if all(hashes) and all(sha for files in hashes for _, sha in files):
        return hashes[0] == hashes[1] and a.revision == b.revision
    return (a.location, a.revision) == (b.location, b.revision)


def _value_start(reward: Artifact, start: StartingPoint, recipe: Recipe) -> StartingPoint:
    """Where the value model starts in the separate layout: the reward model's own base and chain, so its copy of
    the reward adapter sits on the weights it was trained on. It reads the policy's tokens, so both must share a
    base (and so a tokenizer)."""
    reward_base = models.BaseModelSpec.from_manifest(reward.manifest.base_model)
    # The policy's base as its parent recorded it (no second hash of the weights), else identified now.
    policy_base = start.parent.manifest.base_model if start.parent else models.base_identity(start.base)
    if not _same_base(reward.manifest.base_model, policy_base):
        raise RecipeError(f"{recipe.path}: ppo.value_from_reward: {reward.ref} was trained on {reward_base.spec}, the "
                          f"policy starts from {start.base.spec}; the value model reads the policy's tokens, so it "
                          "cannot start from this reward model: set ppo.value_from_reward: false")
    return models.StartingPoint(reward_base, None, list(reward.manifest.adapter_chain))


def _load_plain_reward_model(directory: Path, dtype: Any, tokenizer: Any) -> Any:
    """A full sequence-classification model directory (e.g. from `align export`) as a frozen scorer."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=dtype)
    except Exception as exc:  # transformers raises many types for a directory that is not such a model
        raise RecipeError(f"ppo.reward_model: {directory} is not a sequence-classification model: {exc}") from None
    if model.config.num_labels != 1:
        raise RecipeError(f"ppo.reward_model: {directory} has {model.config.num_labels} labels; a reward model has 1")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False)


def build_roles(recipe: Recipe, registry: Registry, start: StartingPoint, policy_base: Any, tokenizer: Any,
                reward: Artifact | Path | None, dtype: Any) -> Roles:
    """Attach (shared) or load (separate) the four roles around `policy_base`, the merged SFT model. `reward` is
    a reward artifact, a plain sequence-classification model directory (separate only), or None."""
    from peft import get_peft_model

    settings = recipe.ppo
    hidden_size = policy_base.config.hidden_size
    policy = get_peft_model(policy_base, models.lora_config(recipe.lora, "CAUSAL_LM"), adapter_name="policy")
    check_output_layer_plain(policy, recipe)
    reading = _reward_reading(reward, recipe, tokenizer)

    def value_head(weight: torch.Tensor | None) -> nn.Linear:
        weight, bias = value_head_from_reward(weight, reading.normalisation) if weight is not None else (None, 0.0)
        return _head(weight, hidden_size, trainable=True, bias=bias)

    if settings.models == "shared":
        if reward is not None and _chain_refs(reward.manifest.adapter_chain) != _chain_refs(start.chain):
            raise RecipeError(
                f"{recipe.path}: ppo.models: shared puts the reward adapter on the policy's starting model "
                f"({' + '.join(_chain_refs(start.chain)) or 'the base'}), but {reward.ref} was trained from "
                f"{' + '.join(_chain_refs(reward.manifest.adapter_chain)) or 'the base'}; "
                "use ppo.models: separate")
        reward_head = value_weight = None
        if reward is not None:
            reward_head = _head(_add_adapter_from(policy, "reward", reward.adapter_path, trainable=False),
                                hidden_size, trainable=False)
        if reward is not None and settings.value_from_reward:
            value_weight = _add_adapter_from(policy, "value", reward.adapter_path, trainable=True)
        else:
            policy.add_adapter("value", models.lora_config(recipe.lora, "CAUSAL_LM"))
        policy.set_adapter("policy")
        for name, param in policy.named_parameters():  # set_adapter froze the others
            param.requires_grad_(".policy." in name or ".value." in name)
        actor_critic = ActorCritic(policy, policy, value_head(value_weight))
        return Roles(actor_critic, None, policy if reward else None, reward_head, reading.tokenizer,
                     reading.chat_template, reading.max_length, reading.normalisation, "shared")

    # Separate: a frozen reference, a value model, a reward model; each its own copy of the weights.
    reference = models.load_starting_model(start, registry, dtype).eval().requires_grad_(False)
    value_weight = None
    if isinstance(reward, Path) or reward is None or not settings.value_from_reward:
        value_base = models.load_starting_model(start, registry, dtype)
        value = get_peft_model(value_base, models.lora_config(recipe.lora, "CAUSAL_LM"), adapter_name="value")
    else:
        value_base = models.load_starting_model(_value_start(reward, start, recipe), registry, dtype)
        value = get_peft_model(value_base, models.lora_config(recipe.lora, "CAUSAL_LM"), adapter_name="scratch")
        value_weight = _add_adapter_from(value, "value", reward.adapter_path, trainable=True)
        value.set_adapter("value")
        value.delete_adapter("scratch")
    for name, param in value.named_parameters():
        param.requires_grad_(".value." in name)
    actor_critic = ActorCritic(policy, value, value_head(value_weight))
    reward_model = None
    if isinstance(reward, Path):
        reward_model = _load_plain_reward_model(reward, dtype, reading.tokenizer)
    elif reward is not None:
        reward_model = models.load_reward_model(reward, registry, dtype)[0].requires_grad_(False)
    return Roles(actor_critic, reference, reward_model, None, reading.tokenizer, reading.chat_template,
                 reading.max_length, reading.normalisation, "separate")
