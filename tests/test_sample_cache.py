"""The sample cache of `align eval`: its key names exactly what decides the parent's samples, its entries survive
damage, and two policies of one parent sample that parent once."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, rerecord_files

from align import sample_cache
from align.generation import Sample
from align.manifest import BaseFile, BaseIdentity

STORY_PROMPTS = REPO / "data_cards" / "tiny-story-prompts.yaml"


# ---- the key -------------------------------------------------------------------------------------------------------


def _parts(**changes: Any) -> dict[str, Any]:
    """`parent_identity`'s arguments for a parent on a local base with a two-adapter chain, with `changes`."""
    parts: dict[str, Any] = {
        "base": BaseIdentity(spec="../models/tiny", kind="local", location="/m/tiny", revision=None,
                             trust_remote_code=False,
                             files=[BaseFile(name="config.json", bytes=10, sha256="c0"),
                                    BaseFile(name="model.safetensors", bytes=99, sha256="w0")]),
        "chain": [{"adapter/adapter_config.json": "a1", "adapter/adapter_model.safetensors": "b1"},
                  {"adapter/adapter_config.json": "a2", "adapter/adapter_model.safetensors": "b2"}],
        "tokenizer": {"class": "LlamaTokenizerFast", "vocabulary": "v0", "chat_template": "{{ x }}",
                      "special_ids": {"bos": 1, "eos": 2, "pad": 0, "unk": 0}, "clean_up_tokenization_spaces": False},
        "prompts": [[{"role": "user", "content": "Once"}], [{"role": "user", "content": "Once"}],
                    [{"role": "user", "content": "Tom had"}], [{"role": "user", "content": "Tom had"}]],
        "sampling": {"chat_template": "auto", "max_new_tokens": 48, "temperature": 1.0, "top_p": 1.0, "seed": 0,
                     "batch_size": 32, "stop_ids": [2]},
        "precision": "fp32", "device_type": "cpu",
        "code": {"versions": {"align": "0.1.0", "torch": "2.13.0"}, "sources": {"generation.py": "g0"}},
    }
    return {**parts, **changes}


def _key(**changes: Any) -> str:
    return sample_cache.cache_key(sample_cache.parent_identity(**_parts(**changes)))


def _with(part: str, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """`_parts()`'s `part` (a dict or list) deep-copied, with the item at `path` inside it replaced by `value`."""
    import copy

    changed = copy.deepcopy(_parts()[part])
    target = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return {part: changed}


def test_the_key_is_stable_and_ignores_what_does_not_decide_the_samples() -> None:
    key = _key()
    assert len(key) == 64 and key == _key()
    # Key order of the dicts, and the base's spelling and location when its files are all hashed, are not identity.
    reordered = {k: _parts()["sampling"][k] for k in reversed(list(_parts()["sampling"]))}
    assert _key(sampling=reordered) == key
    moved = _parts()["base"].model_copy(update={"spec": "/abs/models/tiny", "location": "/elsewhere/tiny"})
    assert _key(base=moved) == key


def test_the_key_changes_with_every_part_of_the_parent_and_the_sampling() -> None:
    base = _parts()["base"]
    weights = [base.files[0], base.files[1].model_copy(update={"sha256": "w1"})]
    changes: dict[str, dict[str, Any]] = {
        "base weights": {"base": base.model_copy(update={"files": weights})},
        "base remote code": {"base": base.model_copy(update={"trust_remote_code": True})},
        "adapter weights": _with("chain", (1, "adapter/adapter_model.safetensors"), "b2x"),
        "adapter config": _with("chain", (0, "adapter/adapter_config.json"), "a1x"),
        "chain order": {"chain": list(reversed(_parts()["chain"]))},
        "chain length": {"chain": _parts()["chain"][:1]},
        "tokenizer vocabulary": _with("tokenizer", ("vocabulary",), "v1"),
        "chat template": _with("tokenizer", ("chat_template",), "{{ y }}"),
        "pad id": _with("tokenizer", ("special_ids", "pad"), 3),
        "prompt text": _with("prompts", (2, 0, "content"), "Tom has"),
        "prompt order": {"prompts": list(reversed(_parts()["prompts"]))},
        "samples per prompt": {"prompts": _parts()["prompts"][::2]},
        "template mode": _with("sampling", ("chat_template",), "none"),
        "max_new_tokens": _with("sampling", ("max_new_tokens",), 47),
        "temperature": _with("sampling", ("temperature",), 0.7),
        "top_p": _with("sampling", ("top_p",), 0.9),
        "seed": _with("sampling", ("seed",), 1),
        "batch size": _with("sampling", ("batch_size",), 16),
        "stop ids": _with("sampling", ("stop_ids",), [2, 5]),
        "precision": {"precision": "bf16"},
        "device": {"device_type": "cuda"},
        "align version": _with("code", ("versions", "align"), "0.2.0"),
        "torch version": _with("code", ("versions", "torch"), "2.14.0"),
        "sampling code": _with("code", ("sources", "generation.py"), "g1"),
    }
    keys = {what: _key(**change) for what, change in changes.items()}
    assert _key() not in keys.values()
    assert len(set(keys.values())) == len(keys), "two different changes gave one key"


def test_base_identity_falls_back_to_location_and_revision_when_weights_are_not_hashed() -> None:
    hub = BaseIdentity(spec="org/m", kind="hub", location="org/m", revision="abc", trust_remote_code=False, files=None)
    assert sample_cache.base_weights(hub)["revision"] == "abc"
    assert sample_cache.base_weights(hub) != sample_cache.base_weights(hub.model_copy(update={"revision": "def"}))
    big = _parts()["base"].model_copy(update={"files": [BaseFile(name="model.safetensors", bytes=9, sha256=None)]})
    assert sample_cache.base_weights(big)["location"] == "/m/tiny"


def test_adapter_files_are_the_adapter_weights_and_config_only() -> None:
    recorded = {"adapter/adapter_model.safetensors": "w", "adapter/adapter_config.json": "c",
                "adapter/README.md": "r", "tokenizer.json": "t", "metrics.json": "m", "eval.json": "e"}
    assert sample_cache.adapter_files(recorded) == {"adapter/adapter_config.json": "c",
                                                    "adapter/adapter_model.safetensors": "w"}


def test_tokenizer_identity_survives_a_save_and_sees_the_chat_template(stories_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    identity = sample_cache.tokenizer_identity(tokenizer)
    tokenizer("a padded call", padding="max_length", max_length=8, truncation=True)  # leaves state on the backend
    assert sample_cache.tokenizer_identity(tokenizer) == identity
    tokenizer.save_pretrained(tmp_path / "saved")
    assert sample_cache.tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path / "saved")) == identity
    tokenizer.chat_template = "{{ messages }}"
    assert sample_cache.tokenizer_identity(tokenizer) != identity


# ---- entries -------------------------------------------------------------------------------------------------------


def test_an_entry_reads_back_exactly_and_a_damaged_one_reads_as_absent(tmp_path: Path) -> None:
    samples = [Sample("a b", [1, 5], [7, 2], True), Sample("c", [1, 6], [8], False)]
    logprobs = [[-0.1234567890123, -2.5], [-1e-9]]
    path = sample_cache.entry_path(tmp_path, "k" * 64)
    assert path == tmp_path / ".cache" / "samples" / f"{'k' * 64}.json"
    assert sample_cache.read_entry(path, "k" * 64, 2) is None  # absent
    sample_cache.write_entry(path, "k" * 64, {"any": "identity"}, samples, logprobs)
    assert sample_cache.read_entry(path, "k" * 64, 2) == (samples, logprobs)  # floats round-trip exactly
    assert not list(path.parent.glob(".*.tmp-*")), "the temporary file was renamed into place"
    assert sample_cache.read_entry(path, "j" * 64, 2) is None  # another key's file (renamed by hand)
    assert sample_cache.read_entry(path, "k" * 64, 3) is None  # not the samples asked for

    raw = json.loads(path.read_text())
    damaged = {
        "half written": path.read_text()[:40],
        "not JSON": "\x00\xff garbage",
        "a log-prob missing": json.dumps({**raw, "ref_logprobs": [[-0.1], [-1e-9]]}),
        "an unknown field": json.dumps({**raw, "extra": 1}),
        "an old format": json.dumps({**raw, "format": sample_cache.FORMAT - 1}),
    }
    for what, text in damaged.items():
        path.write_text(text, errors="surrogateescape")
        assert sample_cache.read_entry(path, "k" * 64, 2) is None, what


def test_the_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    from filelock import FileLock, Timeout

    path = sample_cache.entry_path(tmp_path, "k" * 64)
    with sample_cache.locked(path) as held:
        assert held
        with pytest.raises(Timeout):
            FileLock(f"{path}.lock").acquire(timeout=0)  # another evaluation waits here
    FileLock(f"{path}.lock").acquire(timeout=0)


# ---- two policies of one parent ------------------------------------------------------------------------------------


def _policy(registry: Path, name: str, source: str, parent: str, scale: float) -> str:
    """`name`@v1 in `registry`: a copy of the SFT artifact `source` (NAME/vN) trained on top of `parent` (its chain
    is that version's adapter), its adapter's LoRA B scaled by `scale` so that each policy is its own model."""
    from safetensors.torch import load_file, save_file

    target = registry / name / "v1"
    shutil.copytree(registry / source, target)
    raw = json.loads((target / "manifest.json").read_text())
    parent_dir = registry / parent.replace("@", "/")
    raw.update(name=name, version=1, ref=f"{name}@v1",
               adapter_chain=[{"ref": parent, "path": str(parent_dir / "adapter")}])
    (target / "manifest.json").write_text(json.dumps(raw))
    weights = target / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * scale if "lora_B" in k else v for k, v in tensors.items()}, weights)
    rerecord_files(target)
    return f"{name}@v1"


class Counted:
    """`generation.generate_samples`, counting the calls by their progress label."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real, self.calls = real, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs.get("progress"))
        return self.real(*args, **kwargs)


def test_two_policies_of_one_parent_sample_it_once(sft_registry: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pa and pb, two different policies on tiny-sft@v2: evaluating pb after pa reads the parent's samples and
    log-probs from the cache (the parent is not sampled again) and its parent numbers are those of an uncached
    run; pb's own side is its own. Another parent, or a damaged entry, samples again."""
    from align import evaluate, generation
    from align.artifacts import Registry
    from align.device import detect_device, resolve_precision
    from align.eval_result import EvalResult, EvalSettings

    root = tmp_path / "registry"
    shutil.copytree(sft_registry / "tiny-sft", root / "tiny-sft", ignore=shutil.ignore_patterns(".runs", "eval.json",
                                                                                                "added_files.json"))
    pa, pb = (_policy(root, name, "tiny-sft/v1", "tiny-sft@v2", scale) for name, scale in (("pa", 3.0), ("pb", -2.0)))
    registry = Registry(root)
    settings = EvalSettings(card=str(STORY_PROMPTS), limit=3, num_samples=2, max_new_tokens=8, batch_size=4)
    counted = Counted(generation.generate_samples)
    monkeypatch.setattr(generation, "generate_samples", counted)

    def run(ref: str, cache: bool = True) -> tuple[EvalResult, list[str | None]]:
        counted.calls.clear()
        result = evaluate.evaluate_artifact(registry.resolve(ref), registry, settings, STORY_PROMPTS, cache=cache)
        return result, list(counted.calls)

    first, calls = run(pa)
    assert calls == ["sampling the artifact", "sampling its parent"]
    assert not first.parent_samples_cached and first.parent_samples_key is not None
    # `auto` resolved by the stages' rule for this machine and stories260K's hidden size (64), and recorded
    assert first.settings.precision == resolve_precision("auto", detect_device(), "--precision", 64)
    entry = sample_cache.entry_path(root, first.parent_samples_key)
    assert entry.is_file()

    second, calls = run(pb)
    assert calls == ["sampling the artifact"], "the parent was sampled again"
    assert second.parent_samples_cached and second.parent_samples_key == first.parent_samples_key
    assert second.parent_model == first.parent_model  # same parent, same samples, same log-probs
    on_disk = EvalResult.of(root / "pb" / "v1")
    assert on_disk is not None and on_disk.parent_samples_cached and on_disk.settings == second.settings

    uncached, calls = run(pb, cache=False)
    assert calls == ["sampling the artifact", "sampling its parent"]
    assert not uncached.parent_samples_cached and uncached.parent_samples_key is None
    # The cache changed no number: the parent's side and everything compared with it are what sampling gives.
    assert second.model_dump(exclude={"parent_samples_cached", "parent_samples_key"}) == \
        uncached.model_dump(exclude={"parent_samples_cached", "parent_samples_key"})
    assert second.policy != first.policy, "the policies are different models: nothing of theirs is shared"
    assert [e.parent for e in second.examples] == [e.parent for e in first.examples]

    other_parent, calls = run("tiny-sft@v1")  # its parent is the base model: another key
    assert calls == ["sampling the artifact", "sampling its parent"]
    assert not other_parent.parent_samples_cached and other_parent.parent_samples_key != first.parent_samples_key

    entry.write_text('{"format": 1, "key": "trunc')  # a half-written entry: ignored, sampled again, rewritten
    repaired, calls = run(pb)
    assert calls == ["sampling the artifact", "sampling its parent"] and not repaired.parent_samples_cached
    assert repaired.parent_model == first.parent_model
    assert sample_cache.read_entry(entry, first.parent_samples_key, 6) is not None
    # The cache lives beside the artifacts without being one.
    assert registry.names() == ["pa", "pb", "tiny-sft"]
    assert [ref for ref, _ in registry.verify_targets([])] == ["pa@v1", "pb@v1", "tiny-sft@v1", "tiny-sft@v2"]
