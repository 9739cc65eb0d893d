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

from align import integrity, models, runtime
from align.errors import ArtifactError, RecipeError
from align.models import decoder
from align.rewards import RewardModel, RewardScorer, stage_normalisation

if TYPE_CHECKING:
    from align.artifacts import Registry
    from align.data import Message
    from align.manifest import BaseIdentity, ChainEntry, Normalisation
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
    `policy` and `value` are the same PeftModel and the forward switches adapters.

    Shared, in one process, the decoder layers below every adapter (the demo adapts the top 10 of 30) give the
    same output to the policy, the value and the reference: `trunk` computes them once per batch, the rollout
    keeps them for the update's epochs, and each role runs only the layers above (`models.above_trunk`)."""

    def __init__(self, policy: Any, value: Any, value_head: nn.Linear) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.value_head = value_head
        self._flags = {p: p.requires_grad for p in self.parameters()}
        shareable = policy is value and runtime.world()[1] == 1
        self._trunk_candidate = models.unadapted_layers(policy) if shareable else 0
        self.trunk_below = 0  # set once a split pass has given exactly a whole pass's numbers (`trunk`)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The policy model with every adapter off: the reference. PEFT re-enables adapters on exit through
        set_adapter, which flips requires_grad again; restore ours."""
        with self.policy.disable_adapter():
            yield
        for param, flag in self._flags.items():
            param.requires_grad_(flag)

    def use(self, role: str) -> None:
        """Make `role`'s adapter the active one: the policy's for generation, the value's, or (shared layout) the
        reward adapter on the same model."""
        _switch(self.policy if role == "policy" else self.value, role, self._flags)

    @torch.no_grad()
    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor | None:
        """The hidden states [B, L, H] entering the first adapted layer, for `forward` and the reference; None
        when nothing is shared (every layer adapted, separate models, several processes) or when, on the first
        batch, the split pass did not give exactly the numbers of a whole pass (a model whose forward treats
        `inputs_embeds` differently): then every pass stays whole."""
        below = self._trunk_candidate
        if not below:
            return None
        trunk = models.trunk_states(self.policy, below, input_ids, attention_mask, position_ids)
        if not self.trunk_below:
            self.use("policy")
            whole = decoder(self.policy)(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids).last_hidden_state
            if not torch.equal(whole, models.above_trunk(self.policy, below, trunk, attention_mask, position_ids)):
                self._trunk_candidate = 0
                return None
            self.trunk_below = below
        return trunk

    def hidden(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               trunk: torch.Tensor | None = None) -> torch.Tensor:
        self.use(role)
        model = self.policy if role == "policy" else self.value
        if trunk is not None:
            return models.above_trunk(model, self.trunk_below, trunk, attention_mask, position_ids)  # [B, L, H]
        return decoder(model)(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids).last_hidden_state  # [B, L, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                prompt_width: int, temperature: float, trunk: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs and entropy of the response tokens under the policy, and the value before each of them.
        `trunk`: this batch's `trunk`, when the roles share it."""
        responses = input_ids[:, prompt_width:]  # [B, R]
        hidden = self.hidden("policy", input_ids, attention_mask, position_ids, trunk)[:, prompt_width - 1:-1]
        logprobs, entropy = models.token_logprobs(self.policy, hidden, responses, temperature, entropy=True)
        value_hidden = self.hidden("value", input_ids, attention_mask, position_ids, trunk)[:, prompt_width - 1:-1]
        values = self.value_head(value_hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # [B, R]
        return logprobs, entropy, values

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights PPO trains (policy and value adapters, value head), for checkpoints."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}


@dataclass
class Roles:
    """What the PPO loop drives. `reference_logprobs` gives the reference; `reward_scores` rates finished replies
    the way the reward model reads them (its tokenizer, chat template and max length), whichever layout holds it."""

    actor_critic: ActorCritic
    reference_model: Any  # a separate frozen model, or None: the policy model with its adapters disabled
    reward_scorer: RewardScorer | None  # the reward adapter on the policy's model (shared), or its own model
    normalisation: Normalisation | None  # what reward scores are standardised with; None: raw scores
    layout: str

    @property
    def reward_model(self) -> Any:
        """The module holding the reward model's weights (in the shared layout, the policy's model too)."""
        return self.reward_scorer.model if self.reward_scorer is not None else None

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
                           prompt_width: int, temperature: float, trunk: torch.Tensor | None = None) -> torch.Tensor:
        """log p_ref of the response tokens [B, R]: the SFT model, i.e. the policy model with adapters off.
        `trunk`: the batch's shared bottom layers (`ActorCritic.trunk`), when there are any."""
        model = self.reference_model if self.reference_model is not None else self.policy
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.reference_model is None:
            with self.actor_critic.adapters_disabled():
                hidden = (decoder(model)(**kwargs).last_hidden_state if trunk is None else
                          models.above_trunk(model, self.actor_critic.trunk_below, trunk, attention_mask,
                                             position_ids))
        else:
            hidden = decoder(model)(**kwargs).last_hidden_state
        return models.token_logprobs(model, hidden[:, prompt_width - 1:-1], input_ids[:, prompt_width:],
                                     temperature)[0]

    def reward_scores(self, prompts: list[list[Message]], replies: list[str], batch_size: int) -> list[float]:
        """The reward model's score of each reply, tokenised exactly as the reward model was trained."""
        return self.reward_scorer.score(prompts, replies, batch_size)


class AdapterScorer(nn.Module):
    """The shared layout's reward model: the reward adapter on the policy's model, its score read by the reward
    artifact's head (kept beside the model, which has a language-model head) at the last token that is not
    padding, where transformers' sequence classifiers read it."""

    def __init__(self, actor_critic: ActorCritic, head: nn.Linear, pad_id: int) -> None:
        super().__init__()
        self.body = actor_critic.policy  # registered first: the scorer's device is the body's
        self.head = head
        self.pad_id = pad_id
        self.activate = lambda: actor_critic.use("reward")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.activate()
        hidden = decoder(self.body)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (columns * (input_ids != self.pad_id)).argmax(dim=-1)  # [B]
        picked = hidden[torch.arange(len(input_ids), device=input_ids.device), last]  # [B, H]
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1)  # [B]


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

    with integrity.loading_adapter(adapter_dir):  # a damaged reward adapter: one ArtifactError naming the file
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


def value_head_from_reward(weight: torch.Tensor, normalisation: Normalisation | None) -> tuple[torch.Tensor, float]:
    """The value head's starting weight and bias from a reward head w: returns are in normalised reward units,
    (score - mean) / std = (w / std) . h - mean / std, so the copied head predicts them from the first step
    instead of carrying a position-dependent offset into the advantages."""
    if normalisation is None:
        return weight.float(), 0.0
    return weight.float() / normalisation.std, -normalisation.mean / normalisation.std


def _chain_refs(chain: list[ChainEntry]) -> list[str]:
    return [entry.ref for entry in chain]


def check_reward(recipe: Recipe, registry: Registry, reward: RewardModel | None) -> None:
    """What can be refused about the reward before any weights load: its normalisation statistics and, for a
    separate value model started from it, that it shares the policy's base."""
    stage_normalisation(recipe, reward)
    if reward is not None and reward.artifact is not None and recipe.ppo.models == "separate" \
            and recipe.ppo.value_from_reward:
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


def _value_start(reward: RewardModel, start: StartingPoint, recipe: Recipe) -> StartingPoint:
    """Where the value model starts in the separate layout: the reward model's own base and chain, so its copy of
    the reward adapter sits on the weights it was trained on. It reads the policy's tokens, so both must share a
    base (and so a tokenizer)."""
    # The policy's base as its parent recorded it (no second hash of the weights), else identified now.
    policy_base = start.parent.manifest.base_model if start.parent else models.base_identity(start.base)
    if not _same_base(reward.artifact.manifest.base_model, policy_base):
        raise RecipeError(f"{recipe.path}: ppo.value_from_reward: {reward.source} was trained on {reward.base.spec}, "
                          f"the policy starts from {start.base.spec}; the value model reads the policy's tokens, so "
                          "it cannot start from this reward model: set ppo.value_from_reward: false")
    return models.StartingPoint(reward.base, None, list(reward.chain))


def build_roles(recipe: Recipe, registry: Registry, start: StartingPoint, policy_base: Any,
                reward: RewardModel | None, dtype: Any) -> Roles:
    """Attach (shared) or load (separate) the four roles around `policy_base`, the merged SFT model. `reward` is
    a reward artifact, a plain sequence-classification model directory (separate only), or None."""
    from peft import get_peft_model

    settings = recipe.ppo
    hidden_size = policy_base.config.hidden_size
    policy = get_peft_model(policy_base, models.lora_config(recipe.lora, "CAUSAL_LM"), adapter_name="policy")
    check_output_layer_plain(policy, recipe)
    normalisation = stage_normalisation(recipe, reward)
    adapter_dir = reward.artifact.adapter_path if reward is not None and reward.artifact is not None else None

    def value_head(weight: torch.Tensor | None) -> nn.Linear:
        weight, bias = value_head_from_reward(weight, normalisation) if weight is not None else (None, 0.0)
        return _head(weight, hidden_size, trainable=True, bias=bias)

    if settings.models == "shared":
        if reward is not None and _chain_refs(reward.chain) != _chain_refs(start.chain):
            raise RecipeError(
                f"{recipe.path}: ppo.models: shared puts the reward adapter on the policy's starting model "
                f"({' + '.join(_chain_refs(start.chain)) or 'the base'}), but {reward.source} was trained from "
                f"{' + '.join(_chain_refs(reward.chain)) or 'the base'}; use ppo.models: separate")
        reward_head = value_weight = None
        if adapter_dir is not None:
            reward_head = _head(_add_adapter_from(policy, "reward", adapter_dir, trainable=False), hidden_size,
                                trainable=False)
        if adapter_dir is not None and settings.value_from_reward:
            value_weight = _add_adapter_from(policy, "value", adapter_dir, trainable=True)
        else:
            policy.add_adapter("value", models.lora_config(recipe.lora, "CAUSAL_LM"))
        policy.set_adapter("policy")
        for name, param in policy.named_parameters():  # set_adapter froze the others
            param.requires_grad_(".policy." in name or ".value." in name)
        actor_critic = ActorCritic(policy, policy, value_head(value_weight))
        scorer = None
        if reward is not None and reward_head is not None:
            module = AdapterScorer(actor_critic, reward_head, reward.tokenizer.pad_token_id)
            scorer = RewardScorer(reward, module, module)
        return Roles(actor_critic, None, scorer, normalisation, "shared")

    # Separate: a frozen reference, a value model, a reward model; each its own copy of the weights.
    reference = models.load_starting_model(start, registry, dtype).eval().requires_grad_(False)
    value_weight = None
    if reward is None or adapter_dir is None or not settings.value_from_reward:  # the value starts afresh
        value_base = models.load_starting_model(start, registry, dtype)
        value = get_peft_model(value_base, models.lora_config(recipe.lora, "CAUSAL_LM"), adapter_name="value")
    else:
        value_base = models.load_starting_model(_value_start(reward, start, recipe), registry, dtype)
        value = get_peft_model(value_base, models.lora_config(recipe.lora, "CAUSAL_LM"), adapter_name="scratch")
        value_weight = _add_adapter_from(value, "value", adapter_dir, trainable=True)
        value.set_adapter("value")
        value.delete_adapter("scratch")
    for name, param in value.named_parameters():
        param.requires_grad_(".value." in name)
    actor_critic = ActorCritic(policy, value, value_head(value_weight))
    scorer = reward.load(registry, dtype=dtype) if reward is not None else None
    return Roles(actor_critic, reference, scorer, normalisation, "separate")
