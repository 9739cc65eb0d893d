"""`align eval`: how a policy artifact differs from its parent on held-out prompts, with fluency guards.

Both models are one object: the parent (base + adapter chain, merged) with the artifact's adapter attached;
`disable_adapter()` gives the parent, which is also the KL/NLL reference (DPO's and PPO's reference). Every
score is a mean over prompts x samples from a fixed sampling seed; its standard error is clustered by prompt
(computed over per-prompt means), because the samples of one prompt are not independent of each other.

The parent's side (its samples and its own log-probs of them) depends on the parent alone, and every policy
trained from one parent is compared with it on the same prompts and seed: it is sampled once per registry and
read back from `align.sample_cache` after that. Everything runs in one precision (`--precision`, resolved by
`device.resolve_precision` like the stages' `train.precision`): fp32 weights on CPU with bf16 autocast where the
CPU has bf16 units and the model is large enough to gain from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align import generation, judges, models, runtime, sample_cache
from align.device import detect_device, resolve_precision
from align.errors import ArtifactError
from align.eval_result import EVAL_FILE, EvalResult, EvalSettings
from align.rewards import RewardModel
from align.stages import stages_producing

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.generation import Sample


# ---- pure metrics --------------------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); stderr 0 for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def clustered_mean_stderr(values: Sequence[float], group_size: int) -> tuple[float, float]:
    """Mean of `values` and its standard error clustered by group: `values` are laid out group-major
    (`group_size` consecutive values per prompt) and the standard error is that of the per-group means.

    The samples of one prompt share that prompt, so their scores are correlated: treating prompts x samples as
    independent understates the standard error (by up to sqrt(group_size) when a prompt's samples agree).
    With equal group sizes the mean of group means is the plain mean. Stderr 0 with fewer than 2 groups."""
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, not {group_size}")
    if not values or len(values) % group_size:
        raise ValueError(f"{len(values)} values do not split into groups of {group_size}")
    groups = [values[i:i + group_size] for i in range(0, len(values), group_size)]
    return mean_stderr([sum(group) / group_size for group in groups])


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Share of unique word n-grams among all n-grams of all texts: low values mean repetitive, collapsed text."""
    grams = [tuple(words[i:i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def paired_delta(policy: Sequence[float], baseline: Sequence[float], group_size: int) -> tuple[float, float]:
    """Mean of policy - baseline over paired samples (same prompt, same sample index) and its stderr clustered by
    prompt: pairing cancels how hard each prompt is, so this stderr is smaller than the two sides' combined."""
    if len(policy) != len(baseline):
        raise ValueError("a paired difference needs equally many scores on both sides")
    return clustered_mean_stderr([a - b for a, b in zip(policy, baseline, strict=True)], group_size)


def wins(policy: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per paired sample: 1 when the policy scores higher, 0.5 on a tie, 0 otherwise."""
    if len(policy) != len(baseline) or not policy:
        raise ValueError("win rate needs equally many, and some, paired scores")
    return [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, baseline, strict=True)]


def win_rate(policy: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of paired samples where the policy scores higher; ties count half."""
    outcomes = wins(policy, baseline)
    return sum(outcomes) / len(outcomes)


def win_rate_stderr(policy: Sequence[float], baseline: Sequence[float], group_size: int) -> float:
    """Standard error of the win rate, clustered by prompt: over the per-prompt win shares."""
    return clustered_mean_stderr(wins(policy, baseline), group_size)[1]


def kl_note(temperature: float, top_p: float) -> str | None:
    """Why KL(policy || parent) over the full softmax at `temperature` would not describe what was sampled, or
    None when it does. Greedy decoding is a point mass, not softmax(logits / T); nucleus sampling renormalises
    over a prefix of the vocabulary that differs between the two models. Either way a number would mislead."""
    if temperature <= 0:
        return "not measured: greedy decoding (temperature 0) samples no softmax distribution"
    if top_p < 1:
        return (f"not measured: top_p={top_p} samples a truncated distribution; the full-softmax KL at the "
                "sampling temperature would not describe it")
    return None


def kl_fields(policy_logp: list[list[float]] | None, ref_logp: list[list[float]] | None, group_size: int,
              note: str | None) -> dict[str, float | str | None]:
    """KL(policy || parent) of the sampled distributions, from both models' log-probs of the policy's own
    samples at the sampling temperature: per sequence (k1 estimate: sum of log-ratios; mean and clustered
    stderr) and per reply token (total over total tokens). All null, with `note` saying why, when `note` is set."""
    if note is not None or policy_logp is None or ref_logp is None:
        return {"kl": None, "kl_stderr": None, "kl_per_token": None, "kl_note": note or "not measured"}
    per_sequence = [sum(a) - sum(b) for a, b in zip(policy_logp, ref_logp, strict=True)]
    kl, kl_se = clustered_mean_stderr(per_sequence, group_size)
    tokens = sum(len(a) for a in policy_logp)
    # Per reply token, the unit TRL's GRPO/RLOO logs use; a collapsed policy shows several nats here.
    return {"kl": kl, "kl_stderr": kl_se, "kl_per_token": sum(per_sequence) / max(tokens, 1), "kl_note": None}


def reply_logprobs(model: Any, samples: Sequence[Sample], pad_id: int, batch_size: int = 16,
                   temperature: float = 1.0) -> list[list[float]]:
    """log p(token) of every reply token given its prompt and the reply so far, one list per sample, with p =
    softmax(logits / temperature)."""
    return reply_logprobs_at(model, samples, pad_id, (temperature,), batch_size)[0]


def reply_logprobs_at(model: Any, samples: Sequence[Sample], pad_id: int, temperatures: Sequence[float],
                      batch_size: int = 16) -> list[list[list[float]]]:
    """`reply_logprobs` at each of `temperatures` (one list of per-sample lists per temperature), from one pass
    of the decoder: only the vocabulary projection is repeated per temperature.

    The vocabulary projection runs only at the positions that predict reply tokens: with a 49k vocabulary,
    projecting every prompt position too made this the slowest part of an evaluation."""
    import torch

    device = next(model.parameters()).device
    out: list[list[list[float]]] = [[] for _ in temperatures]
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        sequences = [s.prompt_ids + s.reply_ids for s in chunk]
        width = max(map(len, sequences))
        reply_width = max(max(len(s.reply_ids) for s in chunk), 1)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T]
        attention = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        # Position predicting reply token j: the one before it; unused slots point at position 0.
        positions = torch.zeros((len(chunk), reply_width), dtype=torch.long)  # [B, R]
        targets = torch.zeros((len(chunk), reply_width), dtype=torch.long)  # [B, R]
        for row, (seq, sample) in enumerate(zip(sequences, chunk, strict=True)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            first = len(sample.prompt_ids) - 1
            positions[row, : len(sample.reply_ids)] = torch.arange(first, first + len(sample.reply_ids))
            targets[row, : len(sample.reply_ids)] = torch.tensor(sample.reply_ids, dtype=torch.long)
        with torch.no_grad():
            hidden = models.decoder(model)(input_ids=input_ids.to(device),
                                           attention_mask=attention.to(device)).last_hidden_state  # [B, T, H]
            picked = hidden.gather(1, positions.to(device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            token_logp = [models.token_logprobs(model, picked, targets.to(device), temperature=t)[0]  # [B, R]
                          for t in temperatures]
        for per_temperature, logp in zip(out, token_logp, strict=True):
            per_temperature.extend(logp[row, : len(sample.reply_ids)].tolist() for row, sample in enumerate(chunk))
    return out


# ---- the evaluation -------------------------------------------------------------------------------------------


@dataclass
class ReferenceLogprobs:
    """The reference's (adapter off) temperature-1 log-probs of the policy's and the parent's samples, and the
    two models' log-probs of the policy's samples at the sampling temperature (None, with `kl_note`, when the
    sampling was greedy or truncated): per sample, so ranks' shares can be joined before any mean is taken."""

    ref_on_policy: list[list[float]]
    ref_on_parent: list[list[float]] | None
    policy_at_t: list[list[float]] | None
    ref_at_t: list[list[float]] | None
    kl_note: str | None


def reference_logprobs(model: Any, policy: list[Sample], parent: list[Sample] | None, pad_id: int,
                       settings: EvalSettings) -> ReferenceLogprobs:
    """The log-probs behind the NLL guard and KL(policy || parent) on the policy's samples. `parent` None: the
    parent's log-probs are not computed (they came from the sample cache with its samples).

    The KL is of the distributions sampled: both models' log-probs at the sampling temperature, or none at all
    when the sampling was greedy or truncated (see `kl_note`). The reference NLL stays at temperature 1: it is a
    fluency guard of the text under the reference model itself, not a property of the sampling distribution,
    so it is comparable across sampling settings."""
    note = kl_note(settings.temperature, settings.top_p)
    # One decoder pass over the policy's samples serves both temperatures (a second projection only when T != 1).
    temperatures = (1.0,) if note is not None or settings.temperature == 1.0 else (1.0, settings.temperature)
    with model.disable_adapter():
        ref_on_policy, *ref_at_t = reply_logprobs_at(model, policy, pad_id, temperatures, settings.batch_size)
        ref_on_parent = parent_reference_logprobs(model, parent, pad_id, settings) if parent is not None else None
    if note is not None:
        return ReferenceLogprobs(ref_on_policy, ref_on_parent, None, None, note)
    policy_at_t = reply_logprobs(model, policy, pad_id, settings.batch_size, temperature=settings.temperature)
    return ReferenceLogprobs(ref_on_policy, ref_on_parent, policy_at_t, ref_at_t[0] if ref_at_t else ref_on_policy,
                             None)


def reference_logprobs_and_kl(model: Any, policy: list[Sample], parent: list[Sample] | None, pad_id: int,
                              settings: EvalSettings) -> tuple[list[list[float]], list[list[float]] | None,
                                                                dict[str, Any]]:
    """`reference_logprobs` with the `kl_fields` of KL(policy || parent) computed from them."""
    found = reference_logprobs(model, policy, parent, pad_id, settings)
    return found.ref_on_policy, found.ref_on_parent, kl_fields(found.policy_at_t, found.ref_at_t,
                                                               settings.num_samples, found.kl_note)


def parent_reference_logprobs(model: Any, parent: list[Sample], pad_id: int,
                              settings: EvalSettings) -> list[list[float]]:
    """The parent's own temperature-1 log-probs of its samples (the parent side's reference NLL); called with the
    adapter off. They depend on the parent alone, so they are cached with its samples."""
    return reply_logprobs(model, parent, pad_id, settings.batch_size)


@dataclass
class ParentSamples:
    """The parent's samples and its temperature-1 log-probs of them, and where they came from."""

    samples: list[Sample]
    ref_logprobs: list[list[float]]
    cached: bool  # read from the sample cache
    key: str | None  # the cache entry's key; None when the cache was not used (or could not be written)


def sample_parent(model: Any, tokenizer: Any, prompts: list[Any], sampling: dict[str, Any],
                  settings: EvalSettings) -> tuple[list[Sample], list[list[float]]]:
    """The parent's samples (the same model with the artifact's adapter off, the same prompts and seed) and its
    temperature-1 log-probs of them."""
    with model.disable_adapter():
        samples = generation.generate_samples(model, tokenizer, prompts, progress="sampling its parent", **sampling)
        return samples, parent_reference_logprobs(model, samples, tokenizer.pad_token_id, settings)


def parent_sampling_identity(artifact: Artifact, registry: Registry, model: Any, tokenizer: Any,
                             prompts: list[Any], sampling: dict[str, Any], precision: str,
                             device_type: str) -> dict[str, Any]:
    """`sample_cache.parent_identity` of this evaluation's parent side: the artifact's base and chain (never its
    own adapter), its tokenizer, the prompts and sampling config with the stop ids, the compute and the code."""
    return sample_cache.parent_identity(
        base=artifact.manifest.base_model, chain=sample_cache.chain_files(artifact.manifest.adapter_chain, registry),
        tokenizer=sample_cache.tokenizer_identity(tokenizer), prompts=prompts,
        sampling={**sampling, "stop_ids": generation.stop_token_ids(model, tokenizer)},
        precision=precision, device_type=device_type, code=sample_cache.code_identity())


def cached_parent_samples(model: Any, tokenizer: Any, prompts: list[Any], sampling: dict[str, Any],
                          settings: EvalSettings, identity: dict[str, Any], root: Path) -> ParentSamples:
    """The parent's samples and log-probs from the registry's sample cache, or sampled, computed and cached
    there now. Under the entry's lock, so a concurrent evaluation of the same parent waits and reads them. A
    cache that cannot be locked or written (a read-only registry) only costs the sampling."""
    key = sample_cache.cache_key(identity)
    path = sample_cache.entry_path(root, key)
    with sample_cache.locked(path) as held:
        found = sample_cache.read_entry(path, key, len(prompts)) if held else None
        if found is not None:
            return ParentSamples(*found, cached=True, key=key)
        samples, logprobs = sample_parent(model, tokenizer, prompts, sampling, settings)
        if held:
            try:
                sample_cache.write_entry(path, key, identity, samples, logprobs)
            except OSError:
                held = False
    return ParentSamples(samples, logprobs, cached=False, key=key if held else None)


def _side(samples: list[Sample], logp_ref: list[list[float]], judge_scores: list[float],
          reward_scores: list[float] | None, group_size: int) -> dict[str, Any]:
    """Summary of one model's samples; NLL is the reference model's, per token. Stderrs clustered by prompt."""
    judge_mean, judge_se = clustered_mean_stderr(judge_scores, group_size)
    tokens = [len(s.reply_ids) for s in samples]
    summary = {
        "judge": judge_mean, "judge_stderr": judge_se,
        "length_tokens": sum(tokens) / len(tokens),
        "distinct_2": distinct_n([s.text for s in samples]),
        "ref_nll_per_token": -sum(map(sum, logp_ref)) / max(sum(tokens), 1),
        # Replies cut off at max_new_tokens (no stop token): their length and scores describe a cut text.
        "truncated_share": sum(not s.ended for s in samples) / len(samples),
    }
    summary["reward"], summary["reward_stderr"] = (clustered_mean_stderr(reward_scores, group_size)
                                                   if reward_scores is not None else (None, None))
    return summary


def eval_precision(settings: EvalSettings, artifact: Artifact, device: dict[str, Any]) -> str:
    """`--precision` made concrete by the one rule stages use (`device.resolve_precision`): `auto` is bf16 where
    this device computes it fast and the model is large enough for it to pay, else fp32 (fp16 on GPUs without
    bf16). A precision the device cannot do is a RecipeError naming the option, before any weights load."""
    base = models.BaseModelSpec.from_manifest(artifact.manifest.base_model)
    return resolve_precision(settings.precision, device, "align eval --precision", models.hidden_size(base))


def join_shares(shares: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' shares of an evaluation as one: lists joined in rank order (None when a rank measured none),
    cached when every rank read the cache, the cache keys of all ranks."""
    joined: dict[str, Any] = {}
    for name in shares[0]:
        values = [share[name] for share in shares]
        if name == "cached":
            joined[name] = all(values)
        elif name == "key":
            joined[name] = None if None in values else ",".join(values)
        else:
            joined[name] = None if any(v is None for v in values) else [item for v in values for item in v]
    return joined


def evaluate_artifact(artifact: Artifact, registry: Registry, settings: EvalSettings, card_path: Path, *,
                      cache: bool = True) -> EvalResult | None:
    """Sample from the artifact and its parent on the card's held-out prompts and compare them. With `cache`
    the parent's samples and log-probs come from (or go to) the registry's sample cache (`align.sample_cache`).
    Sampling, log-probs and scores compute in the resolved precision, recorded in `settings.precision`.
    Under `accelerate launch` the ranks share the prompts; rank 0 writes and returns the result, others None."""
    from align.data import load_card, load_data

    if artifact.manifest.stage not in stages_producing("policy"):
        raise ArtifactError(f"{artifact.ref} is a {artifact.manifest.stage} artifact; `align eval` compares a "
                            f"policy ({', '.join(stages_producing('policy'))}) with its parent")
    rows = getattr(load_data(load_card(card_path)), settings.split)[: settings.limit]
    judge, _ = judges.load_judge(settings.judge, registry)
    reward = RewardModel.of(registry.resolve(settings.reward), "`align eval --reward`") if settings.reward else None
    device = detect_device()
    precision = eval_precision(settings, artifact, device)
    settings = settings.model_copy(update={"precision": precision})
    on = device["type"]

    def compute() -> Any:  # a fresh autocast context for each block that runs the models
        return models.compute_precision(precision, on)

    # Under `accelerate launch` each rank evaluates its share of the prompts (all samples of a prompt on one
    # rank, so the per-prompt clusters of the standard errors stay whole) and rank 0 joins them.
    rank, world = runtime.world()
    target = on
    if world > 1:
        from accelerate import PartialState

        target = PartialState().device  # joins the ranks' process group; each rank on its own GPU
    model, tokenizer = models.load_artifact_model(artifact, registry, dtype=models.weight_dtype(precision, on))
    if on == "cuda":
        model = model.to(target)
    chat_template = artifact.manifest.adapter.chat_template
    prompts = [row["prompt"] for row in rows[rank::world] for _ in range(settings.num_samples)]
    sampling = {"chat_template": chat_template, "max_new_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                "batch_size": settings.batch_size}

    with compute():
        policy = generation.generate_samples(model, tokenizer, prompts, progress="sampling the artifact", **sampling)
        # Before the parent's samples: an evaluation beside another of the same parent (`make demo`) may wait
        # for the other's samples to be cached, and has this to do first.
        refs = reference_logprobs(model, policy, None, tokenizer.pad_token_id, settings)
        if cache:
            identity = parent_sampling_identity(artifact, registry, model, tokenizer, prompts, sampling, precision, on)
            sampled = cached_parent_samples(model, tokenizer, prompts, sampling, settings, identity, registry.root)
        else:
            sampled = ParentSamples(*sample_parent(model, tokenizer, prompts, sampling, settings), cached=False,
                                    key=None)

    with compute():
        judge_policy = judge(prompts, [s.text for s in policy])
        judge_parent = judge(prompts, [s.text for s in sampled.samples])
    reward_policy = reward_parent = None
    if reward is not None:
        del model  # one model at a time keeps peak memory at one copy of the weights
        scorer = reward.load(registry, dtype=models.weight_dtype(precision, on),
                             device=target if on == "cuda" else None)
        with compute():
            reward_policy = scorer.score(prompts, [s.text for s in policy])
            reward_parent = scorer.score(prompts, [s.text for s in sampled.samples])

    joined = join_shares(runtime.gather_objects({
        "prompts": prompts, "policy": policy, "parent": sampled.samples, "ref_on_policy": refs.ref_on_policy,
        "ref_on_parent": sampled.ref_logprobs, "policy_at_t": refs.policy_at_t, "ref_at_t": refs.ref_at_t,
        "judge_policy": judge_policy, "judge_parent": judge_parent, "reward_policy": reward_policy,
        "reward_parent": reward_parent, "cached": sampled.cached, "key": sampled.key}))
    if not runtime.is_main_process():
        return None
    prompts, policy, parent = joined["prompts"], joined["policy"], joined["parent"]
    ref_on_policy, ref_on_parent = joined["ref_on_policy"], joined["ref_on_parent"]
    judge_policy, judge_parent = joined["judge_policy"], joined["judge_parent"]
    reward_policy, reward_parent = joined["reward_policy"], joined["reward_parent"]
    group = settings.num_samples
    kl = kl_fields(joined["policy_at_t"], joined["ref_at_t"], group, refs.kl_note)

    policy_side = _side(policy, ref_on_policy, judge_policy, reward_policy, group)
    parent_side = _side(parent, ref_on_parent, judge_parent, reward_parent, group)
    wins_on = reward_policy is not None
    win_policy, win_parent = (reward_policy, reward_parent) if wins_on else (judge_policy, judge_parent)
    judge_delta, judge_delta_se = paired_delta(judge_policy, judge_parent, group)
    deltas = {"judge_delta": judge_delta, "judge_delta_stderr": judge_delta_se, "reward_delta": None,
              "reward_delta_stderr": None}
    if reward_policy is not None and reward_parent is not None:
        reward_delta, reward_delta_se = paired_delta(reward_policy, reward_parent, group)
        deltas |= {"reward_delta": reward_delta, "reward_delta_stderr": reward_delta_se}
    result = EvalResult.model_validate({
        "schema_version": EvalResult.SCHEMA_VERSION,
        "artifact": artifact.ref,
        "parent": artifact.manifest.started_from,
        "settings": settings,
        "prompts": len(rows),
        "samples": len(prompts),
        "policy": policy_side,
        "parent_model": parent_side,
        **deltas,
        # KL(policy || parent) at the sampling temperature: kl (nats/sequence), kl_stderr, kl_per_token, kl_note.
        **kl,
        "ref_nll_rise": policy_side["ref_nll_per_token"] - parent_side["ref_nll_per_token"],
        "win_rate": win_rate(win_policy, win_parent),
        "win_rate_stderr": win_rate_stderr(win_policy, win_parent, group),
        "win_rate_by": f"reward:{reward.source}" if reward is not None else settings.judge,
        "parent_samples_cached": joined["cached"],
        "parent_samples_key": joined["key"],
        "examples": [
            {"prompt": p[-1]["content"], "parent": b.text, "artifact": a.text, "judge_parent": jb, "judge_artifact": ja}
            for p, a, b, ja, jb in list(zip(prompts, policy, parent, judge_policy, judge_parent,
                                            strict=True))[:: settings.num_samples][:8]
        ],
    })
    registry.add_file(artifact, EVAL_FILE, result.to_json())  # recorded, so `align artifacts verify` checks it
    return result
