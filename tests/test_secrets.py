"""Secrets never land in what align writes: fake credentials in the environment, in an Accelerate config and in
`--set` values, then every file the run, the export and the report wrote is searched for them."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_SFT, align_env, align_process

from align.redaction import REDACTED, is_secret_name, redact, redact_override

# Distinctive values: found anywhere (text or binary) means a leak.
ENV_SECRETS = {
    "HF_TOKEN": "hf_AlignFakeSecret0env0hf0token",
    "HUGGING_FACE_HUB_TOKEN": "hf_AlignFakeSecret1env1hub1token",
    "WANDB_API_KEY": "AlignFakeSecret2env2wandb2key",
    "OPENAI_API_KEY": "sk-AlignFakeSecret3env3openai3key",
    "MLFLOW_TRACKING_PASSWORD": "AlignFakeSecret4env4mlflow4password",
    "AWS_SECRET_ACCESS_KEY": "AlignFakeSecret5env5aws5secret",
}
ACCELERATE_SECRET = "AlignFakeSecret6accelerate6config"
SET_SECRET = "AlignFakeSecret7set7value"


@pytest.mark.parametrize("name", ["HF_TOKEN", "hub_token", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "apiKey",
                                  "accessToken", "password", "db_password", "client_secret", "AWS_SECRET_ACCESS_KEY",
                                  "AWS_ACCESS_KEY_ID", "x-api-key", "private_key", "Authorization", "credentials"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["max_new_tokens", "pad_token", "pad_token_id", "eos_token", "tokenizer",
                                  "token_type_ids", "tokens_per_second", "sort_keys", "keyword", "author", "name",
                                  "target_modules", "learning_rate", "monkey"])
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)


def test_redact_hides_secret_values_at_any_depth_and_keeps_the_rest() -> None:
    recorded = {"train": {"hub_token": "hf_x", "max_new_tokens": 48, "hub_model_id": "me/model"},
                "trackers": [{"wandb": {"api_key": "k", "project": "p"}}], "pad_token_id": 0, "password": None}
    assert redact(recorded) == {"train": {"hub_token": REDACTED, "max_new_tokens": 48, "hub_model_id": "me/model"},
                                "trackers": [{"wandb": {"api_key": REDACTED, "project": "p"}}], "pad_token_id": 0,
                                "password": None}  # None: nothing was set, and the record may say so
    assert recorded["train"]["hub_token"] == "hf_x", "the input is left as it was"


def test_redact_override() -> None:
    assert redact_override("tracker.wandb.api_key=abc") == f"tracker.wandb.api_key={REDACTED}"
    assert redact_override("train.learning_rate=1e-4") == "train.learning_rate=1e-4"
    assert redact_override("hf_token") == "hf_token"  # no value to hide


@pytest.mark.parametrize("override", [
    f"train.hf_token={SET_SECRET}",  # a key the recipe does not have
    f"train.learning_rate.api_key={SET_SECRET}",  # under a value that is not a section
    f"model.password=[{SET_SECRET}",  # not valid YAML
])
def test_a_refused_secret_override_is_not_echoed(override: str, run_align: Callable, tmp_path: Path) -> None:
    result = run_align("sft", TINY_SFT, "--set", override, "--registry", tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and override.partition("=")[0] in result.stderr, result.stderr
    assert SET_SECRET not in result.stderr + result.stdout, result.stderr
    assert not list(tmp_path.iterdir()), "a refused recipe writes nothing"


@pytest.mark.slow
def test_no_secret_lands_in_any_file_a_run_export_and_report_write(tmp_path: Path, stories_dir: Path) -> None:
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(f"compute_environment: LOCAL_MACHINE\nnum_processes: 1\n"
                                 f"hub_token: {ACCELERATE_SECRET}\n")
    registry, cache, out = tmp_path / "registry", tmp_path / "cache", tmp_path / "out"
    env = {**align_env(cache), **ENV_SECRETS}

    def align(*args: str) -> subprocess.CompletedProcess:
        result = align_process(list(args), env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    runs = [
        align("sft", TINY_SFT, "--registry", registry, "--set", "train.max_steps=2", "--set", "train.save_steps=1",
              "--set", "sft.num_samples=1", "--set", "data.limit=32",
              "--set", f"launch.accelerate_config={accelerate_config}"),
        align("export", "tiny-sft@v1", "--merge", out / "merged", "--registry", registry),
        align("report", "--out", out / "report.html", "--registry", registry),
    ]
    manifest = (registry / "tiny-sft" / "v1" / "manifest.json").read_text()
    assert str(accelerate_config) in manifest, "the config is recorded by its path, and only by it"
    secrets = [*ENV_SECRETS.values(), ACCELERATE_SECRET]
    written = [path for root in (registry, cache, out) for path in root.rglob("*") if path.is_file()]
    assert len(written) > 10 and (out / "merged" / "align_export.json") in written
    leaks = [(str(path), secret) for path in written for secret in secrets if secret.encode() in path.read_bytes()]
    leaks += [("console", secret) for run in runs for secret in secrets if secret in run.stdout + run.stderr]
    assert not leaks
