"""Recipe schema: one YAML file per stage run, validated strictly (device-aware defaults: `align.device`).

Field names follow TRL/PEFT where they exist (`learning_rate`, `per_device_train_batch_size`, `r`, `lora_alpha`)
so users' habits carry over. Paths inside a recipe are relative to the recipe file; the registry root
(`output.root`) is relative to the working directory, like the `artifacts/` folder it names.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from align.errors import RecipeError
from align.hashing import sha256_json
from align.stages import STAGES
from align.yamlio import apply_override, describe_validation_error, load_yaml


def _stage_sections() -> dict[str, frozenset[str]]:
    """The optional sections each stage takes, from the stage registry."""
    return {name: stage.sections for name, stage in STAGES.items()}


# The loss types TRL 1.16's DPOTrainer implements (tests check this list against TRL's source).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


# Attention kernels transformers implements without a hub download (`align.models.check_attention` checks each
# one's package and device before weights load).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


class QuantizationSection(_Section):
    """QLoRA (Dettmers et al. 2023): the base's linear layers held in 4 or 8 bits by bitsandbytes while LoRA
    trains in higher precision on top (`align.quantization`)."""

    bits: Literal[4, 8] = Field(description="4: NF4/FP4 weights (QLoRA); 8: LLM.int8() weights")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit only: NF4 (QLoRA's normal float) or FP4")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="4-bit only: the dtype dequantised weights compute in; auto: the run's precision")
    double_quant: bool = Field(True, description="4-bit only: quantise the per-block scales too "
                                                 "(about 0.37 bits per parameter less)")

    @model_validator(mode="after")
    def _four_bit_options(self) -> QuantizationSection:
        named = sorted({"quant_type", "compute_dtype", "double_quant"} & self.model_fields_set)
        if self.bits == 8 and named:
            raise ValueError(f"{', '.join(named)} apply to bits: 4 only (8-bit weights use LLM.int8())")
        return self


class ModelSection(_Section):
    """Where the starting weights come from: a base model, or an earlier artifact (its chain merged in memory)."""

    base: str | None = Field(None, description="Hub id, local HF directory, .gguf file, or pkg:<module>/<file>.gguf")
    from_: str | None = Field(None, alias="from", description="Artifact reference NAME@vN, NAME@latest or a path")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id")
    trust_remote_code: bool = False
    chat_template: Literal["auto", "default", "none"] = Field(
        "auto", description="auto: the model's own, else align's default; default: always align's; none: plain text"
    )
    quantization: QuantizationSection | None = Field(
        None, description="Train LoRA on a 4- or 8-bit base (QLoRA, bitsandbytes); None: the base in the precision")
    attn_implementation: Literal[ATTENTION_IMPLEMENTATIONS] = Field(
        "sdpa", description="Attention kernel: sdpa (PyTorch's), eager, flash_attention_2 (flash-attn, GPUs), "
                            "flex_attention")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.base is None) == (self.from_ is None):
            raise ValueError("give exactly one of 'base' (a model) or 'from' (an artifact reference)")
        return self


class DataSection(_Section):
    card: str = Field(description="Data card path (relative to the recipe file), or a pairs artifact NAME@vN")
    limit: int | None = Field(None, gt=0, description="Use at most this many training rows")
    eval_limit: int | None = Field(None, gt=0, description="Use at most this many eval rows")


class LoraSection(_Section):
    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    layers_to_transform: list[int] | None = Field(
        None, description="Only these decoder layers get adapters; with only top layers, backward stops early "
                          "(about 2x faster training on CPU)")

    @model_validator(mode="after")
    def _layers_need_module_names(self) -> LoraSection:
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("layers_to_transform needs target_modules as a list of module names (PEFT's rule), "
                             "e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]")
        return self


class TrainSection(_Section):
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Positive: stop after this many optimizer steps (overrides epochs); "
                                           "-1: train for num_train_epochs")
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0, description="Tokens per example; longer examples are truncated")
    warmup_steps: float = Field(0.0, ge=0, description="Below 1: a fraction of the total steps")
    lr_scheduler_type: str = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool | None = Field(None, description="None: off on CPU, on for GPUs")
    optim: str | None = Field(None, description="None: adamw_torch on CPU, adamw_torch_fused on GPUs")
    packing: bool = False
    group_by_length: bool = Field(
        True, description="Batch training rows of similar token length (SFT, DPO, reward): fewer pad tokens, "
                          "measured 14% -> 1% of SFT batches on the demo (bench/padding.py); false: uniformly "
                          "random batches")
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="None: evaluate before and after training only")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (for --resume)")
    save_total_limit: int = Field(2, gt=0)
    report_to: list[str] = Field(default_factory=lambda: ["none"])
    dataloader_num_workers: int = Field(0, ge=0)
    use_liger_kernel: bool = Field(False, description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched in by "
                                                      "transformers' Trainer (TRL's flag): needs liger-kernel and a "
                                                      "GPU; TRL's trainers only (not ppo)")

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"{value} is not a step count: use a positive number of optimizer steps, or -1 to "
                             "train for num_train_epochs")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class SftSection(_Section):
    completion_only_loss: bool = Field(True, description="Loss on the assistant reply only, not the prompt")
    num_samples: int = Field(4, ge=0, description="Eval prompts generated before and after training")
    max_new_tokens: int = Field(48, gt=0)


class RewardSection(_Section):
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Pull mean rewards towards 0 (Eisenstein et al. 2023); TRL's name; 0.01 is typical"
    )
    eval_before: bool = Field(True, description="Score the held-out pairs before training too "
                                                "(eval_accuracy_before): a baseline for the accuracy after, "
                                                "near chance since the score head starts random")


class DpoSection(_Section):
    """Direct preference optimisation (Rafailov et al. 2023) with TRL's names; the reference is the starting
    model itself (LoRA disabled), so no second copy of the weights is held."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model")
    loss_type: list[Literal[DPO_LOSS_TYPES]] = Field(default_factory=lambda: ["sigmoid"],
                                                     description="One loss or several combined (MPO)")
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type when combining")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Robust DPO / EXO label noise")
    precompute_ref_log_probs: bool = Field(False, description="Score the reference once before training")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _weights_match(self) -> DpoSection:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
        return self


class KtoSection(_Section):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024) with TRL's names: each reply is judged alone
    (desirable or not) against the reference, which is the starting model itself (LoRA disabled)."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="kto: against a batch KL estimate; "
                                                                              "apo_zero_unpaired: without it")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable rows' losses (raise it when they "
                                                           "are fewer: the KTO paper's Eq. 8)")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable rows' losses")
    precompute_ref_log_probs: bool = Field(False, description="Score the reference once before training")


class OrpoSection(_Section):
    """Odds-ratio preference optimisation (Hong et al. 2024), TRL's ORPOTrainer: SFT loss on the chosen reply plus
    a log-odds-ratio penalty against the rejected one; no reference model, so nothing holds the policy near its
    start but that SFT term."""

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term beside the chosen reply's NLL "
                                               "(the paper's lambda)")


class SimpoSection(_Section):
    """Simple preference optimisation (Meng et al. 2024) through TRL's CPOTrainer (`loss_type: simpo`): the
    margin between the average log-probabilities of the chosen and the rejected reply, no reference model."""

    beta: float = Field(2.0, gt=0, description="Reward scale (the paper uses 2.0-2.5)")
    gamma: float = Field(0.5, ge=0, description="Target reward margin (TRL's simpo_gamma)")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen reply (CPO-SimPO); "
                                                    "0: plain SimPO")


class PairsSection(_Section):
    """Sample K replies per prompt from the policy, score them with a judge, keep the contrasting ones."""

    judge: str = Field("vader", description="vader | reward:NAME@vN | package.module:function")
    num_samples: int = Field(4, ge=2, description="Replies sampled per prompt (K)")
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, gt=0, description="Prompts x samples generated together")
    selection: Literal["best_worst", "all_pairs"] = Field(
        "best_worst", description="best_worst: one pair per prompt; all_pairs: every ordered pair above min_margin"
    )
    min_margin: float = Field(0.0, ge=0, description="Keep a pair only when its judge scores differ by more")
    # A reply cut at max_new_tokens has no stop token; trained as it stands, DPO would close it (EOS or the
    # template's end of turn) and so teach the model to stop where it was cut.
    truncated: Literal["drop", "keep_open", "keep"] = Field(
        "drop", description="Replies cut off at max_new_tokens: drop: never paired | keep_open: paired, and DPO "
                            "appends no EOS or end of turn after them | keep: paired and closed as if they ended")
    seed: int = 0


class _RlSection(_Section):
    """What online RL stages share: how replies are sampled and what rewards them."""

    reward_model: str | None = Field(None, description="Reward artifact NAME@vN (or, with ppo.models: separate, a "
                                                       "Hugging Face sequence-classification model directory)")
    reward_function: str | None = Field(None, description="Extra reward: vader | package.module:function(prompts, "
                                                          "replies) -> list[float]")
    reward_function_weight: float = Field(1.0, description="Weight of reward_function beside the reward model")
    normalize_reward: bool = Field(True, description="Standardise reward-model scores with the mean/std the "
                                                     "reward artifact recorded on its eval pairs")
    max_new_tokens: int = Field(48, gt=0, description="Reply length limit; sampling also stops at EOS")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the reward of replies cut "
                                                                      "off at max_new_tokens (no EOS)")

    @model_validator(mode="after")
    def _some_reward(self) -> _RlSection:
        if self.reward_model is None and self.reward_function is None:
            raise ValueError("give a reward: 'reward_model' (a reward artifact), 'reward_function', or both")
        return self

    @model_validator(mode="after")
    def _full_softmax_sampling(self) -> _RlSection:
        if self.top_p < 1:
            raise ValueError("top_p < 1 is not supported by online RL: the importance ratios and KL penalty use the "
                             "whole softmax(logits / temperature), so nucleus sampling would train on another policy "
                             "than the one that sampled; use temperature to sharpen sampling")
        return self


class PpoSection(_RlSection):
    """PPO for RLHF (Ouyang et al. 2022; Huang et al. 2024): one base model, policy/value/reward adapters,
    the reference is the base with adapters off. Optimizer steps per rollout = num_ppo_epochs x
    rollout_batch_size / (per_device_train_batch_size x gradient_accumulation_steps)."""

    models: Literal["shared", "separate"] = Field(
        "shared", description="shared: one copy of the weights, roles switch adapters; separate: four models")
    rollout_batch_size: int = Field(32, gt=0, description="Prompts sampled per PPO step, per process")
    num_ppo_epochs: int = Field(2, gt=0, description="Passes over each rollout batch")
    kl_coef: float = Field(0.1, gt=0, description="Per-token KL penalty against the reference (kept on: "
                                                  "without it the policy games the reward model)")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="k1: log-ratio; k3: (r - 1) - log r, never negative")
    target_kl: float | None = Field(None, gt=0, description="Adaptive KL controller: nats per reply to aim for")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller horizon, in replies")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    whiten_rewards: bool = False
    value_from_reward: bool = Field(True, description="Initialise the value adapter and head from the reward "
                                                      "model (InstructGPT), on the reward's scale after "
                                                      "normalisation; else a fresh adapter and a zero head")


class _GroupSection(_RlSection):
    """What TRL's critic-free trainers share: several replies per prompt, each judged against the others."""

    beta: float = Field(0.1, gt=0, description="KL coefficient (TRL defaults to 0; kept on here: see README)")
    num_generations: int = Field(4, ge=2, description="Replies per prompt forming one group")
    epsilon: float = Field(0.2, gt=0)
    num_iterations: int = Field(1, gt=0)
    mask_truncated_completions: bool = Field(
        False, description="Leave replies cut off at max_new_tokens out of the loss (TRL's option): they did not "
                           "end, so their last tokens should not be reinforced as an ending")


class GrpoSection(_GroupSection):
    """TRL's GRPOTrainer: group-relative advantages, no value model."""

    scale_rewards: Literal["group", "batch", "none"] = "group"


class RlooSection(_GroupSection):
    """TRL's RLOOTrainer: REINFORCE with a leave-one-out baseline (each reply against the others), no value model."""

    normalize_advantages: bool = False


class LaunchSection(_Section):
    """How many processes on how many machines, and how they share the model (align.launch)."""

    preset: Literal["ddp", "fsdp2", "zero2", "zero3", "zero3-offload"] | None = Field(
        None, description="An Accelerate config under recipes/accelerate/ (None with several processes: ddp)")
    accelerate_config: str | None = Field(None, description="Your own Accelerate config file, instead of a preset")
    num_processes: int | None = Field(None, gt=0, description="Processes of all machines together; above 1 (or "
                                                              "with a preset) align re-launches itself with "
                                                              "`accelerate launch`; None: the config's, else 1")
    num_machines: int = Field(1, gt=0)
    machine_rank: int = Field(0, ge=0, description="This machine's rank (0 = the one at main_process_ip)")
    main_process_ip: str | None = Field(None, description="Address of machine 0 (needed with num_machines > 1)")
    main_process_port: int | None = Field(None, gt=0, lt=65536)

    @model_validator(mode="after")
    def _one_config(self) -> LaunchSection:
        if self.preset and self.accelerate_config:
            raise ValueError("give either preset or accelerate_config, not both")
        return self


class OutputSection(_Section):
    root: str = Field("artifacts", description="Registry root, relative to the working directory")


OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output_layer")


def _refuse_output_layer_adapters(lora: LoraSection) -> None:
    """PPO's reference is "adapters disabled" and its log-probs project hidden states with the output layer
    outside PEFT's forward, in chunks recomputed during backward, while roles switch adapters: an adapted output
    layer would score the reference and the policy through whichever adapter happens to be active."""
    # A string target is a regex or "all-linear" (which PEFT never applies to the output layer): the check on the
    # loaded model (`ppo.roles.check_output_layer_plain`) covers it without guessing what a regex matches.
    targets = [] if isinstance(lora.target_modules, str) else lora.target_modules
    named = [name for name in [*targets, *(lora.modules_to_save or [])]
             if name.rsplit(".", 1)[-1] in OUTPUT_LAYER_NAMES]
    if named:
        raise ValueError(f"lora: {', '.join(named)} adapts the output layer, which align ppo does not support: "
                         "its reference is the model with adapters disabled and its log-probs use the output "
                         "layer directly; adapt the decoder layers only")


def _model_options_fit_stage(recipe: Recipe) -> None:
    """QLoRA and Liger kernels where the stage can use them: quantisation for stages that train an adapter (ppo
    in its shared layout: one quantised base for all four roles), Liger for TRL's trainers."""
    trains = STAGES[recipe.stage].task_type is not None
    if recipe.model.quantization is not None:
        if not trains:
            raise ValueError(f"model.quantization applies to stages that train an adapter; align {recipe.stage} "
                             "samples with the whole model in the run's precision")
        if recipe.stage == "ppo" and recipe.ppo.models == "separate":
            raise ValueError("model.quantization with ppo.models: separate: quantisation shares one 4/8-bit base "
                             "between policy, value, reward and reference (ppo.models: shared)")
    if recipe.train.use_liger_kernel and recipe.stage == "ppo":
        raise ValueError("train.use_liger_kernel applies to TRL's trainers; align ppo runs its own loop")


class Recipe(_Section):
    stage: str = Field(description="The stage this recipe runs: `align <stage> RECIPE` (see align.stages)")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,  # artifacts.MAX_NAME_LENGTH
                      description="Artifact name to publish under")
    description: str = ""
    model: ModelSection
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    sft: SftSection = Field(default_factory=SftSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    pairs: PairsSection = Field(default_factory=PairsSection)
    dpo: DpoSection = Field(default_factory=DpoSection)
    kto: KtoSection = Field(default_factory=KtoSection)
    orpo: OrpoSection = Field(default_factory=OrpoSection)
    simpo: SimpoSection = Field(default_factory=SimpoSection)
    ppo: PpoSection | None = None
    grpo: GrpoSection | None = None
    rloo: RlooSection | None = None
    launch: LaunchSection = Field(default_factory=LaunchSection)
    output: OutputSection = Field(default_factory=OutputSection)

    _path: Path = PrivateAttr(default=Path("recipe.yaml"))

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, value: str) -> str:
        known = _stage_sections()
        if value not in known:
            raise ValueError(f"unknown stage '{value}' (known: {', '.join(known)})")
        return value

    @model_validator(mode="after")
    def _sections_match_stage(self) -> Recipe:
        sections = _stage_sections()
        allowed = sections[self.stage]
        for section in set().union(*sections.values()) - allowed:
            if section in self.model_fields_set:
                raise ValueError(f"section '{section}' does not apply to stage '{self.stage}' "
                                 f"(it takes: {', '.join(sorted(allowed))})")
        # A section with no defaults to fall back on (the reward of online RL) must be written out.
        if getattr(self, self.stage) is None:
            raise ValueError(f"stage '{self.stage}' needs a '{self.stage}' section naming at least its reward "
                             f"(e.g. {self.stage}: {{reward_model: NAME@latest}})")
        if self.stage == "ppo":
            _refuse_output_layer_adapters(self.lora)
        _model_options_fit_stage(self)
        if self.stage == "kto" and self.kto.loss_type == "kto" and self.train.per_device_train_batch_size < 2:
            # TRL estimates KTO's KL term from the other rows of the batch; it refuses a batch of one after loading.
            raise ValueError("train.per_device_train_batch_size: kto needs at least 2 rows per batch (its KL term "
                             "pairs each prompt with another row's reply); or use kto.loss_type: apo_zero_unpaired")
        return self
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    @property
    def path(self) -> Path:
        return self._path

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides

    def relative_path(self, value: str) -> Path:
        """A path written in the recipe, resolved against the recipe file's directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._path.parent / path).resolve()

    def to_dict(self) -> dict[str, Any]:
        """The recipe as data, with only the sections its stage uses (manifests, `recipe show`, hashing)."""
        sections = _stage_sections()
        unused = set().union(*sections.values()) - sections[self.stage]
        return self.model_dump(mode="json", by_alias=True, exclude=unused)

    def sha256(self) -> str:
        return sha256_json(self.to_dict())


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None) -> Recipe:
    """Read, override and validate a recipe; every mistake becomes one RecipeError naming file, line and key."""
    path = Path(path)
    data, lines = load_yaml(path, RecipeError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections, not {type(data).__name__}")
    data = copy.deepcopy(data)
    for override in overrides:
        apply_override(data, override, lines, RecipeError)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(describe_validation_error(path, exc, lines, Recipe)) from None
    if stage is not None and recipe.stage != stage:
        line = lines.get(("stage",))
        where = f"{path}:{line}" if line else str(path)
        raise RecipeError(f"{where}: stage: this recipe is for `align {recipe.stage}`, not `align {stage}`")
    recipe._path = path.resolve()
    recipe._overrides = tuple(overrides)
    return recipe
